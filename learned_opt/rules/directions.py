"""Update directions shared by several rules: SGD momentum and Adam (the one home of their math).

Pure functions: they return new tensors and never mutate their inputs, so the same code serves
the optimizer (under ``no_grad``) and meta-training (differentiable in the hyperparameters).
Hyperparameters may be floats or 0-dim tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Scalar = Tensor | float


def is_zero(value: Scalar) -> bool:
    """True for a plain number equal to 0 (a tensor hyperparameter is never treated as zero)."""
    return not isinstance(value, Tensor) and float(value) == 0.0


def momentum_direction(g: Tensor, buf: Tensor | None, momentum: Scalar) -> tuple[Tensor, Tensor | None]:
    """Heavy-ball direction as in ``torch.optim.SGD`` (no dampening): ``buf = momentum * buf + g``.

    ``buf=None`` is a zero buffer (torch's first step sets ``buf = g``, the same). With a plain
    ``momentum == 0`` no buffer is kept and ``(g, None)`` is returned.
    """
    if is_zero(momentum):
        return g, None
    new_buf = g if buf is None else buf * momentum + g
    return new_buf, new_buf


def adam_direction(
    g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, betas: Sequence[Scalar], eps: Scalar
) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's bias-corrected direction ``m̂ / (sqrt(v̂) + eps)`` (as ``torch.optim.Adam``) and new moments.

    ``step`` is the 1-based count of this update.
    """
    beta1, beta2 = betas
    exp_avg = exp_avg * beta1 + g * (1 - beta1)
    exp_avg_sq = exp_avg_sq * beta2 + g * g * (1 - beta2)
    return bias_corrected_adam(exp_avg, exp_avg_sq, step, betas, eps), exp_avg, exp_avg_sq


def bias_corrected_adam(
    exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, betas: Sequence[Scalar], eps: Scalar
) -> Tensor:
    """Adam's direction ``m̂ / (sqrt(v̂) + eps)`` from already-updated moments (``step`` 1-based, a tensor)."""
    beta1, beta2 = betas
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    return (exp_avg / bias1) / (safe_sqrt(exp_avg_sq) / bias2.sqrt() + eps)


def safe_sqrt(x: Tensor) -> Tensor:
    """``x.sqrt()`` whose derivative at 0 is 0 instead of inf.

    Coordinates whose gradient is always zero (constant input pixels, dead units) keep ``v = 0``;
    a plain sqrt there turns meta-gradients into ``inf * 0 = NaN``. Values are unchanged.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def group_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Sum over a group of ``<a_i, b_i>`` (a hypergradient's dot product), as a 0-dim tensor."""
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def group_norm(grads: Sequence[Tensor]) -> Tensor:
    """L2 norm of a whole group's gradient, as a 0-dim tensor."""
    return safe_sqrt(group_dot(grads, grads))
