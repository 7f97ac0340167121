"""The schedule-free form of the relative rules (Defazio et al. 2024, "The Road Less Scheduled").

A base sequence ``z`` takes the relative step, the evaluation point ``x`` is its running average
weighted by each step's multiplier squared, and gradients are taken at ``y = (1 − β₁) z + β₁ x``,
which the parameters hold while training (:mod:`learned_opt.rules.relative` has the whole rule).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from learned_opt.rules.base import check_bool
from learned_opt.rules.controller import controller_stats


def check_retract(retract: object, schedule_free: bool) -> bool:
    """``retract`` as a bool; ValueError unless a bool, or when set without the schedule-free form."""
    check_bool("retract", retract)
    if retract and not schedule_free:
        raise ValueError("invalid retract: True needs schedule_free=True (the retraction acts on the base sequence z)")
    return bool(retract)


def _sf_coefficients(per_param: Sequence[Mapping[str, Tensor]], weights: Tensor,
                     beta1: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """``(Σw after this step, c = w / Σw, 1 − β₁ + c β₁)`` per tensor."""
    total = torch.stack([st["sf_weight"] for st in per_param]) + weights
    c = torch.where(total > 0, weights / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    return total, c, 1 - beta1 + c * beta1


def retraction(z_norm: Tensor, u_norm: Tensor, dots: Tensor, factors: Tensor) -> Tensor:
    """Per tensor, ρ such that ``ρ (z + f u)`` has the norm that the step's radial part alone gives,
    ``|‖z‖ + f ⟨z, u⟩ / ‖z‖|``: the part of a step orthogonal to ``z`` no longer inflates ``‖z‖``.

    A relative step of size η orthogonal to ``z`` multiplies ‖z‖ by √(1 + η²); with η ≈ 0.1 that
    compounds to ×150 over 1000 steps, and since the next step is relative to ‖z‖ again, the run
    ends at chance on deep ReLU networks (docs/ablations.md). ρ = 1 where ``z`` is zero."""
    a2 = z_norm * z_norm
    fd = factors * dots
    n2 = a2 + 2 * fd + factors * factors * u_norm * u_norm
    ok = (a2 > 0) & (n2 > 0)
    rho = (a2 + fd).abs() / (z_norm * torch.sqrt(torch.where(ok, n2, torch.ones_like(n2))))
    return torch.where(ok, rho, torch.ones_like(rho))


def _retract_factors(dirs: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]], norms: Tensor,
                     factors: Tensor) -> tuple[Tensor, Tensor]:
    """``(ρ f, ρ − 1)`` per tensor: the step ``Δz = ρ f u + (ρ − 1) z`` lands on ``ρ (z + f u)``."""
    dots = torch.stack([torch.dot(st["z"].reshape(-1), u.reshape(-1)) for u, st in zip(dirs, per_param)])
    rho = retraction(norms[:, 0], norms[:, 1], dots, factors)
    return rho * factors, rho - 1


def sf_updates(dirs: Sequence[Tensor], params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]],
               new_per_param: list[dict[str, Tensor]], factors: Tensor, weights: Tensor,
               beta1: Tensor | float, norms: Tensor | None = None) -> list[Tensor]:
    """The schedule-free step: ``z' = z + Δz`` (``Δz = factor · u``), ``x' = x + c (z' − x)`` with
    ``c = w / Σw`` (``weights`` w per tensor), ``y' = (1 − β₁) z' + β₁ x'``; returns ``y' − y``,
    which with ``x = (y − (1 − β₁) z) / β₁`` is ``(1 − β₁ + c β₁) Δz + c (z − y)`` (no division).
    Writes ``z`` and ``sf_weight`` (Σw) into ``new_per_param``. ``norms`` (``[n, 2]``, of ``(z, u)``)
    given: the step is retracted (:func:`retraction`)."""
    total, c, keep = _sf_coefficients(per_param, weights, beta1)
    shrink = None
    if norms is not None:
        factors, shrink = _retract_factors(dirs, per_param, norms, factors)
    updates = []
    for i, (u, y, st) in enumerate(zip(dirs, params, per_param)):
        z = st["z"]
        dz = u * factors[i] if shrink is None else u * factors[i] + z * shrink[i]
        updates.append(dz * keep[i] + (z - y) * c[i])
        new_per_param[i].update(z=z + dz, sf_weight=total[i])
    return updates


def sf_updates_inplace(dirs: Sequence[Tensor], back: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]],
                       new_per_param: list[dict[str, Tensor]], factors: Tensor, weights: Tensor,
                       beta1: Tensor | float, norms: Tensor | None = None) -> list[Tensor]:
    """:func:`sf_updates` for the optimizer path: ``dirs`` (u) and ``back`` (``y − z``) are the
    caller's temporaries and become the updates; ``z`` is advanced in place. Bitwise the same values:
    ``(z − y) · c`` is ``(y − z) · (−c)`` exactly."""
    total, c, keep = _sf_coefficients(per_param, weights, beta1)
    shrink = None
    if norms is not None:
        factors, shrink = _retract_factors(dirs, per_param, norms, factors)
    for i, (u, yz, st) in enumerate(zip(dirs, back, per_param)):
        u.mul_(factors[i])
        if shrink is not None:
            u.add_(st["z"] * shrink[i])
        st["z"].add_(u)
        u.mul_(keep[i]).add_(yz.mul_(-c[i]))
        new_per_param[i].update(z=st["z"], sf_weight=total[i])
    return list(dirs)


def sf_directions_inplace(grads: Sequence[Tensor], params: Sequence[Tensor],
                          per_param: Sequence[Mapping[str, Tensor]], step: Tensor,
                          betas: Sequence[Tensor | float], eps: Tensor | float,
                          with_stats: bool) -> tuple[list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
    """The relative rule's directions (``learned_opt.rules.relative._directions`` with
    ``schedule_free``) for the optimizer path: ``v`` moves in place and each
    tensor gets two temporaries, ``y − z`` (returned, for :func:`sf_updates_inplace`) and one work
    buffer that holds ``p − p₀`` and then ``√v + eps`` and ``u``; large fresh buffers cost page faults
    on every step. The same operations in the same order as the pure path, so bitwise its results."""
    if not grads:
        return [], [], None, None
    beta2 = betas[1]
    eps_t = eps * (1 - beta2**step).sqrt()
    dirs, back, stats, norms = [], [], [], []
    for g, p, st in zip(grads, params, per_param):
        yz = p - st["z"]
        work = None
        if with_stats:
            work = torch.sub(p, st["p0"])
            stats.append(controller_stats(g, yz, work))
        v = st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        work = torch.sqrt(v, out=work) if work is not None else v.sqrt()
        u = torch.div(g, work.add_(eps_t), out=work)
        norms.append(torch.stack([torch.linalg.vector_norm(st["z"]), torch.linalg.vector_norm(u)]))
        dirs.append(u)
        back.append(yz)
    return dirs, back, torch.stack(stats) if stats else None, torch.stack(norms)


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
