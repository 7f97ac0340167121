"""The hand-set adaptive-rate optimizers: the gradient-norm-triggered decay on SGD and Adam
directions, and hypergradient descent (SGD-HD, Adam-HD).

Each is a :class:`~learned_opt.adapter.LearnedOptimizer` over one rule of :mod:`learned_opt.rules`
whose hyperparameters are set by hand (the meta-trained presets load through
:func:`learned_opt.load_optimizer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from learned_opt.adapter import LearnedOptimizer
from learned_opt.rules.grad_norm_decay import (
    ABSOLUTE_DEFAULTS,
    RELATIVE_DEFAULTS,
    GradNormDecayAdamRule,
    GradNormDecayRule,
)
from learned_opt.rules.hypergradient import (
    NORMALIZED_HYPER_LR,
    PAPER_HYPER_LR,
    HypergradientAdamRule,
    HypergradientSGDRule,
)


def _decay_form(relative: Any, **given: Any) -> dict[str, Any]:
    """The gradient-norm decay's settings, each None replaced by its form's default (relative or absolute)."""
    defaults = RELATIVE_DEFAULTS if relative is True else ABSOLUTE_DEFAULTS
    return {k: defaults[k] if v is None else v for k, v in given.items()}


class GradNormDecaySGD(LearnedOptimizer):
    """SGD (heavy-ball ``momentum``) whose rate decays by ``decay`` when the gradient norm falls
    (:mod:`learned_opt.rules.grad_norm_decay`).

    ``lr`` is a multiplier (default 1.0) of the absolute initial rate ``init_lr``: the step is
    ``lr × init_lr × lr_factor × d``, so a scheduler's ``lr`` and the decay multiply.
    ``relative=True`` (default, scale-free): the decay fires when the group's gradient norm has
    stayed below ``threshold`` (ρ) × its reference (the first norm, then the norm at the last
    firing) for ``patience`` steps without a new low (``plateau=True``, default), at most once per
    ``cooldown`` steps; defaults
    :data:`~learned_opt.rules.grad_norm_decay.RELATIVE_DEFAULTS`. ``relative=False``: the seeds'
    literal rule ``if ||g|| < threshold: lr *= decay`` (defaults threshold 1e-3, decay 0.9,
    patience 1, cooldown 0). ``reference="peak"`` tests against the largest norm since the last
    firing instead of the first, ``plateau=False`` counts every step below the threshold (the rule
    before 2026-12-07; with the plateau test, plain gradient descent whose norm keeps falling keeps
    its rate, while momentum's oscillating norm can still fire), ``smoothing`` β averages the norm
    first, and ``blowup`` κ fires at
    once on a norm above κ × its average (a run starting to diverge), whose cuts ``blowup_recovery``
    r > 1 gives back by up to r per quiet step; the module documents them.
    The adapted factor, firing count and first firing step are
    ``opt.group_state(i)``'s ``lr_factor``, ``decay_count``, ``first_decay_step``.
    ``weight_decay`` is coupled (SGD's) unless ``decoupled_weight_decay=True`` (``p -= lr·init_lr·wd·p``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        decay: float | None = None,
        threshold: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        init_lr: float = 0.1,
        relative: bool = True,
        patience: int | None = None,
        cooldown: int | None = None,
        reference: str | None = None,
        smoothing: float | None = None,
        blowup: float | None = None,
        blowup_recovery: float = 1.0,
        plateau: bool | None = None,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        form = _decay_form(relative, decay=decay, threshold=threshold, patience=patience, cooldown=cooldown,
                           reference=reference, smoothing=smoothing, blowup=blowup, plateau=plateau)
        form["blowup_recovery"] = blowup_recovery
        super().__init__(params, GradNormDecayRule(), lr=lr, init_lr=init_lr, relative=relative, **form,
                         momentum=momentum, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)


class GradNormDecayAdam(LearnedOptimizer):
    """Adam whose rate decays by ``decay`` when the gradient norm falls: :class:`GradNormDecaySGD`'s
    rule and conventions (``lr`` a multiplier of ``init_lr``, ``relative``, ``patience``,
    ``cooldown``, ``reference``, ``plateau``, ``smoothing``, ``blowup``) on Adam's direction.
    ``decoupled_weight_decay=True`` makes ``weight_decay`` AdamW's (``p -= lr·init_lr·wd·p``)
    instead of Adam's L2.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        decay: float | None = None,
        threshold: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        init_lr: float = 1e-3,
        relative: bool = True,
        patience: int | None = None,
        cooldown: int | None = None,
        reference: str | None = None,
        smoothing: float | None = None,
        blowup: float | None = None,
        blowup_recovery: float = 1.0,
        plateau: bool | None = None,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        form = _decay_form(relative, decay=decay, threshold=threshold, patience=patience, cooldown=cooldown,
                           reference=reference, smoothing=smoothing, blowup=blowup, plateau=plateau)
        form["blowup_recovery"] = blowup_recovery
        super().__init__(params, GradNormDecayAdamRule(), lr=lr, init_lr=init_lr, relative=relative, **form,
                         betas=_pair(betas), eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)


def _pair(betas: Any) -> Any:
    """``betas`` as a tuple (a list is accepted, as torch does); anything else is left to validation."""
    return tuple(betas) if isinstance(betas, (tuple, list)) else betas


class HypergradientSGD(LearnedOptimizer):
    """SGD-HD (Baydin et al. 2018): SGD whose rate adapts online to the gradients' agreement.

    ``lr`` is a multiplier (default 1.0) of the absolute initial rate ``init_lr``: the step is
    ``lr × init_lr × lr_factor``, ``lr_factor`` (in ``opt.state[p]``) the adapted factor.
    ``normalized=True`` (default, scale-free): ``lr_factor`` moves by ``exp(hyper_lr · cos(g_t,
    u_{t-1}))`` (``hyper_lr`` default :data:`~learned_opt.rules.hypergradient.NORMALIZED_HYPER_LR`);
    ``normalized=False``: the paper's ``α ← max(0, α + hyper_lr · g_t·u_{t-1})`` (``hyper_lr``
    default 1e-3, in the loss's units). A scheduler scales ``lr``; when it lowers ``lr`` by a ratio
    r the factor becomes ``lr_factor^r``, so the adaptation fades with the decay and the rate follows
    the schedule (see :mod:`learned_opt.rules.hypergradient`). ``weight_decay`` is coupled unless
    ``decoupled_weight_decay=True`` (``p -= lr·init_lr·wd·p``, not the adapted rate). ``blowup`` κ > 1
    (default 3; 0 = off) also multiplies ``lr_factor`` by ``blowup_decay`` at each step whose gradient
    norm exceeds κ × its running average (``smoothing`` β, default 0.5): a guard against divergence,
    on by default as chosen on validation seeds. ``blowup_recovery`` r (default 1.1) gives the cuts
    back by up to r per step without a spike, so isolated minibatch spikes near zero loss do not add
    up; ``max_factor`` (0 = none) caps ``lr_factor``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        hyper_lr: float | None = None,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        init_lr: float = 0.01,
        normalized: bool = True,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        blowup: float = 3.0,
        smoothing: float = 0.5,
        blowup_decay: float = 0.5,
        blowup_recovery: float = 1.1,
        max_factor: float = 0.0,
    ) -> None:
        beta = _hyper_lr(hyper_lr, normalized, "sgd")
        super().__init__(params, HypergradientSGDRule(), lr=lr, init_lr=init_lr, hyper_lr=beta, momentum=momentum,
                         weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                         normalized=normalized, maximize=maximize, blowup=blowup, smoothing=smoothing,
                         blowup_decay=blowup_decay, blowup_recovery=blowup_recovery, max_factor=max_factor)


class HypergradientAdam(LearnedOptimizer):
    """Adam-HD (Baydin et al. 2018): Adam whose rate adapts online, as :class:`HypergradientSGD`
    (``lr`` a multiplier of ``init_lr``, default ``normalized=True``; the paper's form with
    ``normalized=False``, ``hyper_lr`` default 1e-7). ``decoupled_weight_decay=True`` makes
    ``weight_decay`` AdamW's (``p -= lr·init_lr·wd·p``) instead of Adam's L2; ``blowup``,
    ``smoothing``, ``blowup_decay``, ``blowup_recovery`` and ``max_factor`` are :class:`HypergradientSGD`'s guard
    (off by default here: on validation seeds it lowered this rule's wins, docs/ablations.md).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        hyper_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        init_lr: float = 1e-3,
        normalized: bool = True,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        blowup: float = 0.0,
        smoothing: float = 0.0,
        blowup_decay: float = 0.5,
        blowup_recovery: float = 1.0,
        max_factor: float = 0.0,
    ) -> None:
        beta = _hyper_lr(hyper_lr, normalized, "adam")
        super().__init__(params, HypergradientAdamRule(), lr=lr, init_lr=init_lr, hyper_lr=beta, betas=_pair(betas),
                         eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                         normalized=normalized, maximize=maximize, blowup=blowup, smoothing=smoothing,
                         blowup_decay=blowup_decay, blowup_recovery=blowup_recovery, max_factor=max_factor)


def _hyper_lr(hyper_lr: float | None, normalized: Any, direction: str) -> float:
    """The given β, or the default of the form: normalized's, or the paper's for ``direction``."""
    if hyper_lr is not None:
        return hyper_lr
    return NORMALIZED_HYPER_LR if normalized is True else PAPER_HYPER_LR[direction]
