"""Gradient-norm-triggered learning-rate decay: ``if ||g|| < threshold: lr *= decay``.

SGD (optional heavy-ball momentum) whose rate factor decays each step the *group's* gradient norm
is below the threshold. The decay is applied before the step that triggered it::

    factor_t = factor_{t-1} * (decay if ||g_t|| < threshold else 1)
    d_t      = momentum * d_{t-1} + g_t          (d_t = g_t without momentum)
    update   = -lr * factor_t * d_t

``soft=True`` replaces the switch by a smooth relaxation for gradient-based meta-training:
``s = sigmoid((log threshold - log ||g||) / temperature)`` and ``factor_t = factor_{t-1} * (1 - s (1 - decay))``,
which tends to the exact rule as the temperature goes to 0 (``s`` is the probability-like weight of
the decay branch, in log-norm units). The optimizer and every benchmark use the exact rule.

Group state: ``lr_factor`` (the adapted factor), ``decay_count`` (how often the decay branch fired;
with ``soft`` the sum of ``s``). Per parameter: ``momentum_buffer`` only when momentum is non-zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState, check_in_range, check_nonnegative
from learned_opt.rules.directions import group_norm, momentum_direction
from learned_opt.rules.hparam_base import HyperparameterRule, log_param, logit_param


class GradNormDecayRule(HyperparameterRule):
    """θ: log initial lr, logit decay, log threshold; momentum is a fixed config value."""

    name: ClassVar[str] = "grad-norm-decay-sgd"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 0.1, "decay": 0.9, "threshold": 1e-3, "momentum": 0.0}

    def __init__(
        self,
        init_lr: float = 0.1,
        init_decay: float = 0.9,
        init_threshold: float = 1e-3,
        momentum: float = 0.0,
        soft: bool = False,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        check_in_range("momentum", momentum, 0.0, 1.0)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"invalid temperature: {temperature!r} (must be > 0)")
        self.log_lr = log_param(init_lr, "init_lr")
        self.logit_decay = logit_param(init_decay, "init_decay")
        self.log_threshold = log_param(init_threshold, "init_threshold")
        self.momentum = float(momentum)
        self.soft = bool(soft)
        self.temperature = float(temperature)

    def config(self) -> dict[str, Any]:
        return {
            "init_lr": float(self.log_lr.detach().exp()),
            "init_decay": float(torch.sigmoid(self.logit_decay.detach())),
            "init_threshold": float(self.log_threshold.detach().exp()),
            "momentum": self.momentum,
            "soft": self.soft,
            "temperature": self.temperature,
        }

    def meta_hparams(self) -> dict[str, Tensor | float]:
        return {
            "lr": self.log_lr.exp(),
            "decay": torch.sigmoid(self.logit_decay),
            "threshold": self.log_threshold.exp(),
            "momentum": self.momentum,
        }

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        super().validate_hparams(hparams)
        decay = float(hparams.get("decay", 0.9))
        if not (0.0 < decay <= 1.0):
            raise ValueError(f"invalid decay: {hparams.get('decay')!r} (must be in (0, 1])")
        check_nonnegative("threshold", hparams.get("threshold", 0.0))

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        like = params[0] if params else torch.zeros(())
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return {"lr_factor": zero + 1, "decay_count": zero.clone()}, [{} for _ in params]

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        group_state, per_param = state
        lr, decay, threshold = hparams["lr"], hparams["decay"], hparams["threshold"]
        momentum = hparams.get("momentum", 0.0)
        norm = group_norm(grads)
        if self.soft:
            tiny = torch.finfo(norm.dtype).tiny
            log_threshold = torch.log(torch.as_tensor(threshold, dtype=norm.dtype, device=norm.device))
            fired = torch.sigmoid((log_threshold - norm.clamp_min(tiny).log()) / self.temperature)
        else:
            fired = (norm < threshold).to(norm.dtype)
        factor = group_state["lr_factor"] * (1 - fired * (1 - decay))
        updates, new_per_param = [], []
        for g, st in zip(grads, per_param):
            direction, buf = momentum_direction(g, st.get("momentum_buffer"), momentum)
            updates.append(direction * (-lr * factor))
            new_per_param.append({} if buf is None else {"momentum_buffer": buf})
        new_group = {**group_state, "lr_factor": factor, "decay_count": group_state["decay_count"] + fired}
        return updates, (new_group, new_per_param)
