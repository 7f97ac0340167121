"""The public optimizers: the LSTM and MLP learned optimizers, the hand-set adaptive-rate rules,
relative Adam, and :func:`load_optimizer` for any shipped or exported weights.

Each is a :class:`~learned_opt.adapter.LearnedOptimizer` over one rule of :mod:`learned_opt.rules`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from learned_opt.adapter import LearnedOptimizer
from learned_opt.rules.base import Rule
from learned_opt.rules.base import check_nonnegative
from learned_opt.rules.grad_norm_decay import (
    ABSOLUTE_DEFAULTS,
    RELATIVE_DEFAULTS,
    GradNormDecayAdamRule,
    GradNormDecayRule,
)
from learned_opt.rules.hparam_base import HyperparameterRule
from learned_opt.rules.hypergradient import (
    NORMALIZED_HYPER_LR,
    PAPER_HYPER_LR,
    HypergradientAdamRule,
    HypergradientSGDRule,
)
from learned_opt.rules.learnable import LearnableAdamRule, LearnableSGDRule
from learned_opt.rules.lstm import LSTMRule
from learned_opt.rules.mlp import MLPRule
from learned_opt.rules.relative import RelativeAdamRule
from learned_opt.rules.transforms import bound_optimizer_gradients
from learned_opt.weights import load_rule, weights_for_run

class LSTMOptimizer(LearnedOptimizer):
    """The coordinate-wise LSTM optimizer (Andrychowicz et al. 2016) as a ``torch.optim.Optimizer``.

    ``weights``: a shipped name (default ``"lstm-general"``), a ``.safetensors`` path, an
    ``LSTMRule`` instance, or ``None`` for an explicitly *untrained* rule (meta-training's start).
    ``lr`` multiplies the learned update: 1.0 is the step the LSTM was trained to take, 0 freezes.
    The loaded card is ``self.card`` (None for an instance or ``weights=None``).
    ``weight_decay`` is coupled (added to the gradient the LSTM reads) unless
    ``decoupled_weight_decay=True`` (AdamW-style: ``p -= lr·weight_decay·p`` each step, so with
    ``lr=1`` the decay per step is ``weight_decay`` itself: use small values, e.g. 1e-4).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        weights: str | Path | Rule | None = "lstm-general",
        *,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        _init_with_weights(self, params, weights, LSTMRule, lr=lr, weight_decay=weight_decay,
                           decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)


class MLPOptimizer(LearnedOptimizer):
    """The per-coordinate MLP learned optimizer (:mod:`learned_opt.rules.mlp`) as a ``torch.optim.Optimizer``.

    ``weights`` (required: no MLP weights ship; the shipped ``default`` is a meta-trained
    hypergradient Adam, which beat this rule on the validation split, see docs/ablations.md): a
    ``.safetensors`` path, an ``MLPRule`` instance, or ``None`` for an explicitly *untrained* rule (meta-training's start: tiny steps,
    or exactly Adam(1e-3) with ``MLPRule(adam_residual=True)``). ``lr`` multiplies the learned
    update: 1.0 is the step the rule was trained to take, 0 freezes. The loaded card is
    ``self.card`` (None for an instance or ``weights=None``). ``weight_decay`` is coupled unless
    ``decoupled_weight_decay=True`` (``p -= lr·weight_decay·p`` per step), as for :class:`LSTMOptimizer`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        *,
        weights: str | Path | Rule | None,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        _init_with_weights(self, params, weights, MLPRule, lr=lr, weight_decay=weight_decay,
                           decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)


def _init_with_weights(opt: LearnedOptimizer, params: Any, weights: str | Path | Rule | None, rule_cls: type[Rule],
                       **settings: Any) -> None:
    """Initialise a weights-backed optimizer: its rule and ``card`` from ``weights``, then the adapter."""
    rule, opt.card = _rule_from_weights(weights, rule_cls, type(opt).__name__)
    sha = opt.card["sha256"] if opt.card else None
    LearnedOptimizer.__init__(opt, params, rule, weights_sha256=sha, **settings)


def _rule_from_weights(
    weights: str | Path | Rule | None, rule_cls: type[Rule], optimizer: str
) -> tuple[Rule, dict[str, Any] | None]:
    """(rule, card) for a public optimizer's ``weights`` argument; the card is None unless loaded from disk.

    ``None`` builds an untrained ``rule_cls()``; weights of another rule raise ValueError.
    """
    card = None
    if weights is None:
        rule: Rule = rule_cls()
    elif isinstance(weights, Rule):
        rule = weights
    else:
        rule, card = load_rule(weights)
    if not isinstance(rule, rule_cls):
        raise ValueError(
            f"{optimizer} needs {rule_cls.name!r} weights, but {weights!r} holds rule {rule.name!r}; "
            "use learned_opt.load_optimizer for other rules"
        )
    return rule, card


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
    firing) for ``patience`` steps, at most once per ``cooldown`` steps; defaults
    :data:`~learned_opt.rules.grad_norm_decay.RELATIVE_DEFAULTS`. ``relative=False``: the seeds'
    literal rule ``if ||g|| < threshold: lr *= decay`` (defaults threshold 1e-3, decay 0.9,
    patience 1, cooldown 0). ``reference="peak"`` tests against the largest norm since the last
    firing instead of the first, ``smoothing`` β averages the norm first, and ``blowup`` κ fires at
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
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        form = _decay_form(relative, decay=decay, threshold=threshold, patience=patience, cooldown=cooldown,
                           reference=reference, smoothing=smoothing, blowup=blowup)
        form["blowup_recovery"] = blowup_recovery
        super().__init__(params, GradNormDecayRule(), lr=lr, init_lr=init_lr, relative=relative, **form,
                         momentum=momentum, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)


class GradNormDecayAdam(LearnedOptimizer):
    """Adam whose rate decays by ``decay`` when the gradient norm falls: :class:`GradNormDecaySGD`'s
    rule and conventions (``lr`` a multiplier of ``init_lr``, ``relative``, ``patience``,
    ``cooldown``, ``reference``, ``smoothing``, ``blowup``) on Adam's direction.
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
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        form = _decay_form(relative, decay=decay, threshold=threshold, patience=patience, cooldown=cooldown,
                           reference=reference, smoothing=smoothing, blowup=blowup)
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


class RelativeAdam(LearnedOptimizer):
    """Parameter-relative Adam, hand-set: each step moves a tensor by ``α · s(t)`` of its own RMS
    along Adam's direction (:mod:`learned_opt.rules.relative`), untuned across tasks.

    ``lr`` multiplies the rule's own rate (1.0 = ``alpha``), so schedulers scale it. ``total_steps``
    (optional, as ``OneCycleLR``'s) turns on the warm-up + cosine schedule over the run; without it
    the step stays at ``alpha`` after a short warm-up (``warmup × 200`` steps).
    ``floor`` keeps zero-initialised tensors (biases) moving: the step scale is ``RMS(p) + floor``;
    ``floor_vec``, when given, is the floor of vectors and scalars (biases, gains) instead.
    ``final`` is where the told cosine ends, as a fraction of the peak step (0: at zero).
    ``schedule_free=True``: the schedule-free form (Defazio et al. 2024; the step moves a base sequence
    ``z`` along ``g/√v̂`` and the model is evaluated at the running average of ``z``): call
    ``optimizer.eval()`` before evaluating or saving the model and ``optimizer.train()`` before
    training again, as with ``schedulefree``'s optimizers (``betas[0]`` is the interpolation).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        alpha: float = 0.03,
        total_steps: int | None = None,
        warmup: float = 0.05,
        floor: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        floor_vec: float | None = None,
        final: float = 0.0,
        schedule_free: bool = False,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            RelativeAdamRule(schedule_free),
            floor_vec=floor_vec,
            final=final,
            lr=lr,
            alpha=alpha,
            total_steps=total_steps,
            warmup=warmup,
            floor=floor,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        )
        if any(g["final"] and g["total_steps"] is None for g in self.param_groups):
            warnings.warn("RelativeAdam: final only shapes the schedule told total_steps; without total_steps "
                          "it has no effect", UserWarning, stacklevel=2)


# Rule name -> the public optimizer built from a card's learned hyperparameters.
HYPERPARAMETER_OPTIMIZERS: dict[str, type[Optimizer]] = {
    GradNormDecayRule.name: GradNormDecaySGD,
    GradNormDecayAdamRule.name: GradNormDecayAdam,
    HypergradientSGDRule.name: HypergradientSGD,
    HypergradientAdamRule.name: HypergradientAdam,
    LearnableAdamRule.name: torch.optim.Adam,
    LearnableSGDRule.name: torch.optim.SGD,
}


def load_optimizer(
    name_or_path: str | Path, params: Iterable[Tensor] | Iterable[dict[str, Any]], **overrides: Any
) -> Optimizer:
    """A ready optimizer from shipped or exported weights of any rule.

    ``lr`` is always a multiplier (default 1.0) of the weights' own learned rate, so ``lr=0.5``
    halves every step of the trained optimizer and a scheduler scales the learned rate.
    ``lstm`` weights give an :class:`LSTMOptimizer`, ``mlp`` weights an :class:`MLPOptimizer`;
    hyperparameter rules give their public class with the learned values as defaults (``init_lr``
    the learned rate), ``learnable-adam``/``-sgd`` a ``torch.optim.Adam``/``SGD`` whose ``lr`` is
    the learned rate times the ``lr`` given; any other rule (the shipped ``default``, a learned
    relative Adam) runs in :class:`LearnedOptimizer`, with its card as ``opt.card``. ``overrides``
    are constructor arguments that replace those defaults (e.g. ``lr=0.5``, ``weight_decay=1e-4``,
    ``total_steps=N`` for a horizon-aware rule) and the card's ``defaults`` (``default``'s untold
    weights ship with ``weight_decay=1e-4``, coupled; with ``decoupled_weight_decay=True`` the same
    value becomes AdamW's per-step ``lr·wd``). Weights whose card names ``untold_weights`` run those
    sibling weights when not told ``total_steps`` (neither as a keyword nor in any param group;
    ``default``: the schedule-free rule, whose ``eval()``/``train()`` matter), and ``opt.card`` is
    then theirs. Card defaults and untold weights apply here only, not to ``LSTMOptimizer(weights=...)``
    or ``MLPOptimizer(weights=...)``.
    A torch optimizer gets a step pre-hook that bounds its gradients as the learned optimizers'
    (:func:`~learned_opt.rules.transforms.bound_optimizer_gradients`), so a huge finite gradient
    cannot overflow its state either.
    """
    if isinstance(name_or_path, Rule):
        raise TypeError("load_optimizer takes a shipped name or a .safetensors path; "
                        "for a Rule instance use LearnedOptimizer(params, rule)")
    params = list(params)
    told = overrides.get("total_steps") is not None or any(
        isinstance(g, dict) and g.get("total_steps") is not None for g in params)
    rule, card = load_rule(weights_for_run(name_or_path, told))
    card_defaults = {k: v for k, v in card.get("defaults", {}).items() if k not in overrides}
    overrides = {**card_defaults, **overrides}
    try:
        opt = _build_optimizer(rule, params, overrides)
    except (TypeError, ValueError) as exc:
        if not card_defaults or not _builds(rule, params, {k: v for k, v in overrides.items() if k not in card_defaults}):
            raise  # the caller's own arguments fail as well
        raise ValueError(f"{exc} (the weights card of {card.get('name', name_or_path)!r} sets defaults "
                         f"{card_defaults}; a keyword given here replaces one)") from exc
    if isinstance(opt, LearnedOptimizer):
        opt.weights_sha256 = card["sha256"]
        opt.card = card
    return opt


def _build_optimizer(rule: Rule, params: list[Any], overrides: dict[str, Any]) -> Optimizer:
    """The optimizer that runs ``rule`` (its public class for a hyperparameter rule)."""
    if isinstance(rule, LSTMRule):
        return LSTMOptimizer(params, weights=rule, **overrides)
    if isinstance(rule, MLPRule):
        return MLPOptimizer(params, weights=rule, **overrides)
    if rule.name in HYPERPARAMETER_OPTIMIZERS:
        assert isinstance(rule, HyperparameterRule)
        return _hyperparameter_optimizer(rule, params, overrides)
    return LearnedOptimizer(params, rule, **overrides)


def _builds(rule: Rule, params: list[Any], overrides: dict[str, Any]) -> bool:
    """Whether the optimizer builds with these arguments (on an error path only: it builds once more)."""
    try:
        return _build_optimizer(rule, params, overrides) is not None
    except (TypeError, ValueError):
        return False


def _hyperparameter_optimizer(
    rule: HyperparameterRule, params: Iterable[Tensor] | Iterable[dict[str, Any]], overrides: dict[str, Any]
) -> Optimizer:
    """The public optimizer of a hyperparameter rule at its learned values; a torch optimizer's
    absolute ``lr`` is the multiplier ``lr`` times the learned ``init_lr``."""
    cls = HYPERPARAMETER_OPTIMIZERS[rule.name]
    kwargs = {**rule.optimizer_defaults(), **overrides}
    if issubclass(cls, LearnedOptimizer):
        return cls(params, **kwargs)
    multiplier = kwargs.pop("lr", 1.0)
    check_nonnegative("lr", multiplier)
    opt = cls(params, lr=multiplier * kwargs.pop("init_lr"), **kwargs)
    opt.register_step_pre_hook(bound_optimizer_gradients)
    return opt
