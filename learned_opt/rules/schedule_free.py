"""The schedule-free form of the relative rules (Defazio et al. 2024, "The Road Less Scheduled").

A base sequence ``z`` takes the relative step, the evaluation point ``x`` is its running average
weighted by each step's multiplier squared, and gradients are taken at ``y = (1 − β₁) z + β₁ x``,
which the parameters hold while training (:mod:`learned_opt.rules.relative` has the whole rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

def sf_coefficients(per_param: Sequence[Mapping[str, Tensor]], weights: Tensor,
                     beta1: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σw after this step, c = w / Σw, 1 − β₁ + c β₁)`` per tensor."""
    total = torch.stack([st["sf_weight"] for st in per_param]) + weights
    c = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    return total, c, 1 - beta1 + c * beta1


def sf_updates(dirs: Sequence[Tensor], params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]],
               new_per_param: list[dict[str, Tensor]], factors: Tensor, weights: Tensor,
               beta1: Tensor | float) -> list[Tensor]:
    """The schedule-free step: ``z' = z + Δz`` (``Δz = factor · u``), ``x' = x + c (z' − x)`` with
    ``c = w / Σw`` (``weights`` w per tensor), ``y' = (1 − β₁) z' + β₁ x'``; returns ``y' − y``,
    which with ``x = (y − (1 − β₁) z) / β₁`` is ``(1 − β₁ + c β₁) Δz + c (z − y)`` (no division).
    Writes ``z`` and ``sf_weight`` (Σw) into ``new_per_param``."""
    total, c, keep = sf_coefficients(per_param, weights, beta1)
    updates = []
    for i, (u, y, st) in enumerate(zip(dirs, params, per_param)):
        z = st["z"]
        dz = u * factors[i]
        updates.append(dz * keep[i] + (z - y) * c[i])
        new_per_param[i].update(z=z + dz, sf_weight=total[i])
    return updates


def schedule_free_eval_point(params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]],
                             beta1: float, total_steps: int | Tensor | None = None) -> list[Tensor]:
    """The evaluation point ``x = (y − (1 − β₁) z) / β₁`` of parameters ``y`` held while training;
    ``y`` itself where ``total_steps`` is known (a tensor: per element, for batched members)."""
    if isinstance(total_steps, Tensor):
        told = total_steps > 0
        return [torch.where(told, y, (y - (1 - beta1) * st["z"]) / beta1) for y, st in zip(params, per_param)]
    if total_steps:
        return list(params)
    return [(y - (1 - beta1) * st["z"]) / beta1 for y, st in zip(params, per_param)]


def schedule_free_train_point(params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]],
                              beta1: float, total_steps: int | Tensor | None = None) -> list[Tensor]:
    """The training point ``y = (1 − β₁) z + β₁ x`` of parameters ``x`` held for evaluation (the
    inverse of :func:`schedule_free_eval_point`, so the identity where ``total_steps`` is known)."""
    if total_steps:
        return list(params)
    return [torch.lerp(st["z"], x, beta1) for x, st in zip(params, per_param)]
