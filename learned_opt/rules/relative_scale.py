"""The per-tensor scale of the relative rules: a step moves a tensor by a fraction of its own RMS.

Vectorised over a group's tensors from their norms, so the scale costs no pass over the tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from learned_opt.rules.controller import TINY


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
