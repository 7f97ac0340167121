"""The public optimizers: the LSTM and MLP learned optimizers, the hand-set adaptive-rate rules,
relative Adam, and :func:`load_optimizer` for any shipped or exported weights.

Each is a :class:`~learned_opt.adapter.LearnedOptimizer` over one rule of :mod:`learned_opt.rules`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from learned_opt.adapter import LearnedOptimizer
from learned_opt.rules.base import Rule
from learned_opt.rules.grad_norm_decay import GradNormDecayRule
from learned_opt.rules.hparam_base import HyperparameterRule
from learned_opt.rules.hypergradient import HypergradientAdamRule, HypergradientSGDRule
from learned_opt.rules.learnable import LearnableAdamRule, LearnableSGDRule
from learned_opt.rules.lstm import LSTMRule
from learned_opt.rules.mlp import MLPRule
from learned_opt.rules.relative import RelativeAdamRule
from learned_opt.rules.transforms import bound_optimizer_gradients
from learned_opt.weights import load_rule

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
        rule, self.card = _rule_from_weights(weights, LSTMRule, type(self).__name__)
        sha = self.card["sha256"] if self.card else None
        super().__init__(params, rule, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                         maximize=maximize, weights_sha256=sha)


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
        rule, self.card = _rule_from_weights(weights, MLPRule, type(self).__name__)
        sha = self.card["sha256"] if self.card else None
        super().__init__(params, rule, lr=lr, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                         maximize=maximize, weights_sha256=sha)


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


class GradNormDecaySGD(LearnedOptimizer):
    """SGD whose rate decays by ``decay`` each step the group's gradient norm is below ``threshold``.

    The exact rule (no relaxation); the adapted factor is ``opt.state[p]["lr_factor"]`` (or
    ``opt.group_state(i)``) and the step is ``group['lr'] × lr_factor``, so a scheduler's ``lr`` and
    the decay multiply. ``decay_count`` in the same state counts how often the decay fired.
    ``weight_decay`` is coupled (SGD's) unless ``decoupled_weight_decay=True`` (``p -= lr·wd·p``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        decay: float = 0.9,
        threshold: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            GradNormDecayRule(),
            lr=lr,
            decay=decay,
            threshold=threshold,
            momentum=momentum,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        )


class HypergradientSGD(LearnedOptimizer):
    """SGD-HD (Baydin et al. 2018): the rate adapts online, ``α ← max(0, α + hyper_lr · g_t·u_{t-1})``;
    ``normalized=True``: ``α ← α · exp(hyper_lr · cos(g_t, u_{t-1}))``, the same β for any loss scale.

    ``α = group['lr'] × state['lr_factor']``: the hypergradient step is taken on α and stored as a
    factor of ``lr``, so a scheduler rescales the online rate multiplicatively (see
    :mod:`learned_opt.rules.hypergradient`). ``weight_decay`` is coupled unless
    ``decoupled_weight_decay=True`` (``p -= lr·wd·p``, ``lr`` the base rate, not α).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        hyper_lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        normalized: bool = False,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            HypergradientSGDRule(),
            lr=lr,
            hyper_lr=hyper_lr,
            momentum=momentum,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            normalized=normalized,
            maximize=maximize,
        )


class HypergradientAdam(LearnedOptimizer):
    """Adam-HD (Baydin et al. 2018): Adam whose rate adapts online by ``hyper_lr · g_t·u_{t-1}``.

    Same rate/scheduler convention as :class:`HypergradientSGD`. ``decoupled_weight_decay=True``
    makes ``weight_decay`` AdamW's (``p -= lr·wd·p``, ``lr`` the base rate) instead of Adam's L2.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        hyper_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        normalized: bool = False,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            HypergradientAdamRule(),
            lr=lr,
            hyper_lr=hyper_lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,  # anything else: ValueError
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            normalized=normalized,
            maximize=maximize,
        )


class RelativeAdam(LearnedOptimizer):
    """Parameter-relative Adam, hand-set: each step moves a tensor by ``α · s(t)`` of its own RMS
    along Adam's direction (:mod:`learned_opt.rules.relative`), untuned across tasks.

    ``lr`` multiplies the rule's own rate (1.0 = ``alpha``), so schedulers scale it. ``total_steps``
    (optional, as ``OneCycleLR``'s) turns on the warm-up + cosine-to-zero schedule over the run;
    without it the step stays at ``alpha`` after a short warm-up (``warmup × 200`` steps).
    ``floor`` keeps zero-initialised tensors (biases) moving: the step scale is ``RMS(p) + floor``.
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
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
    ) -> None:
        super().__init__(
            params,
            RelativeAdamRule(),
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


# Rule name -> the public optimizer built from a card's learned hyperparameters.
HYPERPARAMETER_OPTIMIZERS: dict[str, type[Optimizer]] = {
    GradNormDecayRule.name: GradNormDecaySGD,
    HypergradientSGDRule.name: HypergradientSGD,
    HypergradientAdamRule.name: HypergradientAdam,
    LearnableAdamRule.name: torch.optim.Adam,
    LearnableSGDRule.name: torch.optim.SGD,
}


def load_optimizer(
    name_or_path: str | Path, params: Iterable[Tensor] | Iterable[dict[str, Any]], **overrides: Any
) -> Optimizer:
    """A ready optimizer from shipped or exported weights of any rule.

    ``lstm`` weights give an :class:`LSTMOptimizer`, ``mlp`` weights an :class:`MLPOptimizer`;
    hyperparameter rules give their public class (``learnable-adam`` → ``torch.optim.Adam``,
    ``learnable-sgd`` → ``torch.optim.SGD``) with the learned values as defaults; any other rule
    (the shipped ``default``, a learned relative Adam) runs in :class:`LearnedOptimizer`, with its
    card as ``opt.card``. ``overrides`` are constructor arguments that replace those defaults (e.g.
    ``lr=0.5``, ``weight_decay=1e-4``, ``total_steps=N`` for a horizon-aware rule).
    A torch optimizer gets a step pre-hook that bounds its gradients as the learned optimizers'
    (:func:`~learned_opt.rules.transforms.bound_optimizer_gradients`), so a huge finite gradient
    cannot overflow its state either.
    """
    rule, card = load_rule(name_or_path)
    if isinstance(rule, LSTMRule):
        opt: Optimizer = LSTMOptimizer(params, weights=rule, **overrides)
    elif isinstance(rule, MLPRule):
        opt = MLPOptimizer(params, weights=rule, **overrides)
    elif rule.name in HYPERPARAMETER_OPTIMIZERS:
        assert isinstance(rule, HyperparameterRule)
        opt = HYPERPARAMETER_OPTIMIZERS[rule.name](params, **{**rule.optimizer_defaults(), **overrides})
        if not isinstance(opt, LearnedOptimizer):
            opt.register_step_pre_hook(bound_optimizer_gradients)
    else:
        opt = LearnedOptimizer(params, rule, **overrides)
    if isinstance(opt, LearnedOptimizer):
        opt.weights_sha256 = card["sha256"]
        opt.card = card
    return opt
