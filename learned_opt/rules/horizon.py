"""The relative rules' schedule ``s(t)`` and the checks of ``total_steps`` (the horizon)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from learned_opt.rules.base import Rule

HORIZON_FREE_STEPS = 200  # the warm-up lasts warmup × this many steps when total_steps is unknown
def schedule(step: Tensor, total_steps: Tensor, warmup: Tensor | float, final: Tensor | float = 0.0,
             decay_start: Tensor | float | None = None) -> Tensor:
    """``s(t)`` for the 1-based ``step``: linear warm-up, then cosine to ``final`` (a fraction of the
    peak) at ``total_steps`` (> 0), or constant after the warm-up when ``total_steps`` is 0 (unknown).
    ``decay_start`` d in [0, 1): the cosine takes only the last 1 − d of the span after the warm-up,
    the step staying at its peak before (warm-up, stable, decay). Tensors, so members of a batched
    population may differ in horizon."""
    known = total_steps > 0
    horizon = torch.where(known, total_steps, torch.full_like(total_steps, float(HORIZON_FREE_STEPS)))
    warm_steps = torch.clamp(warmup * horizon, min=1.0)
    ramp = torch.clamp(step / warm_steps, max=1.0)
    frac = torch.clamp((step - warm_steps) / torch.clamp(horizon - warm_steps, min=1.0), 0.0, 1.0)
    if decay_start is not None:
        frac = torch.clamp((frac - decay_start) / (1.0 - decay_start), 0.0, 1.0)
    cosine = final + (1.0 - final) * 0.5 * (1.0 + torch.cos(math.pi * frac))
    return ramp * torch.where(known, cosine, torch.ones_like(frac))


def horizon_tensor(total_steps: int | Tensor | None, like: Tensor) -> Tensor:
    """``total_steps`` as a 0-dim tensor like ``like``; None (unknown) is 0."""
    if isinstance(total_steps, Tensor):
        return total_steps.to(like.dtype)
    return torch.tensor(float(total_steps or 0), dtype=like.dtype, device=like.device)


def warn_past_horizon(rule: Rule, step: Tensor, total_steps: Any, final: Callable[[], Tensor | float]) -> None:
    """Warn once per rule when an optimizer steps past the ``total_steps`` it was given: the schedule
    has ended there, so further steps stay at its ``final()`` fraction of the peak (none at 0; read
    only when warning). Only read on the CPU (on a device the check would wait for it every step)."""
    if not isinstance(total_steps, int) or getattr(rule, "_warned_past_horizon", False) or step.device.type != "cpu":
        return
    if float(step) >= total_steps:
        rule._warned_past_horizon = True  # type: ignore[attr-defined]
        end = float(final())
        after = (f"the step stays at {end:.0%} of its peak" if end > 0
                 else "these steps leave the parameters unchanged")
        warnings.warn(f"{type(rule).__name__}: stepping past total_steps={total_steps}; the schedule has ended "
                      f"there, so {after} (give the run's real length, or total_steps=None)",
                      RuntimeWarning, stacklevel=4)


def check_total_steps(value: Any) -> None:
    """ValueError unless ``value`` is None or an int >= 1 (bools refused)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid total_steps: {value!r} (must be None or an int >= 1)")
