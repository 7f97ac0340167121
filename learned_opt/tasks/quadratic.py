"""The quadratic of Andrychowicz et al. (2016): f(θ) = ||Wθ − y||², optionally ill-conditioned."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from learned_opt.tasks.base import Batch, Task, TaskFamily


class QuadraticTask(Task):
    """Deterministic least squares ``||Wθ − y||²`` (sum, as in the paper); θ0 ~ N(0, init_scale²)."""

    def __init__(self, W: Tensor, y: Tensor, init_scale: float = 1.0, name: str = "quadratic") -> None:
        if W.ndim != 2 or y.shape != (W.shape[0],):
            raise ValueError(f"need W (m, n) and y (m,), got {tuple(W.shape)} and {tuple(y.shape)}")
        self.W, self.y, self.init_scale, self.name = W, y, float(init_scale), name

    @property
    def device(self) -> torch.device:
        return self.W.device

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        theta = torch.randn(self.W.shape[1], generator=generator) * self.init_scale
        return [theta.to(self.W.device, self.W.dtype)]

    def sample_batch(self, generator: torch.Generator) -> Batch:
        return (self.W, self.y)

    def full_batch(self) -> Batch:
        return (self.W, self.y)

    def loss(self, params: Sequence[Tensor], batch: Batch) -> Tensor:
        W, y = batch
        return (W @ params[0] - y).pow(2).sum()

    def to(self, device: torch.device | str) -> QuadraticTask:
        return QuadraticTask(self.W.to(device), self.y.to(device), self.init_scale, self.name)


def quadratic_matrix(rng: np.random.Generator, dim: int, condition: float) -> np.ndarray:
    """W for the quadratic: i.i.d. N(0, 1) when ``condition`` is 0 (the paper's), else
    ``U diag(s) Vᵀ`` with random orthogonal U, V and singular values log-spaced so that the
    Hessian ``2WᵀW`` has condition number ``condition`` (largest singular value √dim, like a Gaussian W).
    """
    if condition == 0:
        return rng.normal(size=(dim, dim))
    if condition < 1:
        raise ValueError(f"condition must be 0 (Gaussian W) or >= 1, got {condition}")
    U, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    V, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    s = np.sqrt(dim) * np.geomspace(1.0, condition ** -0.5, dim)
    return (U * s) @ V.T


class QuadraticFamily(TaskFamily):
    """Quadratics ``||Wθ − y||²`` with y ~ N(0, 1); see :func:`quadratic_matrix` for W."""

    name: ClassVar[str] = "quadratic"
    defaults: ClassVar[dict[str, Any]] = {"dim": 10, "condition": 0.0, "init_scale": 1.0}
    minimums: ClassVar[dict[str, float]] = {"dim": 1, "condition": 0, "init_scale": 0}

    def sample(self, seed: int) -> QuadraticTask:
        s = self.draw_settings(seed)
        dim = int(s["dim"])
        if dim < 1:
            raise ValueError(f"quadratic dim must be >= 1, got {dim}")
        rng = np.random.default_rng([int(seed), 1])
        W = quadratic_matrix(rng, dim, float(s["condition"]))
        y = rng.normal(size=dim)
        name = f"quadratic(dim={dim}, condition={s['condition']:g})"
        task = QuadraticTask(torch.as_tensor(W, dtype=torch.float32),
                             torch.as_tensor(y, dtype=torch.float32), s["init_scale"], name)
        task.settings = s
        return task
