"""Learnable hyperparameters: Adam (lr, betas, eps) and SGD (lr, momentum) with θ = the values.

The hyperparameter meta-learner: meta-training tunes θ by gradient; the result is an ordinary
optimizer, so loading a meta-trained card yields a plain ``torch.optim.Adam`` / ``torch.optim.SGD``
with the learned values (``lr`` a multiplier of the learned rate). ``update`` reproduces those
optimizers' math at rate ``lr × init_lr`` (tested against them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState
from learned_opt.rules.directions import adam_direction, momentum_direction
from learned_opt.rules.hparam_base import HyperparameterRule, check_betas, log_param, logit_param
from learned_opt.rules.transforms import absolute_rate


class LearnableAdamRule(HyperparameterRule):
    """Adam with θ = (log lr, logit beta1, logit beta2, log eps). State as torch's Adam."""

    name: ClassVar[str] = "learnable-adam"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0, "init_lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}

    def __init__(
        self, init_lr: float = 1e-3, init_betas: tuple[float, float] = (0.9, 0.999), init_eps: float = 1e-8
    ) -> None:
        super().__init__()
        check_betas(init_betas)
        self.log_lr = log_param(init_lr, "init_lr")
        self.logit_beta1 = logit_param(init_betas[0], "init_betas[0]")
        self.logit_beta2 = logit_param(init_betas[1], "init_betas[1]")
        self.log_eps = log_param(init_eps, "init_eps")

    def config(self) -> dict[str, Any]:
        hp = self.optimizer_defaults()
        return {"init_lr": hp["init_lr"], "init_betas": list(hp["betas"]), "init_eps": hp["eps"]}

    def meta_hparams(self) -> dict[str, Tensor | float]:
        return {
            "init_lr": self.log_lr.exp(),
            "betas": (torch.sigmoid(self.logit_beta1), torch.sigmoid(self.logit_beta2)),
            "eps": self.log_eps.exp(),
        }

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        like = params[0] if params else torch.zeros(())
        group = {"step": torch.zeros((), dtype=like.dtype, device=like.device)}
        return group, [{"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)} for p in params]

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        group_state, per_param = state
        step = group_state["step"] + 1
        rate = absolute_rate(hparams)
        updates, new_per_param = [], []
        for g, st in zip(grads, per_param):
            direction, m, v = adam_direction(g, st["exp_avg"], st["exp_avg_sq"], step, hparams["betas"], hparams["eps"])
            updates.append(direction * -rate)
            new_per_param.append({"exp_avg": m, "exp_avg_sq": v})
        return updates, ({**group_state, "step": step}, new_per_param)


class LearnableSGDRule(HyperparameterRule):
    """SGD with heavy-ball momentum, θ = (log lr, logit momentum). State as torch's SGD."""

    name: ClassVar[str] = "learnable-sgd"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0, "init_lr": 0.01, "momentum": 0.0}

    def __init__(self, init_lr: float = 0.01, init_momentum: float = 0.9) -> None:
        super().__init__()
        self.log_lr = log_param(init_lr, "init_lr")
        self.logit_momentum = logit_param(init_momentum, "init_momentum")

    def config(self) -> dict[str, Any]:
        hp = self.optimizer_defaults()
        return {"init_lr": hp["init_lr"], "init_momentum": hp["momentum"]}

    def meta_hparams(self) -> dict[str, Tensor | float]:
        return {"init_lr": self.log_lr.exp(), "momentum": torch.sigmoid(self.logit_momentum)}

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        return {}, [{} for _ in params]

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        group_state, per_param = state
        rate = absolute_rate(hparams)
        updates, new_per_param = [], []
        for g, st in zip(grads, per_param):
            direction, buf = momentum_direction(g, st.get("momentum_buffer"), hparams["momentum"])
            updates.append(direction * -rate)
            new_per_param.append({} if buf is None else {"momentum_buffer": buf})
        return updates, (dict(group_state), new_per_param)
