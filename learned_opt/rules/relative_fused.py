"""The relative rules' fused CPU step: the optimizer's parameters moved in place.

The pure path (:func:`learned_opt.rules.relative.relative_update`) builds each intermediate
(``g + wd·p``, ``y − z``, ``p − p₀``, ``u``) as a whole tensor and returns updates for the caller
to add. On the CPU every fresh large buffer costs page faults on every step (each about as much
as five passes over it), and each intermediate one more pass over memory. Here, tensors of at
least :data:`SLICED_FROM` elements are worked on in slices of :data:`SLAB` elements whose scratch
is kept between steps and stays in cache; smaller ones together, by ``torch._foreach_*`` kernels
(a model of many small tensors then costs a few dispatches, not a few per tensor; temporaries
of under 2^18 elements come from the allocator's heap without page faults; three of them per
small tensor, its new ``v`` and ``m`` and its direction, are kept between the passes). Two passes:

1. :func:`fused_statistics` reads (the controller's statistics and the norms of the relative
   scale) and writes nothing, so gradients that fail the guard leave everything as it was;
2. :func:`fused_apply` writes the moments, ``z`` and the parameters.

The math is ``relative_update``'s (meta-training runs that one); rounding differs (norms summed
over slices, fused multiply-adds), at float32's precision per step.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SLAB = 1 << 16  # elements per slice of a large tensor: its streams and scratch fit a core's L2 cache
SLICED_FROM = 1 << 18  # tensors this large are sliced; smaller ones' temporaries come from the heap
SMALL_BATCH = 1 << 20  # elements of small tensors per group of foreach calls


@dataclass(frozen=True)
class Fused:
    """The per-step constants of the fused path (host numbers).

    ``sign``: -1 when maximizing; ``coupled``: the L2 weight decay added to the gradient;
    ``decoupled``: the AdamW shrink ``rate·wd`` of the parameters; ``betas``, ``eps_t`` (eps
    times ``√(1 − β₂ᵗ)``, see ``relative_scale.relative_directions``); ``schedule_free``: the form of the rule.
    """

    sign: float
    coupled: float
    decoupled: float
    betas: tuple[float, float]
    eps_t: float
    schedule_free: bool


def fused_constants(*, sign: float, coupled: float, decoupled: float, betas: Sequence[Tensor | float],
                    eps: Tensor | float, step: float, schedule_free: bool) -> Fused:
    """:class:`Fused` from the rule's hyperparameters (numbers or 0-dim tensors) at the 1-based ``step``."""
    beta1, beta2 = (float(b) for b in betas)
    return Fused(sign, float(coupled), float(decoupled), (beta1, beta2),
                 float(eps) * math.sqrt(1 - beta2**step), schedule_free)


def can_fuse(grads: Sequence[Tensor], params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]]) -> bool:
    """Whether every tensor is a CPU float32/float64 tensor of one dtype, each parameter dense in
    memory (contiguous or channels-last) and its gradient and state laid out as it is: the
    elements are then worked on in memory order, as flat views."""
    if not params or params[0].dtype not in (torch.float32, torch.float64):
        return False
    dtype = params[0].dtype
    for g, p, st in zip(grads, params, per_param):
        if not _dense(p):
            return False
        for t in itertools.chain((g, p), (t for t in st.values() if t.dim())):
            if not t.is_cpu or t.dtype != dtype:
                return False
            if t.shape == p.shape and t.stride() != p.stride():  # per-coordinate state (not the scalars)
                return False
        if g.shape != p.shape:
            return False
    return True


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


def _memory_order(t: Tensor) -> Tensor:
    """``t``'s elements in memory order as a 1-D view (``t`` dense, see :func:`can_fuse`)."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,), t.storage_offset())


@dataclass(frozen=True)
class Kept:
    """A batch of small tensors' six sums (see :func:`fused_statistics`), new ``v``, ``m`` (None:
    schedule-free) and direction ``u`` (fresh tensors; :func:`fused_apply` scales ``u`` in place)."""

    batch: list[int]
    sums: Tensor
    v: list[Tensor]
    m: list[Tensor] | None
    u: list[Tensor]


_SCRATCH = threading.local()


def _scratch(dtype: torch.dtype) -> Tensor:
    """``[3, SLAB]`` scratch, kept between steps per thread and dtype: a fresh buffer this large
    would be page-faulted in on every step."""
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    if dtype not in cache or cache[dtype].shape[1] != SLAB:
        cache[dtype] = torch.empty((3, SLAB), dtype=dtype)
    return cache[dtype]


def _groups(params: Sequence[Tensor]) -> tuple[list[int], list[list[int]]]:
    """Indices of the tensors to slice, and the others in batches of at most :data:`SMALL_BATCH` elements."""
    large, batches, size = [], [[]], 0
    for i, p in enumerate(params):
        n = p.numel()
        if n >= SLICED_FROM:
            large.append(i)
            continue
        if size + n > SMALL_BATCH:
            batches.append([])
            size = 0
        batches[-1].append(i)
        size += n
    return large, [b for b in batches if b]


def _slices(tensors: Sequence[Tensor], numel: int) -> Iterator[list[Tensor]]:
    """Aligned slices of :data:`SLAB` elements of the flattened ``tensors``."""
    flat = [_memory_order(t) for t in tensors]
    for start in range(0, numel, SLAB):
        yield [t[start:start + SLAB] for t in flat]


def _moving(st: Mapping[str, Tensor], c: Fused) -> Tensor:
    """The state tensor besides ``v`` that a step moves: ``z`` (schedule-free) or ``m``."""
    return st["z"] if c.schedule_free else st["exp_avg"]


def fused_statistics(grads: Sequence[Tensor], params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]],
                     c: Fused, with_stats: bool, bound: float) -> tuple[Tensor | None, Tensor, list[Kept]] | None:
    """The controller's statistics ``[n, 4]`` (``||g||, ||prev||, g·prev, ||p − p₀||``; None
    without ``with_stats``) and the norms ``[n, 2]`` of (scaled tensor, ``u``), as
    ``relative_scale.relative_directions`` defines them, and the small tensors' new moments and directions
    for :func:`fused_apply`; reads only. None when the group's gradient (sign and
    coupled decay applied) has a norm above ``bound`` or is not finite: the caller then takes the
    guarded path."""
    large, batches = _groups(params)
    work = _scratch(params[0].dtype)
    rows = []  # per tensor: ||g||², ||prev||², g·prev, ||p − p₀||², ||scaled||², ||u||²
    for i in large:
        st = per_param[i]
        row = [0.0] * 6
        for g, p, other, v, *p0 in _slices([grads[i], params[i], _moving(st, c), st["exp_avg_sq"],
                                            *([st["p0"]] if with_stats else [])], params[i].numel()):
            gbuf, a, s = (w[:g.numel()] for w in work[:3])
            gg = _gradient(g, p, gbuf, c)
            prev = torch.sub(p, other, out=a) if c.schedule_free else other
            if with_stats:
                row[1] += float(_square(prev))
                row[2] += float(torch.dot(gg, prev))
                row[3] += float(_square(torch.sub(p, p0[0], out=s)))
            row[0] += float(_square(gg))
            row[4] += float(_square(other if c.schedule_free else p))
            num = gg if c.schedule_free else torch.lerp(prev, gg, 1 - c.betas[0], out=a)
            v2 = torch.mul(v, c.betas[1], out=s).addcmul_(gg, gg, value=1 - c.betas[1])
            row[5] += float(_square(torch.div(num, v2.sqrt_().add_(c.eps_t), out=s)))
        rows.append(torch.tensor([row], dtype=torch.float64))
    kept = [_batch_statistics(batch, grads, params, per_param, c, with_stats) for batch in batches]
    order = large + [i for batch in batches for i in batch]
    sums = torch.cat(rows + [new.sums for new in kept])
    if order != list(range(len(params))):
        sums = sums[torch.tensor(order).argsort()]
    if not float(sums[:, 0].sum()) <= bound * bound:  # NaN fails too
        return None
    roots = sums.clamp_min(0.0).sqrt().to(params[0].dtype)
    stats = torch.stack([roots[:, 0], roots[:, 1], sums[:, 2].to(roots.dtype), roots[:, 3]], dim=-1)
    return (stats if with_stats else None), roots[:, 4:], kept


def _square(x: Tensor) -> Tensor:
    return torch.dot(x, x)


def _batch_statistics(batch: list[int], grads: Sequence[Tensor], params: Sequence[Tensor],
                      per_param: Sequence[Mapping[str, Tensor]], c: Fused, with_stats: bool) -> Kept:
    """:func:`fused_statistics`' six sums ``[len(batch), 6]`` of a batch of small tensors, and
    their new moments and directions (small: kept for :func:`fused_apply` rather than recomputed)."""
    g, p = [grads[i] for i in batch], [params[i] for i in batch]
    other = [_moving(per_param[i], c) for i in batch]
    gg = _batch_gradient(g, p, c)
    prev = torch._foreach_sub(p, other) if c.schedule_free else other
    v = torch._foreach_mul([per_param[i]["exp_avg_sq"] for i in batch], c.betas[1])
    torch._foreach_addcmul_(v, gg, gg, value=1 - c.betas[1])
    denom = torch._foreach_sqrt(v)
    torch._foreach_add_(denom, c.eps_t)
    m = None if c.schedule_free else torch._foreach_lerp(prev, gg, 1 - c.betas[0])
    u = torch._foreach_div(gg if m is None else m, denom)
    n = len(batch)
    normed = [gg, *([prev, torch._foreach_sub(p, [per_param[i]["p0"] for i in batch])] if with_stats else []),
              other if c.schedule_free else p, u]
    norms = torch.stack(torch._foreach_norm([x for xs in normed for x in xs])).view(len(normed), n).double()
    squares = norms.square()
    if with_stats:
        dots = torch.stack([torch.dot(_memory_order(x), _memory_order(y)) for x, y in zip(gg, prev)]).double()
        sums = torch.stack([squares[0], squares[1], dots, *squares[2:]], dim=-1)
    else:
        zeros = torch.zeros(n, dtype=torch.float64)
        sums = torch.stack([squares[0], zeros, zeros, zeros, *squares[1:]], dim=-1)
    return Kept(batch, sums, v, m, u)


def _gradient(g: Tensor, p: Tensor, out: Tensor, c: Fused) -> Tensor:
    """``sign·g + coupled·p`` of one slice (``g`` itself when that is the identity)."""
    if c.sign > 0:
        return torch.add(g, p, alpha=c.coupled, out=out) if c.coupled else g
    torch.neg(g, out=out)
    return out.add_(p, alpha=c.coupled) if c.coupled else out


def _batch_gradient(g: list[Tensor], p: list[Tensor], c: Fused) -> list[Tensor]:
    """:func:`_gradient` of a batch of small tensors."""
    if c.sign > 0:
        return torch._foreach_add(g, p, alpha=c.coupled) if c.coupled else g
    out = torch._foreach_neg(g)
    if c.coupled:
        torch._foreach_add_(out, p, alpha=c.coupled)
    return out


def fused_apply(grads: Sequence[Tensor], params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]],
                c: Fused, kept: Sequence[Kept], factors: Sequence[float], lerps: Sequence[float] | None,
                keeps: Sequence[float] | None) -> None:
    """Write the step: the moments, then (schedule-free) ``y ← y + lerp·(z − y)``, ``z ← z + f·u``,
    ``y ← y + keep·f·u``, else ``p ← p + f·u``; the decoupled shrink multiplies the old parameter.
    ``factors`` f per tensor (the relative scale, schedule and controller with ``−lr·α``)."""
    large, _ = _groups(params)
    work = _scratch(params[0].dtype)
    for i in large:
        st = per_param[i]
        for g, p, other, v in _slices([grads[i], params[i], _moving(st, c), st["exp_avg_sq"]], params[i].numel()):
            gbuf, s = (w[:g.numel()] for w in work[:2])
            gg = _gradient(g, p, gbuf, c)
            v.mul_(c.betas[1]).addcmul_(gg, gg, value=1 - c.betas[1])
            denom = torch.sqrt(v, out=s).add_(c.eps_t)
            if c.schedule_free:
                if c.decoupled:
                    p.mul_(1 - c.decoupled - lerps[i]).add_(other, alpha=lerps[i])
                else:
                    p.lerp_(other, lerps[i])
                other.addcdiv_(gg, denom, value=factors[i])
                p.addcdiv_(gg, denom, value=keeps[i] * factors[i])
            else:
                other.lerp_(gg, 1 - c.betas[0])
                if c.decoupled:
                    p.mul_(1 - c.decoupled)
                p.addcdiv_(other, denom, value=factors[i])
    for new in kept:
        _batch_apply(new, params, per_param, c, factors, lerps, keeps)


def _batch_apply(new: Kept, params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]], c: Fused,
                 factors: Sequence[float], lerps: Sequence[float] | None, keeps: Sequence[float] | None) -> None:
    """:func:`fused_apply` for a batch of small tensors, from their kept moments and directions."""
    batch, u = new.batch, new.u
    p = [params[i] for i in batch]
    torch._foreach_copy_([per_param[i]["exp_avg_sq"] for i in batch], new.v)
    if new.m is not None:
        torch._foreach_copy_([per_param[i]["exp_avg"] for i in batch], new.m)
    torch._foreach_mul_(u, [factors[i] for i in batch])
    if c.schedule_free:
        z = [per_param[i]["z"] for i in batch]
        pull = torch._foreach_sub(z, p)
        torch._foreach_mul_(pull, [lerps[i] for i in batch])
        torch._foreach_add_(z, u)
        torch._foreach_mul_(u, [keeps[i] for i in batch])
        torch._foreach_add_(u, pull)
    if c.decoupled:
        torch._foreach_mul_(p, 1 - c.decoupled)
    torch._foreach_add_(p, u)
