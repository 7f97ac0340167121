"""The public optimizers: the LSTM and MLP learned optimizers, relative Adam, and
:func:`load_optimizer` for any shipped or exported weights (the hand-set adaptive-rate rules live in
:mod:`learned_opt.adaptive_optimizers`).

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
from learned_opt.adaptive_optimizers import GradNormDecayAdam, GradNormDecaySGD, HypergradientAdam, HypergradientSGD
from learned_opt.rules.base import Rule
from learned_opt.rules.base import check_nonnegative
from learned_opt.rules.grad_norm_decay import GradNormDecayAdamRule, GradNormDecayRule
from learned_opt.rules.hparam_base import HyperparameterRule
from learned_opt.rules.hypergradient import HypergradientAdamRule, HypergradientSGDRule
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
