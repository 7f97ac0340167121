"""Tiny task and rule for the meta-training tests: small enough for float64 finite differences."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from learned_opt.rules.base import Rule, RuleState
from learned_opt.tasks.base import Batch, Task, TaskFamily


class ToyQuadratic(Task):
    """``0.5 Σ a_i (x_i − c_i − noise·n_i)² + 0.1`` in ``dim`` dimensions; batches are the noise draws."""

    name = "toy-quadratic"

    def __init__(self, seed: int = 0, dim: int = 2, noise: float = 0.0, dtype: torch.dtype = torch.float64) -> None:
        g = torch.Generator().manual_seed(10_000 + int(seed))
        self.a = torch.rand(dim, generator=g, dtype=dtype) * 1.5 + 0.5
        self.c = torch.randn(dim, generator=g, dtype=dtype)
        self.dim, self.noise, self.dtype = dim, noise, dtype

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [torch.randn(self.dim, generator=generator, dtype=self.dtype) * 2]

    def sample_batch(self, generator: torch.Generator) -> Batch:
        return (torch.randn(self.dim, generator=generator, dtype=self.dtype),)

    def loss(self, params: Sequence[Tensor], batch: Batch) -> Tensor:
        (x,), (n,) = params, batch
        return 0.5 * (self.a * (x - self.c - self.noise * n) ** 2).sum() + 0.1


class ToyFamily(TaskFamily):
    name = "toy-quadratic"
    defaults = {"dim": 2, "noise": 0.0}

    def sample(self, seed: int) -> Task:
        s = self.draw_settings(seed)
        return ToyQuadratic(seed, dim=int(s["dim"]), noise=float(s["noise"]), dtype=torch.float32)


class ToyMomentum(Rule):
    """Momentum SGD with meta-learned log learning rate and momentum logit (2 meta-parameters)."""

    name: ClassVar[str] = "toy-momentum"

    def __init__(self, log_lr: float = -1.5, logit_beta: float = 0.0) -> None:
        super().__init__()
        self.log_lr = nn.Parameter(torch.tensor(float(log_lr)))
        self.logit_beta = nn.Parameter(torch.tensor(float(logit_beta)))

    def config(self) -> dict[str, Any]:
        return {}

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        return {}, [{"m": torch.zeros_like(p)} for p in params]

    def update(self, grads: Sequence[Tensor], params: Sequence[Tensor], state: RuleState,
               hparams: Mapping[str, Tensor | float]) -> tuple[list[Tensor], RuleState]:
        group, per = state
        beta = torch.sigmoid(self.logit_beta).to(grads[0].dtype)
        lr = torch.exp(self.log_lr).to(grads[0].dtype) * hparams.get("lr", 1.0)
        ms = [beta * s["m"] + g for s, g in zip(per, grads)]
        return [-lr * m for m in ms], (dict(group), [{"m": m} for m in ms])
