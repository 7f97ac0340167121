"""ModuleTask: any ``nn.Module`` plus data becomes a functional Task via ``torch.func.functional_call``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from learned_opt.tasks.base import Batch, Task

LossFn = Callable[[Tensor, Tensor], Tensor]
_LOSSES: dict[str, LossFn] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def fan_in_init(shapes: Sequence[torch.Size], generator: torch.Generator, scale: float = 1.0) -> list[Tensor]:
    """Weights (ndim >= 2) ~ N(0, scale²/fan_in); vectors (biases) zero. Deterministic in ``generator``."""
    out = []
    for shape in shapes:
        if len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            out.append(torch.randn(shape, generator=generator) * (scale / math.sqrt(fan_in)))
        else:
            out.append(torch.zeros(shape))
    return out


class ModuleTask(Task):
    """Train ``module``'s parameters on ``(x, y)`` data with a named or callable loss.

    ``init`` is ``"fan_in"`` (see :func:`fan_in_init`, scaled by ``init_scale``), ``"module"`` (the
    module's current parameter values, ignoring the generator) or a callable
    ``generator -> list[Tensor]``. ``batch_size`` None or 0 means full-batch training; minibatches
    are drawn with replacement from the generator. With ``loss="cross_entropy"`` the test metrics
    include accuracy.
    """

    def __init__(
        self,
        module: nn.Module,
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor] | None = None,
        *,
        loss: str | LossFn = "cross_entropy",
        batch_size: int | None = None,
        init: str | Callable[[torch.Generator], list[Tensor]] = "fan_in",
        init_scale: float = 1.0,
        name: str = "module",
    ) -> None:
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise ValueError(f"unknown loss {loss!r}; known: {sorted(_LOSSES)} or a callable")
            self.classification = loss == "cross_entropy"
            loss = _LOSSES[loss]
        else:
            self.classification = False
        if isinstance(init, str) and init not in ("fan_in", "module"):
            raise ValueError(f"unknown init {init!r}; use 'fan_in', 'module' or a callable")
        if batch_size is not None and batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        if len(train[0]) != len(train[1]) or len(train[0]) == 0:
            raise ValueError(f"train inputs ({len(train[0])}) and targets ({len(train[1])}) must match and be non-empty")
        self.module = module
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [p.shape for _, p in module.named_parameters()]
        self.train_data = tuple(train)
        self.test_data = tuple(test) if test is not None else None
        self.loss_fn = loss
        self.batch_size = int(batch_size) if batch_size else 0
        self.init = init
        self.init_scale = float(init_scale)
        self.name = name
        self._device = train[0].device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_train(self) -> int:
        return len(self.train_data[0])

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        if self.init == "fan_in":
            params = fan_in_init(self.shapes, generator, self.init_scale)
        elif self.init == "module":
            params = [p.detach().clone() for p in self.module.parameters()]
        else:
            params = list(self.init(generator))  # type: ignore[operator]
        return [p.to(self._device) for p in params]

    def sample_batch(self, generator: torch.Generator) -> Batch:
        if not self.batch_size:
            return self.train_data
        idx = torch.randint(self.num_train, (self.batch_size,), generator=generator).to(self._device)
        return tuple(t[idx] for t in self.train_data)

    def forward(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """The module's output on ``x`` with ``params`` in place of its own parameters."""
        return functional_call(self.module, dict(zip(self.names, params)), (x,))

    def loss(self, params: Sequence[Tensor], batch: Batch) -> Tensor:
        x, y = batch
        return self.loss_fn(self.forward(params, x), y)

    def full_batch(self) -> Batch:
        return self.train_data

    def test_metrics(self, params: Sequence[Tensor]) -> dict[str, float] | None:
        if self.test_data is None:
            return None
        x, y = self.test_data
        with torch.no_grad():
            out = self.forward(params, x)
            metrics = {"test_loss": float(self.loss_fn(out, y))}
            if self.classification:
                metrics["test_accuracy"] = float((out.argmax(-1) == y).float().mean())
        return metrics

    def to(self, device: torch.device | str) -> ModuleTask:
        device = torch.device(device)
        moved = copy.copy(self)
        moved.module = copy.deepcopy(self.module).to(device)
        moved.train_data = tuple(t.to(device) for t in self.train_data)
        moved.test_data = None if self.test_data is None else tuple(t.to(device) for t in self.test_data)
        moved._device = moved.train_data[0].device
        return moved
