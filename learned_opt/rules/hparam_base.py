"""Shared base of the hyperparameter rules: θ holds log/logit-parameterised hyperparameters.

Every such rule steps at ``lr × init_lr`` (times its adapted factor, if any): ``init_lr`` is the
absolute base rate (learned, or hand-set), ``lr`` a multiplier of it (default 1.0), as ``lr`` is
for every rule of the library; meta-training leaves ``lr`` at 1 and learns ``init_lr``.

Meta-training calls ``update(..., rule.meta_hparams())`` so the hyperparameters are differentiable
functions of θ; the public optimizers pass the same keys as plain per-group floats. Both paths run
the rule's one ``update``. ``optimizer_defaults()`` turns learned θ into the floats a public
optimizer (or ``torch.optim.Adam``/``SGD``) takes as its defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from learned_opt.rules.base import Rule, check_bool, check_in_range, check_nonnegative


def log_param(value: float, key: str) -> nn.Parameter:
    """θ entry for a positive hyperparameter (exp of it is the value)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"invalid {key}: {value!r} (must be > 0 to be learned in log space)")
    return nn.Parameter(torch.tensor(math.log(value)))


def logit_param(value: float, key: str) -> nn.Parameter:
    """θ entry for a hyperparameter in (0, 1) (sigmoid of it is the value)."""
    if not (0.0 < value < 1.0):
        raise ValueError(f"invalid {key}: {value!r} (must be in (0, 1) to be learned as a logit)")
    return nn.Parameter(torch.tensor(math.log(value / (1.0 - value))))


def check_betas(betas: Any) -> None:
    """ValueError unless ``betas`` is a pair in [0, 1)."""
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"invalid betas: {betas!r} (must be a pair)") from None
    check_in_range("betas[0]", beta1, 0.0, 1.0)
    check_in_range("betas[1]", beta2, 0.0, 1.0)


def to_float(value: Any) -> Any:
    """Tensors (and tuples of them) as plain floats."""
    if isinstance(value, tuple):
        return tuple(to_float(v) for v in value)
    return float(value.detach()) if isinstance(value, Tensor) else value


class HyperparameterRule(Rule):
    """A rule whose θ are its own hyperparameters; subclasses implement ``meta_hparams``."""

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        super().validate_hparams(hparams)
        if "momentum" in hparams:
            check_in_range("momentum", hparams["momentum"], 0.0, 1.0)
        if "init_lr" in hparams:
            check_nonnegative("init_lr", hparams["init_lr"])
        if "hyper_lr" in hparams:
            check_nonnegative("hyper_lr", hparams["hyper_lr"])
        if "betas" in hparams:
            check_betas(hparams["betas"])
        if "eps" in hparams:
            check_nonnegative("eps", hparams["eps"])
        if "normalized" in hparams:
            check_bool("normalized", hparams["normalized"])

    def forward(self) -> dict[str, Tensor | float]:
        """:meth:`meta_hparams`: so ``torch.func.functional_call(rule, θ, ())`` gives any θ's hyperparameters."""
        return self.meta_hparams()

    def with_theta(self, theta: Mapping[str, Tensor]) -> HparamThetaRule:
        """This rule with θ replaced by ``theta`` (one member of a batched ES population)."""
        return HparamThetaRule(self, theta)

    def optimizer_defaults(self) -> dict[str, Any]:
        """The learned hyperparameters as floats: defaults of the matching public optimizer."""
        return {k: to_float(v) for k, v in self.meta_hparams().items()}

    def default_hparams(self) -> dict[str, Any]:
        return {**self.hyperparameters, **self.optimizer_defaults()}


class HparamThetaRule:
    """A hyperparameter rule whose θ is given (a vmapped population member), for
    :func:`learned_opt.rules.transforms.apply_update`: the rule's one ``update``, with the
    hyperparameters θ implies merged over the step's."""

    def __init__(self, rule: HyperparameterRule, theta: Mapping[str, Tensor]) -> None:
        self.rule, self.theta = rule, theta

    def update(self, grads: Any, params: Any, state: Any, hparams: Mapping[str, Any]) -> Any:
        learned = torch.func.functional_call(self.rule, dict(self.theta), ())
        return self.rule.update(grads, params, state, {**hparams, **learned})
