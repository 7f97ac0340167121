"""The blow-up trigger the adaptive-rate rules share: a gradient norm far above its own running
average marks a run that starts to diverge, and the rule cuts its rate at that step.

``n_t = β n_{t-1} + (1-β) ||g_t||`` (``n_1 = ||g_1||``); step t is a spike when ``||g_t|| > κ
n_{t-1}`` (κ > 1; κ = 0 turns the trigger off). A norm that jumps by r to a level that then holds
spikes until the average has caught up: once when κ(1-β) ≥ 1, a few times under heavy smoothing.

The rules keep a ``guard_debt``, the product of the cuts the trigger made, and with a recovery r > 1
give it back by up to r per step without a spike: near zero loss a minibatch norm spikes now and
then (one misfit example in a batch of fitted ones), and kept cuts would add up, while a divergence,
spiking step after step or every other step, stays cut.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from learned_opt.rules.base import check_in_range, check_number


def norm_average(norm: Tensor, prev_avg: Tensor, first: Tensor, smoothing: float) -> Tensor:
    """``n_t``: the running average of the gradient norm (the norm itself at the first step)."""
    if smoothing == 0:
        return norm
    return torch.where(first, norm, smoothing * prev_avg + (1 - smoothing) * norm)


def spike(norm: Tensor, prev_avg: Tensor, first: Tensor, blowup: float) -> Tensor | None:
    """Whether this step's norm is above ``blowup`` × the previous average; None when off."""
    if blowup <= 0:
        return None
    return ~first & (norm > blowup * prev_avg)


def settle(spiked: Tensor, debt: Tensor, cut: Tensor | float, recovery: float) -> tuple[Tensor, Tensor]:
    """``(multiplier of the factor, new debt)``: ``cut`` at a spike; otherwise up to ``recovery`` of
    the debt given back, never past it."""
    give = torch.where(spiked, cut, torch.minimum(debt.new_full((), recovery), 1.0 / debt))
    return give, debt * give


def check_blowup(hparams: dict[str, Any] | Any) -> None:
    """ValueError unless ``blowup`` is 0 (off) or > 1, ``smoothing`` is in [0, 1) and
    ``blowup_recovery`` is >= 1 (1: cuts are kept)."""
    check_in_range("smoothing", hparams.get("smoothing", 0.0), 0.0, 1.0)
    blowup = check_number("blowup", hparams.get("blowup", 0.0))
    if not (blowup == 0 or (math.isfinite(blowup) and blowup > 1)):
        raise ValueError(f"invalid blowup: {hparams['blowup']!r} (must be 0 (off) or > 1)")
    recovery = check_number("blowup_recovery", hparams.get("blowup_recovery", 1.0))
    if not (math.isfinite(recovery) and recovery >= 1.0):
        raise ValueError(f"invalid blowup_recovery: {hparams['blowup_recovery']!r} (must be >= 1; 1 = cuts are kept)")
