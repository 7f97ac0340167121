"""The per-tensor direction and scale of the relative rules: a step moves a tensor along Adam's
direction by a fraction of its own RMS.

The scale is vectorised over a group's tensors from their norms, so it costs no pass over the tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from learned_opt.rules.controller import TINY, controller_stats


def rms_scale(norms: Tensor, numel: Tensor, floor: Tensor | float) -> Tensor:
    """``(RMS(p) + floor) / RMS(u)`` per tensor from the norms ``[n, 2]`` of ``(p, u)``: the factor
    that makes a step of ``u`` move the tensor by a fraction of its own scale (vectorised over the
    group's tensors)."""
    root = numel.sqrt()
    p_norm, u_norm = norms.unbind(-1)
    return (p_norm / root + floor) / torch.clamp(u_norm / root, min=TINY)


def anchor_factor(p_norm: Tensor, p0_norm: Tensor, numel: Tensor, floor: Tensor | float,
                  anchor: Tensor | float) -> Tensor:
    """``((RMS(p₀) + floor) / (RMS(p) + floor))^a`` per tensor (the relative scale moved towards the initial one)."""
    root = numel.sqrt()
    return ((p0_norm / root + floor) / (p_norm / root + floor)) ** anchor


Directions = tuple[list[Tensor], list[tuple[Tensor, Tensor]], Tensor | None, Tensor | None]


def relative_directions(grads: Sequence[Tensor], params: Sequence[Tensor],
                        per_param: Sequence[Mapping[str, Tensor]], step: Tensor, betas: Sequence[Tensor | float],
                        eps: Tensor | float, with_stats: bool, schedule_free: bool = False) -> Directions:
    """Per tensor: Adam's direction ``u = m / (√v + eps·√(1 − β₂ᵗ))``, which is ``m̂ / (√v̂ + eps)`` up to
    a per-tensor constant that cancels in the relative rescaling (so neither bias correction costs a
    pass over the tensor), the new moments, the norms ``[n, 2]`` of ``(p, u)`` and (``with_stats``) the
    controller's statistics ``[n, 4]`` (see :func:`~learned_opt.rules.controller.controller_features`). Pure.

    ``schedule_free``: ``u = g / (√v + eps·√(1 − β₂ᵗ))`` (no first moment; the new ``m`` is None), the
    norms of ``(z, u)`` (the relative scale is the base sequence's), and ``y − z`` in the statistics
    where ``m_{t-1}`` stands otherwise: it points back along the recent steps, so its cosine with
    ``g`` plays the part of ``cos(g, m_{t-1})``."""
    beta1, beta2 = betas
    bias2_sqrt = (1 - beta2**step).sqrt()
    dirs, moments, stats, norms = [], [], [], []
    for g, p, st in zip(grads, params, per_param):
        prev = p - st["z"] if schedule_free else st["exp_avg"]
        if with_stats:
            stats.append(controller_stats(g, prev, p - st["p0"]))
        m = None if schedule_free else torch.lerp(prev, g, 1 - beta1)
        v = torch.addcmul(st["exp_avg_sq"] * beta2, g, g, value=1 - beta2)
        u = (g if m is None else m) / (v.sqrt() + eps * bias2_sqrt)
        scaled = st["z"] if schedule_free else p
        norms.append(torch.stack([torch.linalg.vector_norm(scaled), torch.linalg.vector_norm(u)]))
        dirs.append(u)
        moments.append((m, v))
    if not dirs:
        return [], [], None, None
    return dirs, moments, torch.stack(stats) if stats else None, torch.stack(norms)
