"""Task and TaskFamily: functional optimization problems and seeded distributions over them.

A Task never mutates a module: parameters are a list of tensors passed to ``loss``, so an inner
training run can be unrolled and differentiated through (meta-training) or driven by any
``torch.optim`` optimizer (benchmarks) with the same code.
"""

from __future__ import annotations

import abc
import math
import numbers
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
    is a fixed value or a range spec (see :func:`draw`). Unknown settings, and values of another type
    than the default's or below ``minimums``, raise ValueError naming the key (see :func:`check_setting`).
    """

    name: ClassVar[str] = "family"
    defaults: ClassVar[dict[str, Any]] = {}
    # Settings that also take a list of values of their default's type (an MLP's per-layer widths).
    list_settings: ClassVar[tuple[str, ...]] = ()
    # The smallest value a numeric setting may take, checked for every value its range can draw.
    minimums: ClassVar[dict[str, float]] = {}

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
            check_setting(spec, self.defaults[key], f"{self.name}.{key}", minimum=self.minimums.get(key),
                          lists=key in self.list_settings)

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
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"{where}: {kind} needs finite bounds, got {value!r}")
    if kind.startswith("log") and lo <= 0:
        raise ValueError(f"{where}: {kind} needs positive bounds, got {value!r}")


# What a setting's default says about the values it takes: (test, words for messages).
_SETTING_TYPES: dict[str, tuple[Any, str]] = {
    "bool": (lambda v: isinstance(v, (bool, np.bool_)), "true or false"),
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
               "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
}


def _setting_type(default: Any) -> str | None:
    if isinstance(default, (bool, np.bool_)):
        return "bool"
    if isinstance(default, numbers.Integral):
        return "int"
    if isinstance(default, numbers.Real):
        return "number"
    return "str" if isinstance(default, str) else None


def check_setting(spec: Any, default: Any, where: str, *, minimum: float | None = None, lists: bool = False) -> None:
    """ValueError unless every value a well-formed ``spec`` can draw has the type of ``default``
    (true/false, an integer, a finite number or a string; also a list of those where ``lists``) and
    is at least ``minimum``, so a bad suite file fails when it loads, not in the middle of a run.
    Defaults of other types (None, lists...) leave the values unchecked."""
    kind = _setting_type(default)
    if kind is None:
        return
    test, words = _SETTING_TYPES[kind]
    values, is_range = [spec], False
    if isinstance(spec, Mapping):
        range_kind, values = next(iter(spec.items()))
        if kind == "int" and range_kind in ("uniform", "log_uniform"):
            raise ValueError(f"{where} takes integers, but {range_kind} draws fractions: use int or log_int")
        is_range = range_kind != "choice"
    for value in values:  # the fixed value, the choice's members, or the range's bounds
        shown = dict(spec) if is_range else value
        for v in (value if lists and isinstance(value, list) and value else [value]):
            if not test(v):
                raise ValueError(f"{where} must be {words}{' (or a list of them)' if lists else ''}, got {shown!r}")
            if minimum is not None and v < minimum:
                raise ValueError(f"{where} must be >= {minimum:g}, got {shown!r}")


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
