"""The per-step transforms around a rule's update: the one update path of training and shipping.

:func:`apply_update` is called by both the ``torch.optim`` adapter (:mod:`learned_opt.optim`) and
the meta-training unroll (:mod:`learned_opt.meta.unroll`), so a rule is meta-trained on exactly
the update that ships. In the spirit of optax's ``chain``, one step is small composable pieces:

1. :func:`negate_if_maximize` and :func:`add_coupled_weight_decay` (``g + wd·p``) on the gradients;
2. the guard (:func:`check_gradients`): is every gradient of the group finite, and is the group's
   L2 norm at most :func:`norm_bound` (2^30 ≈ 1.1e9 in float32, 2^254 ≈ 2.9e76 in float64)? A
   larger finite gradient is rescaled to that norm, so no rule ever sees values whose
   squares, dot products or products of up to four gradient-sized factors overflow: any finite
   gradient gives finite parameters and state. Gradients this large are far outside training;
   the rescale only changes steps that would otherwise overflow or come close to it;
3. the rule's ``update``;
4. :func:`add_decoupled_weight_decay` (AdamW-style ``u − rate·wd·p``, ``rate`` the group's
   :func:`absolute_rate`: ``lr × init_lr`` for the hyperparameter rules, ``lr`` for the others);
5. the guard's verdict: a group with a non-finite gradient is skipped (zero updates, its state
   unchanged), as ``GradScaler`` skips a step.

Where the verdict can be read for free (every gradient on the CPU, not under ``torch.compile``)
the step branches on it: a skipped step never calls the rule, and a rule may write its state in
place. There, too, a rule with a fused step (:meth:`Rule.move_inplace`, the relative rules) may
take all of the above in one go and move the optimizer's parameters itself (``move=True``); it
declines, changing nothing, where the guard would have to act. Elsewhere (GPUs) nothing is read on the host: the rule sees the group's gradients zeroed
when one is non-finite, and its updates and state are selected with ``torch.where``, so a step
never waits for the device. A rule that can write its state in place (the LSTM) then writes a new
one, since a masked-out step must leave the old state intact. The two give the same results.

Every piece is differentiable (meta-training may pass hyperparameters as tensors): the bound's
scale is computed without a graph (a constant; 1 unless the gradients were rescaled), and a
skipped step's gradients are zeroed, not multiplied by zero, so no NaN reaches the meta-gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from learned_opt.rules.base import Rule, RuleState
from learned_opt.rules.directions import is_zero

# The step hyperparameters the transforms read (per param group), with their defaults; the rule's
# own hyperparameters are passed through to it, these are not.
STEP_DEFAULTS: dict[str, Any] = {"weight_decay": 0.0, "decoupled_weight_decay": False, "maximize": False}

Transform = Callable[[list[Tensor], Sequence[Tensor], Mapping[str, Any]], list[Tensor]]


class StepResult(NamedTuple):
    """One guarded step of a group: additive updates, the new rule state, and the guard's verdict.

    ``finite`` is a 0-dim bool tensor (False: the step was skipped); ``skipped`` is the same
    verdict when it was read on the host, None when the step was masked on the device.
    """

    updates: list[Tensor] | None  # None: the rule moved the parameters in place
    state: RuleState
    finite: Tensor
    skipped: bool | None


class GradientCheck(NamedTuple):
    """The guard's reading of a group's gradients (see :func:`check_gradients`)."""

    finite: Tensor  # 0-dim bool: every gradient finite
    scale: Tensor | None  # multiplies the gradients (None: leave them as they are)
    on_host: bool  # ``finite`` and ``scale`` were decided on the host


def chain(*transforms: Transform) -> Transform:
    """The transforms applied one after another, each to the previous one's output."""

    def apply(values: list[Tensor], params: Sequence[Tensor], hparams: Mapping[str, Any]) -> list[Tensor]:
        for transform in transforms:
            values = transform(values, params, hparams)
        return values

    return apply


def negate_if_maximize(grads: list[Tensor], params: Sequence[Tensor], hparams: Mapping[str, Any]) -> list[Tensor]:
    """``-g`` when ``hparams["maximize"]``: the rule then descends ``-loss``."""
    return [-g for g in grads] if hparams.get("maximize", False) else grads


def add_coupled_weight_decay(
    grads: list[Tensor], params: Sequence[Tensor], hparams: Mapping[str, Any]
) -> list[Tensor]:
    """``g + wd·p`` (L2 regularisation seen by the rule), unless the decay is decoupled."""
    wd = hparams.get("weight_decay", 0.0)
    if is_zero(wd) or hparams.get("decoupled_weight_decay", False):
        return grads
    return [_add_scaled(g, p, wd) for g, p in zip(grads, params)]


def add_decoupled_weight_decay(
    updates: list[Tensor], params: Sequence[Tensor], hparams: Mapping[str, Any]
) -> list[Tensor]:
    """``u − rate·wd·p`` (AdamW: the parameter shrinks by ``rate·wd`` per step, whatever the rule;
    ``rate`` is :func:`absolute_rate`, without any factor the rule adapts)."""
    wd = hparams.get("weight_decay", 0.0)
    if is_zero(wd) or not hparams.get("decoupled_weight_decay", False):
        return updates
    rate = absolute_rate(hparams) * wd
    return [_add_scaled(u, p, -rate) for u, p in zip(updates, params)]


def absolute_rate(hparams: Mapping[str, Any]) -> Any:
    """The group's scheduled rate: ``lr × init_lr`` (``init_lr``: a hyperparameter rule's base
    rate; rules without one, such as the LSTM, step at ``lr`` times their own learned scale)."""
    return hparams.get("lr", 1.0) * hparams.get("init_lr", 1.0)


def _add_scaled(x: Tensor, y: Tensor, alpha: Tensor | float) -> Tensor:
    """``x + alpha·y`` (one fused op for a plain number; differentiable in a tensor ``alpha``)."""
    return x + alpha * y if isinstance(alpha, Tensor) else x.add(y, alpha=alpha)


prepare_gradients = chain(negate_if_maximize, add_coupled_weight_decay)
finish_updates = chain(add_decoupled_weight_decay)


def norm_bound(dtypes: Iterable[torch.dtype]) -> float:
    """The largest group gradient norm passed to a rule unscaled: a quarter of the fourth root of
    the largest value of the narrowest dtype (float32 at least: narrower gradients are stepped in
    float32), a power of two (2^30 in float32, 2^254 in float64), so sums of up to fourth powers
    of the group's gradients stay below ``max / 256``."""
    max_exponent = min(math.frexp(torch.finfo(_reduction_dtype(d)).max)[1] for d in dtypes)
    return 2.0 ** (max_exponent // 4 - 2)


def _reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient's norms are computed in: its own, float32 at least."""
    return dtype if torch.finfo(dtype).bits >= 32 else torch.float32


def host_read_is_free(grads: Sequence[Tensor]) -> bool:
    """Whether reading the guard's verdict on the host costs nothing and is possible (no device to
    wait for, no ``torch.compile`` graph to break, no ``torch.func`` transform such as the batched
    meta-training engine's ``vmap``): then the step branches on it instead of masking."""
    return (all(g.device.type == "cpu" and not _functorch_wrapped(g) for g in grads)
            and not torch.compiler.is_compiling())


_IS_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _functorch_wrapped(t: Tensor) -> bool:
    return bool(_IS_WRAPPED(t)) if _IS_WRAPPED is not None else False


@torch.no_grad()
def check_gradients(grads: Sequence[Tensor], *, on_host: bool) -> GradientCheck:
    """Whether a group's gradients are all finite, and the scale that bounds their norm.

    The L2 norm alone answers the common case (finite and at most the bound, or NaN/inf when an
    entry is); the largest magnitude tells a non-finite entry from a norm whose square overflowed.
    ``on_host``: read the answers on the host (one reduction per gradient in the common case).
    """
    bound = norm_bound({g.dtype for g in grads})
    norm = _group_norm(grads)
    within = norm <= bound
    if on_host and bool(within):
        return GradientCheck(within, None, True)
    amax = _group_amax(grads, norm)
    finite = torch.isfinite(amax)
    scale = _bounding_scale(norm, amax, sum(g.numel() for g in grads), bound)
    if on_host:
        return GradientCheck(finite, scale if bool(finite) else None, True)
    return GradientCheck(finite, scale, False)


@torch.no_grad()
def gradients_pass_guard(grads: Sequence[Tensor]) -> bool:
    """Whether every gradient is finite and their norm taken together is within :func:`norm_bound`:
    then the guard leaves any group drawn from them unchanged, since no subset's norm is larger.
    A batched population's gradients (members along dim 0) are checked this way once per step, on
    the host, instead of each member's step masking its results (``apply_update(checked=True)``)."""
    grads = list(grads)
    return bool(_group_norm(grads) <= norm_bound({g.dtype for g in grads})) if grads else True


def _group_norm(grads: Sequence[Tensor]) -> Tensor:
    """The group's L2 norm, in its widest dtype: inf when a square overflows, NaN/inf with NaN/inf."""
    norms = [torch.linalg.vector_norm(g, dtype=_reduction_dtype(g.dtype)) for g in grads]
    wide = max((n.dtype for n in norms), key=lambda d: torch.finfo(d).max)
    return torch.linalg.vector_norm(torch.stack([n.to(wide) for n in norms]))


def _group_amax(grads: Sequence[Tensor], like: Tensor) -> Tensor:
    """The largest ``|g|`` of the group (NaN when any entry is NaN), on ``like``'s dtype/device."""
    amaxes = [torch.linalg.vector_norm(g, math.inf).to(like.dtype) for g in grads if g.numel()]
    return torch.stack(amaxes).amax() if amaxes else torch.zeros_like(like)


def _bounding_scale(norm: Tensor, amax: Tensor, numel: int, bound: float) -> Tensor:
    """The factor that brings the group's norm to at most ``bound`` (1 when it already is, or when
    a gradient is non-finite). When the norm itself overflowed, ``amax·sqrt(numel)`` bounds it."""
    exact = bound / norm.clamp_min(bound)
    overflowed = bound / amax.clamp_min(bound) / math.sqrt(max(numel, 1))
    scale = torch.where(torch.isfinite(norm), exact, overflowed)
    return torch.where(torch.isfinite(amax), scale, torch.ones_like(scale))


def bound_gradients(grads: list[Tensor], check: GradientCheck) -> list[Tensor]:
    """The gradients a rule sees: rescaled by the check's scale; on the device path also zeroed
    when the group is not finite (so a masked-out step computes, and differentiates, finite values)."""
    if check.on_host:
        return grads if check.scale is None else [g * check.scale.to(g.dtype) for g in grads]
    assert check.scale is not None
    return [torch.where(check.finite, g, 0.0) * check.scale.to(g.dtype) for g in grads]


def rule_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters passed to the rule itself (all but the step transforms' own)."""
    return {k: v for k, v in hparams.items() if k not in STEP_DEFAULTS}


def apply_update(
    rule: Rule,
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    state: RuleState,
    hparams: Mapping[str, Any],
    *,
    inplace: bool = False,
    checked: bool = False,
    move: bool = False,
) -> StepResult:
    """One step of ``rule`` for a group, through every transform (see the module docstring).

    ``hparams``: the rule's hyperparameters plus any of :data:`STEP_DEFAULTS`' keys (missing ones
    take their defaults). ``inplace``: the caller gives ``state`` up, so the rule may write its new
    state over it (:meth:`Rule.update_inplace`). ``checked``: the caller has found with
    :func:`gradients_pass_guard` that the guard leaves these gradients as they are, so the step
    takes the host branch without checking (inside ``vmap`` too, where the guard would otherwise
    mask every update and state tensor); gradients that a transform changes (``maximize``, coupled
    weight decay) are checked all the same. Never mutates ``grads``; never mutates ``params``
    unless ``move``: the caller (the optimizer on the CPU) lets a rule with a fused path move them
    in place (:meth:`Rule.move_inplace`), and then ``updates`` is None.
    """
    given = list(grads)
    if move and getattr(type(rule), "move_inplace", Rule.move_inplace) is not Rule.move_inplace \
            and host_read_is_free(given):
        moved = rule.move_inplace(given, params, state, rule_hparams(hparams), move_settings(hparams, given))
        if moved is not None:
            return StepResult(None, moved, torch.ones((), dtype=torch.bool), False)
    grads = prepare_gradients(given, params, hparams)
    checked = checked and all(a is b for a, b in zip(grads, given))  # a transform's output is checked anew
    check = (GradientCheck(torch.ones((), dtype=torch.bool), None, True) if checked
             else check_gradients(grads, on_host=host_read_is_free(grads)))
    if check.on_host and not bool(check.finite):
        return StepResult([torch.zeros_like(p) for p in params], state, check.finite, True)
    update = rule.update_inplace if inplace and check.on_host else rule.update
    updates, new_state = update(bound_gradients(grads, check), params, state, rule_hparams(hparams))
    updates = finish_updates(updates, params, hparams)
    if check.on_host:
        return StepResult(updates, new_state, check.finite, False)
    return StepResult(_masked(check.finite, updates), _kept(check.finite, new_state, state), check.finite, None)


def move_settings(hparams: Mapping[str, Any], grads: Sequence[Tensor]) -> dict[str, float]:
    """The step transforms as numbers for :meth:`Rule.move_inplace` (see there)."""
    wd = float(hparams.get("weight_decay", 0.0))
    decoupled = bool(hparams.get("decoupled_weight_decay", False))
    return {"sign": -1.0 if hparams.get("maximize", False) else 1.0, "coupled": 0.0 if decoupled else wd,
            "decoupled": float(absolute_rate(hparams)) * wd if decoupled else 0.0,
            "bound": norm_bound({g.dtype for g in grads})}


def _masked(finite: Tensor, updates: list[Tensor]) -> list[Tensor]:
    return [torch.where(finite, u, 0.0) for u in updates]


def _kept(finite: Tensor, new: RuleState, old: RuleState) -> RuleState:
    """``new`` where the step was taken, else ``old``. A key only ``new`` has (a buffer a rule
    creates at its first step, such as a momentum buffer) keeps the value the zeroed gradients
    gave it, where the host branch would not have created it yet."""

    def select(new_dict: Mapping[str, Tensor], old_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.where(finite, v, old_dict[k]) if k in old_dict else v for k, v in new_dict.items()}

    (new_group, new_per_param), (old_group, old_per_param) = new, old
    return select(new_group, old_group), [select(n, o) for n, o in zip(new_per_param, old_per_param)]


@torch.no_grad()
def bound_optimizer_gradients(optimizer: torch.optim.Optimizer, *_hook_args: Any) -> None:
    """A ``torch.optim`` step pre-hook: each group's gradients bounded in place as
    :func:`apply_update` bounds them, for a plain torch optimizer (``load_optimizer``'s
    ``learnable-adam``/``-sgd``). Non-finite gradients are left to the optimizer."""
    for group in optimizer.param_groups:
        grads = [p.grad for p in group["params"] if p.grad is not None and not p.grad.is_sparse]
        if not grads:
            continue
        check = check_gradients(grads, on_host=host_read_is_free(grads))
        if check.scale is not None:
            for g in grads:
                g.mul_(check.scale.to(g.dtype))
