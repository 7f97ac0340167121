"""Task and TaskFamily: functional optimization problems and seeded distributions over them.

A Task never mutates a module: parameters are a list of tensors passed to ``loss``, so an inner
training run can be unrolled and differentiated through (meta-training) or driven by any
``torch.optim`` optimizer (benchmarks) with the same code.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

Batch = tuple[Tensor, ...]


class Task(abc.ABC):
    """One optimization problem: initial parameters, a batch sampler and a loss.

    Determinism contract: the task's data and shapes are fixed at construction (by its family seed);
    ``init_params`` and ``sample_batch`` draw only from the generator they are given, so the same
    generator seed gives the same parameters, batches and losses.
    """

    name: str = "task"
    # The concrete settings a TaskFamily drew for this task (None for hand-built tasks).
    settings: dict[str, Any] | None = None

    @abc.abstractmethod
    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        """Fresh initial parameters (leaf tensors, ``requires_grad=False``) on ``self.device``."""

    @abc.abstractmethod
    def sample_batch(self, generator: torch.Generator) -> Batch:
        """A minibatch (tuple of tensors on ``self.device``); full-batch tasks return their data."""

    @abc.abstractmethod
    def loss(self, params: Sequence[Tensor], batch: Batch) -> Tensor:
        """Scalar training loss of ``params`` on ``batch``; differentiable in ``params``."""

    def eval_loss(self, params: Sequence[Tensor]) -> Tensor:
        """Loss on the full training data (defaults to one sampled batch for data-free tasks)."""
        return self.loss(params, self.full_batch())

    def full_batch(self) -> Batch:
        """The whole training set as one batch; data-free tasks override ``eval_loss`` instead."""
        raise NotImplementedError(f"{type(self).__name__} has no full training batch")

    def test_metrics(self, params: Sequence[Tensor]) -> dict[str, float] | None:
        """``{"test_loss": ..., "test_accuracy": ...}`` on the held-out split, or None without one."""
        return None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> Task:
        """This task with its data on ``device`` (CPU-only tasks return themselves)."""
        if torch.device(device).type != "cpu":
            raise NotImplementedError(f"{type(self).__name__} does not support device {device}")
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class TaskFamily(abc.ABC):
    """A seeded distribution over Tasks.

    Subclasses declare ``defaults``: every setting a suite file may give, with its default. A setting
    is a fixed value or a range spec (see :func:`draw`). Unknown settings raise ValueError naming
    the key and the allowed ones.
    """

    name: ClassVar[str] = "family"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"unknown setting(s) {unknown} for task family {self.name!r}; "
                f"allowed: {sorted(self.defaults)}"
            )
        self.settings: dict[str, Any] = {**self.defaults, **settings}
        for key, spec in self.settings.items():
            validate_spec(spec, f"{self.name}.{key}")

    def draw_settings(self, seed: int) -> dict[str, Any]:
        """Concrete values for every setting, drawn deterministically from ``seed``."""
        rng = np.random.default_rng([int(seed), 0x7A5C])
        return {key: draw(spec, rng) for key, spec in self.settings.items()}

    @abc.abstractmethod
    def sample(self, seed: int) -> Task:
        """The task for ``seed``: same seed, same task (data, sizes, settings)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.settings!r})"


_SPEC_KINDS = ("choice", "uniform", "log_uniform", "int", "log_int")


def validate_spec(spec: Any, where: str) -> None:
    """Raise ValueError if ``spec`` is a malformed range spec."""
    if not isinstance(spec, Mapping):
        return
    if len(spec) != 1 or next(iter(spec)) not in _SPEC_KINDS:
        raise ValueError(f"{where}: a range must be one of {list(_SPEC_KINDS)}, got {dict(spec)!r}")
    kind, value = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{where}: choice needs a non-empty list, got {value!r}")
        return
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ValueError(f"{where}: {kind} needs [low, high], got {value!r}")
    lo, hi = value
    number = (int, float) if kind in ("uniform", "log_uniform") else (int,)
    if not all(isinstance(v, number) and not isinstance(v, bool) for v in value) or lo > hi:
        what = "numbers" if float in number else "integers"
        raise ValueError(f"{where}: {kind} needs {what} low <= high, got {value!r}")
    if kind.startswith("log") and lo <= 0:
        raise ValueError(f"{where}: {kind} needs positive bounds, got {value!r}")


def draw(spec: Any, rng: np.random.Generator) -> Any:
    """Draw a value from a range spec.

    A spec is a plain value (fixed), or a one-key table: ``{choice = [...]}``, ``{uniform = [lo, hi]}``,
    ``{log_uniform = [lo, hi]}``, ``{int = [lo, hi]}`` (inclusive), ``{log_int = [lo, hi]}``.
    """
    if not isinstance(spec, Mapping):
        return spec
    kind, value = next(iter(spec.items()))
    if kind == "choice":
        return value[int(rng.integers(len(value)))]
    lo, hi = value
    if kind == "uniform":
        return float(rng.uniform(lo, hi))
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if kind == "int":
        return int(rng.integers(int(lo), int(hi) + 1))
    value = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return int(min(max(value, lo), hi))


def spec_bounds(spec: Any) -> tuple[Any, Any] | list[Any]:
    """The set a spec draws from: ``(lo, hi)`` for ranges, the list for choices, ``[v]`` for fixed."""
    if not isinstance(spec, Mapping):
        return [spec]
    kind, value = next(iter(spec.items()))
    return list(value) if kind == "choice" else (value[0], value[1])
