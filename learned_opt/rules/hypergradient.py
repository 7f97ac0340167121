"""Hypergradient descent (Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient
Descent"): SGD-HD and Adam-HD with one adapted rate per param group.

The rate is ``α_t = lr_t × init_lr × f_t``: ``init_lr`` the base rate, ``lr_t`` the group's
multiplier (what a scheduler changes) and ``f_t`` the adapted factor (``opt.state[p]["lr_factor"]``,
starting at 1). With ``u_{t-1}`` the previous direction (the gradient for plain SGD, the momentum
buffer with momentum, Adam's ``m̂/(sqrt(v̂)+eps)`` for Adam-HD), the factor adapts by

- ``normalized=True`` (the public optimizers' default, scale-free): ``f_t = f_{t-1}^r ·
  exp(β cos(g_t, u_{t-1}))``: β is a log-rate change per step whatever the loss's scale
  (cos = 0 while either vector is all zero);
- ``normalized=False`` (the paper's exact form): ``f_t = max(0, f_{t-1}^r + β g_t·u_{t-1} / (lr_t
  init_lr))``, the paper's step ``α ← α + β g·u`` on the rate, in the loss's units (so one β cannot
  suit tasks whose gradients differ by orders of magnitude: β = 1e-3 diverges on a least-squares
  problem with loss ~150 where SGD at the same rate converges). The rate never goes negative.

Schedules: an external scheduler owns the rate's envelope. ``r = min(1, lr_t / lr_{t-1})`` (group
state ``prev_lr``) is 1 while ``lr`` is constant or rising, so the trajectory is exactly the rule
above; when a schedule lowers ``lr`` by a ratio r, the factor's log shrinks by that ratio too
(``f^r``), so the adaptation made at the higher rate fades with the decay instead of undoing it:
near the end of a decay-to-zero schedule ``f`` is within ``e^β`` per step of 1 and the rate is the
schedule's (tested: within 2× over the last tenth of a cosine schedule). ``lr = 0`` freezes the
parameters and the factor.

Blow-up guard (``blowup`` κ > 1; 0 = off, the rule above): at a step whose gradient norm is above κ ×
its running average (:mod:`learned_opt.rules.blowup`, ``smoothing`` β), the factor is also
multiplied by ``blowup_decay``. The hypergradient lowers a rate at most e^{-β} per step, too slowly
to stop momentum SGD's blow-up once a classifier's logits grow (docs/ablations.md); the guard cuts
it at each step the norm outgrows its own average. Near zero loss a minibatch norm spikes now and
then (one misfit example in a batch of fitted ones), and those cuts would add up (on a digits MLP,
600 steps: 40 cuts, factor 1e-11); ``blowup_recovery`` r > 1 gives them back, by up to r per step
without a spike, while a divergence, spiking step after step or every other step, stays cut. Group
state ``norm_avg`` (0 before the first step) and ``guard_debt`` (the cuts not yet given back).
``max_factor`` (0 = none) caps the factor: once a separable task's loss reaches zero its successive
directions stay aligned and the normalized factor grows without bound (past 10^6 at 10× the
held-out horizons), until one large gradient blows the run up.

Rule defaults (a card without ``normalized`` was trained in the paper's form): ``normalized=False``
with the paper's β = 1e-3 (SGD-HD) and 1e-7 (Adam-HD); the public optimizers default to
``normalized=True`` with :data:`NORMALIZED_HYPER_LR`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState, check_bool, check_in_range, check_nonnegative, check_number, scalar_like
from learned_opt.rules.blowup import check_blowup, norm_average, settle, spike
from learned_opt.rules.directions import adam_direction, group_dot, momentum_direction, safe_sqrt
from learned_opt.rules.hparam_base import HyperparameterRule, check_betas, log_param, logit_param
from learned_opt.rules.transforms import absolute_rate


# β of the normalized form (a log-rate change per step): the factor can move e^5 ≈ 150× in 100
# aligned steps. Chosen on the contract problems and a least-squares example (docs/optimizers.md).
NORMALIZED_HYPER_LR = 0.05
# The paper's β (Baydin et al. 2018): the rules' defaults, in the loss's units.
PAPER_HYPER_LR = {"sgd": 1e-3, "adam": 1e-7}
# The blow-up guard's settings and their defaults (off: the rule as older cards ran it).
GUARD_DEFAULTS: dict[str, float] = {"blowup": 0.0, "smoothing": 0.0, "blowup_decay": 0.5, "blowup_recovery": 1.0,
                                    "max_factor": 0.0}
GUARD_KEYS = frozenset({*GUARD_DEFAULTS, "norm_avg", "guard_debt"})


def schedule_ratio(lr: Tensor | float, prev_lr: Tensor) -> tuple[Tensor, Tensor]:
    """``(r, lr)``: how much the group's ``lr`` fell since the previous step, ``min(1, lr/prev_lr)``
    (1 at the first step, after an lr of 0, and while lr rises), and this step's lr as a tensor."""
    lr_t = scalar_like(lr, prev_lr)
    positive = prev_lr > 0
    ratio = torch.where(positive, lr_t / torch.where(positive, prev_lr, torch.ones_like(prev_lr)), 1.0)
    return ratio.clamp_max(1.0), lr_t


def hypergradient_factor(
    factor: Tensor,
    grads: Sequence[Tensor],
    prev_dirs: Sequence[Tensor],
    rate: Tensor | float,
    hyper_lr: Tensor | float,
    normalized: bool = False,
    ratio: Tensor | float = 1.0,
    grad_sq: Tensor | None = None,
) -> Tensor:
    """The adapted factor after one hypergradient step; ``rate = lr × init_lr = 0`` keeps it.

    The factor is first faded by the schedule, ``f^r``; then paper: ``max(0, f^r + β (g·u_prev) /
    rate)``; ``normalized``: ``f^r · exp(β cos(g, u_prev))`` (cos = 0 while either is all zero).
    """
    h = group_dot(grads, prev_dirs)
    rate_t = scalar_like(rate, factor)
    positive = rate_t > 0
    faded = factor**ratio
    if normalized:
        gg = group_dot(grads, grads) if grad_sq is None else grad_sq
        norms = (gg * group_dot(prev_dirs, prev_dirs)).clamp_min(1e-30).sqrt()
        new = faded * torch.exp(hyper_lr * h / norms)
    else:
        new = (faded + hyper_lr * h / torch.where(positive, rate_t, torch.ones_like(rate_t))).clamp_min(0.0)
    return torch.where(positive, new, factor)


def adapted_rate(
    group_state: Mapping[str, Tensor], grads: Sequence[Tensor], prev_dirs: Sequence[Tensor],
    hparams: Mapping[str, Any],
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(α_t, new group entries)``: the step size ``lr × init_lr × f_t`` of the module docstring,
    with the new ``lr_factor`` and ``prev_lr``."""
    rate = absolute_rate(hparams)
    ratio, lr = schedule_ratio(hparams.get("lr", 1.0), group_state["prev_lr"])
    normalized, guarded = bool(hparams.get("normalized", False)), float(hparams.get("blowup", 0.0)) > 0
    grad_sq = group_dot(grads, grads) if normalized or guarded else None  # one pass serves both
    factor = hypergradient_factor(group_state["lr_factor"], grads, prev_dirs, rate, hparams["hyper_lr"],
                                  normalized, ratio, grad_sq)
    new = {"prev_lr": lr}
    if guarded:
        factor, guard_state = _guarded(factor, safe_sqrt(grad_sq), group_state, rate, ratio, hparams)
        new.update(guard_state)
    cap = float(hparams.get("max_factor", 0.0))
    if cap > 0:
        factor = factor.clamp_max(cap)
    return rate * factor, {**new, "lr_factor": factor}


def _guarded(factor: Tensor, norm: Tensor, group_state: Mapping[str, Tensor], rate: Tensor | float,
             ratio: Tensor | float, hparams: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
    """``(factor, new group entries)`` after the blow-up guard (module docstring); ``rate = 0`` keeps
    the factor. ``guard_debt`` is the product of the cuts not yet given back: each step without a
    spike gives back up to ``blowup_recovery`` of it. A schedule that lowers ``lr`` by a ratio r
    fades the debt as it fades the factor (``debt^r``), so no more is given back than remains cut."""
    prev_avg = group_state.get("norm_avg", torch.zeros_like(norm))
    first = prev_avg <= 0
    spiked = spike(norm, prev_avg, first, float(hparams["blowup"]))
    moving = scalar_like(rate, factor) > 0
    debt = group_state.get("guard_debt", torch.ones_like(norm)) ** ratio  # faded with the factor by a schedule
    give, new_debt = settle(spiked, debt, hparams.get("blowup_decay", GUARD_DEFAULTS["blowup_decay"]),
                            float(hparams.get("blowup_recovery", 1.0)))
    return torch.where(moving, factor * give, factor), {
        "norm_avg": norm_average(norm, prev_avg, first, float(hparams.get("smoothing", 0.0))),
        "guard_debt": torch.where(moving, new_debt, debt)}


def check_guard(hparams: Mapping[str, Any]) -> None:
    """ValueError unless the blow-up guard's settings are valid (``blowup_decay`` in (0, 1])."""
    check_blowup(hparams)
    check_nonnegative("max_factor", hparams.get("max_factor", 0.0))
    decay = check_number("blowup_decay", hparams.get("blowup_decay", GUARD_DEFAULTS["blowup_decay"]))
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"invalid blowup_decay: {hparams['blowup_decay']!r} (must be in (0, 1])")


def _guard_config(blowup: float, smoothing: float, blowup_decay: float, blowup_recovery: float,
                  max_factor: float) -> dict[str, float]:
    """The blow-up guard's fixed config (not θ), validated."""
    guard = {"blowup": float(blowup), "smoothing": float(smoothing), "blowup_decay": float(blowup_decay),
             "blowup_recovery": float(blowup_recovery), "max_factor": float(max_factor)}
    check_guard(guard)
    return guard


def _group_init(params: Sequence[Tensor], with_step: bool) -> dict[str, Tensor]:
    like = params[0] if params else torch.zeros(())
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    state = {"lr_factor": zero + 1, "prev_lr": zero.clone(), "norm_avg": zero.clone(), "guard_debt": zero + 1}
    if with_step:
        state["step"] = zero.clone()
    return state


class HypergradientSGDRule(HyperparameterRule):
    """SGD-HD. θ: log initial lr, log hyper-lr; momentum is a fixed config value.

    Per-parameter state: ``prev_dir`` (u_{t-1}) and, with momentum, ``momentum_buffer``; group
    state ``lr_factor``, ``prev_lr``.
    """

    name: ClassVar[str] = "hypergradient-sgd"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0, "init_lr": 0.01, "hyper_lr": PAPER_HYPER_LR["sgd"],
                                                 "momentum": 0.0, "normalized": False, **GUARD_DEFAULTS}
    added_keys: ClassVar[frozenset[str]] = GUARD_KEYS

    def __init__(self, init_lr: float = 0.01, init_hyper_lr: float = PAPER_HYPER_LR["sgd"], momentum: float = 0.0,
                 normalized: bool = False, blowup: float = 0.0, smoothing: float = 0.0,
                 blowup_decay: float = GUARD_DEFAULTS["blowup_decay"], blowup_recovery: float = 1.0,
                 max_factor: float = 0.0) -> None:
        super().__init__()
        check_in_range("momentum", momentum, 0.0, 1.0)
        self.log_lr = log_param(init_lr, "init_lr")
        self.log_hyper_lr = log_param(init_hyper_lr, "init_hyper_lr")
        self.momentum = float(momentum)
        self.normalized = check_bool("normalized", normalized)
        self.guard = _guard_config(blowup, smoothing, blowup_decay, blowup_recovery, max_factor)

    def config(self) -> dict[str, Any]:
        return {
            "init_lr": float(self.log_lr.detach().exp()),
            "init_hyper_lr": float(self.log_hyper_lr.detach().exp()),
            "momentum": self.momentum,
            "normalized": self.normalized,
            **self.guard,
        }

    def meta_hparams(self) -> dict[str, Tensor | float]:
        return {"init_lr": self.log_lr.exp(), "hyper_lr": self.log_hyper_lr.exp(), "momentum": self.momentum,
                "normalized": self.normalized, **self.guard}

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        super().validate_hparams(hparams)
        check_guard(hparams)

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        return _group_init(params, with_step=False), [{"prev_dir": torch.zeros_like(p)} for p in params]

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        group_state, per_param = state
        alpha, adapted = adapted_rate(group_state, grads, [st["prev_dir"] for st in per_param], hparams)
        updates, new_per_param = [], []
        for g, st in zip(grads, per_param):
            direction, buf = momentum_direction(g, st.get("momentum_buffer"), hparams.get("momentum", 0.0))
            updates.append(direction * -alpha)
            new_st = {"prev_dir": direction}
            if buf is not None:
                new_st["momentum_buffer"] = buf
            new_per_param.append(new_st)
        return updates, ({**group_state, **adapted}, new_per_param)


class HypergradientAdamRule(HyperparameterRule):
    """Adam-HD. θ: log initial lr, log hyper-lr, logit betas, log eps.

    Per-parameter state: ``exp_avg``, ``exp_avg_sq``, ``prev_dir``; group state ``step``,
    ``lr_factor``, ``prev_lr``.
    """

    name: ClassVar[str] = "hypergradient-adam"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0, "init_lr": 1e-3, "hyper_lr": PAPER_HYPER_LR["adam"],
                                                 "betas": (0.9, 0.999), "eps": 1e-8, "normalized": False,
                                                 **GUARD_DEFAULTS}
    added_keys: ClassVar[frozenset[str]] = GUARD_KEYS

    def __init__(
        self,
        init_lr: float = 1e-3,
        init_hyper_lr: float = PAPER_HYPER_LR["adam"],
        init_betas: tuple[float, float] = (0.9, 0.999),
        init_eps: float = 1e-8,
        normalized: bool = False,
        blowup: float = 0.0,
        smoothing: float = 0.0,
        blowup_decay: float = GUARD_DEFAULTS["blowup_decay"],
        blowup_recovery: float = 1.0,
        max_factor: float = 0.0,
    ) -> None:
        super().__init__()
        self.normalized = check_bool("normalized", normalized)
        self.guard = _guard_config(blowup, smoothing, blowup_decay, blowup_recovery, max_factor)
        check_betas(init_betas)
        self.log_lr = log_param(init_lr, "init_lr")
        self.log_hyper_lr = log_param(init_hyper_lr, "init_hyper_lr")
        self.logit_beta1 = logit_param(init_betas[0], "init_betas[0]")
        self.logit_beta2 = logit_param(init_betas[1], "init_betas[1]")
        self.log_eps = log_param(init_eps, "init_eps")

    def config(self) -> dict[str, Any]:
        hp = self.optimizer_defaults()
        return {
            "init_lr": hp["init_lr"],
            "init_hyper_lr": hp["hyper_lr"],
            "init_betas": list(hp["betas"]),
            "init_eps": hp["eps"],
            "normalized": self.normalized,
            **self.guard,
        }

    def meta_hparams(self) -> dict[str, Tensor | float]:
        return {
            "init_lr": self.log_lr.exp(),
            "hyper_lr": self.log_hyper_lr.exp(),
            "betas": (torch.sigmoid(self.logit_beta1), torch.sigmoid(self.logit_beta2)),
            "eps": self.log_eps.exp(),
            "normalized": self.normalized,
            **self.guard,
        }

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        super().validate_hparams(hparams)
        check_guard(hparams)

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        per_param = [
            {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "prev_dir": torch.zeros_like(p)}
            for p in params
        ]
        return _group_init(params, with_step=True), per_param

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        group_state, per_param = state
        step = group_state["step"] + 1
        alpha, adapted = adapted_rate(group_state, grads, [st["prev_dir"] for st in per_param], hparams)
        updates, new_per_param = [], []
        for g, st in zip(grads, per_param):
            direction, m, v = adam_direction(g, st["exp_avg"], st["exp_avg_sq"], step, hparams["betas"], hparams["eps"])
            updates.append(direction * -alpha)
            new_per_param.append({"exp_avg": m, "exp_avg_sq": v, "prev_dir": direction})
        return updates, ({**group_state, **adapted, "step": step}, new_per_param)
