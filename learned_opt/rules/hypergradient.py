"""Hypergradient descent (Baydin et al. 2018, "Online Learning Rate Adaptation with Hypergradient
Descent"): SGD-HD and Adam-HD with one adapted rate per param group.

The paper adapts the rate by gradient descent on it: with ``u_{t-1}`` the previous update direction
(the gradient for plain SGD, the momentum buffer with momentum, Adam's ``m̂/(sqrt(v̂)+eps)`` for
Adam-HD), ``d loss / d α = -g_t · u_{t-1}``, so::

    α_t = max(0, α_{t-1} + β g_t · u_{t-1})        (dot product over the whole group)
    θ_t = θ_{t-1} - α_t u_t

The rate never goes negative (the original code let it, and then ascended the loss).

The adapted rate is kept as a factor of the group's ``lr``: ``α_t = lr × lr_factor`` with
``lr_factor`` in the group state (``opt.state[p]["lr_factor"]``), starting at 1. The hypergradient
step is taken in the paper's units (on α) and converted to the factor by dividing by the current
``lr``, so with a constant ``lr`` the trajectory is exactly the paper's. A scheduler that changes
``lr`` rescales the online rate multiplicatively (``α = lr_t × factor``), and ``lr = 0`` freezes
both the parameters and the factor.

Hand-set defaults are the paper's: β = 1e-3 for SGD-HD, β = 1e-7 for Adam-HD.

``normalized=True`` is a scale-free variant: the factor moves multiplicatively by the *cosine*
between the gradient and the previous direction, ``f_t = f_{t-1} · exp(β cos(g_t, u_{t-1}))``, so
β is a log-rate change per step whatever the loss's scale (the paper's step ``β g·u`` is in the
loss's units, so one β cannot suit tasks whose gradients differ by orders of magnitude). The rate
stays positive by construction; β of a few hundredths lets it move 10× within ~100 steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState, check_bool, check_in_range
from learned_opt.rules.directions import adam_direction, group_dot, momentum_direction
from learned_opt.rules.hparam_base import HyperparameterRule, check_betas, log_param, logit_param


def hypergradient_factor(
    factor: Tensor,
    grads: Sequence[Tensor],
    prev_dirs: Sequence[Tensor],
    lr: Tensor | float,
    hyper_lr: Tensor | float,
    normalized: bool = False,
) -> Tensor:
    """The adapted factor after one hypergradient step; lr = 0 keeps f.

    Paper: ``max(0, f + β (g·u_prev) / lr)``; ``normalized``: ``f · exp(β cos(g, u_prev))`` (cos = 0
    while either is all zero).
    """
    h = group_dot(grads, prev_dirs)
    lr_t = torch.as_tensor(lr, dtype=factor.dtype, device=factor.device)
    positive = lr_t > 0
    if normalized:
        norms = (group_dot(grads, grads) * group_dot(prev_dirs, prev_dirs)).clamp_min(1e-30).sqrt()
        new = factor * torch.exp(hyper_lr * h / norms)
    else:
        new = (factor + hyper_lr * h / torch.where(positive, lr_t, torch.ones_like(lr_t))).clamp_min(0.0)
    return torch.where(positive, new, factor)


def _group_init(params: Sequence[Tensor], with_step: bool) -> dict[str, Tensor]:
    like = params[0] if params else torch.zeros(())
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    state = {"lr_factor": zero + 1}
    if with_step:
        state["step"] = zero.clone()
    return state


class HypergradientSGDRule(HyperparameterRule):
    """SGD-HD. θ: log initial lr, log hyper-lr; momentum is a fixed config value.

    Per-parameter state: ``prev_dir`` (u_{t-1}) and, with momentum, ``momentum_buffer``.
    """

    name: ClassVar[str] = "hypergradient-sgd"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 0.01, "hyper_lr": 1e-3, "momentum": 0.0, "normalized": False}

    def __init__(self, init_lr: float = 0.01, init_hyper_lr: float = 1e-3, momentum: float = 0.0,
                 normalized: bool = False) -> None:
        super().__init__()
        check_in_range("momentum", momentum, 0.0, 1.0)
        self.log_lr = log_param(init_lr, "init_lr")
        self.log_hyper_lr = log_param(init_hyper_lr, "init_hyper_lr")
        self.momentum = float(momentum)
        self.normalized = check_bool("normalized", normalized)

    def config(self) -> dict[str, Any]:
        return {
            "init_lr": float(self.log_lr.detach().exp()),
            "init_hyper_lr": float(self.log_hyper_lr.detach().exp()),
            "momentum": self.momentum,
            "normalized": self.normalized,
        }

    def meta_hparams(self) -> dict[str, Tensor | float]:
        return {"lr": self.log_lr.exp(), "hyper_lr": self.log_hyper_lr.exp(), "momentum": self.momentum,
                "normalized": self.normalized}

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
        lr = hparams["lr"]
        factor = hypergradient_factor(
            group_state["lr_factor"], grads, [st["prev_dir"] for st in per_param], lr, hparams["hyper_lr"],
            bool(hparams.get("normalized", False)),
        )
        updates, new_per_param = [], []
        for g, st in zip(grads, per_param):
            direction, buf = momentum_direction(g, st.get("momentum_buffer"), hparams.get("momentum", 0.0))
            updates.append(direction * (-lr * factor))
            new_st = {"prev_dir": direction}
            if buf is not None:
                new_st["momentum_buffer"] = buf
            new_per_param.append(new_st)
        return updates, ({**group_state, "lr_factor": factor}, new_per_param)


class HypergradientAdamRule(HyperparameterRule):
    """Adam-HD. θ: log initial lr, log hyper-lr, logit betas, log eps.

    Per-parameter state: ``exp_avg``, ``exp_avg_sq``, ``prev_dir``; group state ``step``, ``lr_factor``.
    """

    name: ClassVar[str] = "hypergradient-adam"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1e-3, "hyper_lr": 1e-7, "betas": (0.9, 0.999), "eps": 1e-8,
                                                 "normalized": False}

    def __init__(
        self,
        init_lr: float = 1e-3,
        init_hyper_lr: float = 1e-7,
        init_betas: tuple[float, float] = (0.9, 0.999),
        init_eps: float = 1e-8,
        normalized: bool = False,
    ) -> None:
        super().__init__()
        self.normalized = check_bool("normalized", normalized)
        check_betas(init_betas)
        self.log_lr = log_param(init_lr, "init_lr")
        self.log_hyper_lr = log_param(init_hyper_lr, "init_hyper_lr")
        self.logit_beta1 = logit_param(init_betas[0], "init_betas[0]")
        self.logit_beta2 = logit_param(init_betas[1], "init_betas[1]")
        self.log_eps = log_param(init_eps, "init_eps")

    def config(self) -> dict[str, Any]:
        hp = self.optimizer_defaults()
        return {
            "init_lr": hp["lr"],
            "init_hyper_lr": hp["hyper_lr"],
            "init_betas": list(hp["betas"]),
            "init_eps": hp["eps"],
            "normalized": self.normalized,
        }

    def meta_hparams(self) -> dict[str, Tensor | float]:
        return {
            "lr": self.log_lr.exp(),
            "hyper_lr": self.log_hyper_lr.exp(),
            "betas": (torch.sigmoid(self.logit_beta1), torch.sigmoid(self.logit_beta2)),
            "eps": self.log_eps.exp(),
            "normalized": self.normalized,
        }

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
        lr = hparams["lr"]
        step = group_state["step"] + 1
        factor = hypergradient_factor(
            group_state["lr_factor"], grads, [st["prev_dir"] for st in per_param], lr, hparams["hyper_lr"],
            bool(hparams.get("normalized", False)),
        )
        updates, new_per_param = [], []
        for g, st in zip(grads, per_param):
            direction, m, v = adam_direction(g, st["exp_avg"], st["exp_avg_sq"], step, hparams["betas"], hparams["eps"])
            updates.append(direction * (-lr * factor))
            new_per_param.append({"exp_avg": m, "exp_avg_sq": v, "prev_dir": direction})
        return updates, ({**group_state, "lr_factor": factor, "step": step}, new_per_param)
