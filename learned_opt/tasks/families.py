"""Data-driven task families: linear/logistic regression, MLPs and a small CNN, all as ModuleTasks.

Every family draws its settings from the task seed (``TaskFamily.draw_settings``) and generates
synthetic data from the same seed, so ``family.sample(seed)`` is fully determined by ``seed``.
Settings that do not apply to the chosen dataset (``classes`` for a real dataset, say) are ignored:
``n_train``, ``dim``, ``classes``, ``noise`` shape synthetic data; ``subset`` truncates real data.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from learned_opt.tasks import datasets as ds
from learned_opt.tasks.base import TaskFamily, spec_bounds
from learned_opt.tasks.module_task import ModuleTask

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def mlp(in_dim: int, widths: Sequence[int], out_dim: int, act: str) -> nn.Sequential:
    """Flatten, then Linear+activation per hidden width, then a Linear read-out."""
    layers: list[nn.Module] = [nn.Flatten()]
    for w in widths:
        layers += [nn.Linear(in_dim, w), activation(act)]
        in_dim = w
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int, channels: int, num_classes: int, act: str) -> nn.Sequential:
    """Three 3×3 convs (the last two stride 2, channels c, 2c, 2c), global average pool, linear."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(in_channels, c, 3, padding=1), activation(act),
        nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), activation(act),
        nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), activation(act),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes),
    )


def hidden_widths(width: int | Sequence[int], depth: int) -> list[int]:
    """``width`` repeated ``depth`` times, or a per-layer list whose length must equal ``depth``."""
    if isinstance(width, (list, tuple)):
        if len(width) != depth:
            raise ValueError(f"width list {list(width)} has {len(width)} entries but depth is {depth}")
        widths = [int(w) for w in width]
    else:
        widths = [int(width)] * int(depth)
    if depth < 0 or any(w < 1 for w in widths):
        raise ValueError(f"need depth >= 0 and widths >= 1, got depth={depth}, width={width}")
    return widths


@functools.lru_cache(maxsize=32)
def _subsample(d: ds.Dataset, subset: int) -> ds.Dataset:
    if subset and subset < len(d.x_train):
        return ds.Dataset(d.x_train[:subset], d.y_train[:subset], d.x_test, d.y_test, d.num_classes)
    return d


CLASSIFICATION_DATASETS = ("blobs", "spirals", "rings", "checkerboard", "linear", "digits", "mnist", "mnist1d",
                           "breast_cancer", "iris", "wine")
REGRESSION_DATASETS = ("linear", "teacher", "diabetes")


def load_data(name: str, seed: int, s: Mapping[str, Any], *, regression: bool = False) -> ds.Dataset:
    """The dataset ``name`` for a task: real sets from the in-process cache, synthetic ones from ``seed``.

    ``s`` holds the drawn settings; synthetic sets use ``n_train`` (test split = n_train // 4),
    ``dim``, ``classes`` and ``noise``; real sets keep the first ``subset`` training examples (0: all).
    ``linear`` is a linear-teacher regression set when ``regression`` is true, else classification.
    """
    n_train, subset = int(s.get("n_train", 0)), int(s.get("subset", 0))
    rng = np.random.default_rng([int(seed), 2])
    synthetic = {
        "blobs": lambda: ds.make_blobs(rng, n_train, n_train // 4, int(s["dim"]), int(s["classes"])),
        "spirals": lambda: ds.make_spirals(rng, n_train, n_train // 4, int(s["classes"]), float(s["noise"])),
        "rings": lambda: ds.make_rings(rng, n_train, n_train // 4, int(s["classes"]), float(s["noise"])),
        "checkerboard": lambda: ds.make_checkerboard(rng, n_train, n_train // 4, int(s["classes"]), float(s["noise"])),
        "linear": lambda: (ds.make_linear(rng, n_train, n_train // 4, int(s["dim"]), float(s["noise"]))
                           if regression else
                           ds.make_linear_classes(rng, n_train, n_train // 4, int(s["dim"]), int(s["classes"]))),
        "teacher": lambda: ds.make_teacher_regression(rng, n_train, n_train // 4, int(s["dim"]), float(s["noise"])),
    }
    if name in synthetic:
        if n_train < 1:
            raise ValueError(f"synthetic dataset {name!r} needs n_train >= 1, got {n_train}")
        return synthetic[name]()
    if name == "mnist":
        return _subsample(ds.load_mnist(), subset)
    if name == "mnist1d":
        return _subsample(ds.load_mnist1d(), subset)
    return _subsample(ds.load_sklearn(name), subset)


class DataFamily(TaskFamily):
    """Base of the data-driven families: validates the dataset choice and builds the ModuleTask."""

    datasets: ClassVar[tuple[str, ...]] = ()
    loss: ClassVar[str] = "cross_entropy"
    list_settings: ClassVar[tuple[str, ...]] = ("width",)
    minimums: ClassVar[dict[str, float]] = {
        "dim": 1, "classes": 2, "n_train": 1, "batch_size": 1, "width": 1, "depth": 0, "channels": 1, "subset": 0,
        "noise": 0, "init_scale": 0,
    }

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        # Names are checked here, not at sample time, so a typo in a suite file fails when it loads.
        self._check_names("dataset", self.datasets)
        if "activation" in self.settings:
            self._check_names("activation", tuple(ACTIVATIONS))

    def _check_names(self, key: str, known: Sequence[str]) -> None:
        """ValueError unless every value setting ``key`` can draw is one of ``known``."""
        values = spec_bounds(self.settings[key])
        bad = [v for v in values if v not in known] if isinstance(values, list) else values
        if bad:
            raise ValueError(f"{self.name}: {key} {bad} not supported; choose from {list(known)}")

    def build(self, data: ds.Dataset, s: Mapping[str, Any]) -> nn.Module:
        """The model for ``data`` with drawn settings ``s``: an MLP (``depth`` 0, the default, is linear)."""
        widths = hidden_widths(s.get("width", 1), int(s.get("depth", 0)))
        return mlp(_features(data), widths, _outputs(data), s.get("activation", "relu"))

    def sample(self, seed: int) -> ModuleTask:
        s = self.draw_settings(seed)
        data = load_data(s["dataset"], seed, s, regression=self.loss == "mse")
        train, test = data.tensors()
        with torch.random.fork_rng(devices=[]):  # module constructors draw from torch's global RNG
            model = self.build(data, s)
        desc = ", ".join(f"{k}={v}" for k, v in s.items())
        task = ModuleTask(model, train, test, loss=self.loss, batch_size=int(s["batch_size"]),
                          init_scale=float(s["init_scale"]), name=f"{self.name}({desc})")
        task.settings = s
        return task


def _features(data: ds.Dataset) -> int:
    return int(np.prod(data.x_train.shape[1:]))


def _outputs(data: ds.Dataset) -> int:
    return data.num_classes or int(np.prod(data.y_train.shape[1:]) or 1)


class LinearRegressionFamily(DataFamily):
    """Least-squares linear regression (MSE) on synthetic ``y = x·w + noise·ε`` or diabetes."""

    name: ClassVar[str] = "linear_regression"
    datasets = ("linear", "diabetes")
    loss = "mse"
    defaults: ClassVar[dict[str, Any]] = {
        "dataset": "linear", "dim": 10, "noise": 0.1, "n_train": 256, "batch_size": 32, "init_scale": 1.0,
        "subset": 0,
    }


class LogisticRegressionFamily(DataFamily):
    """Multinomial logistic regression (softmax cross-entropy) on synthetic or scikit-learn data."""

    name: ClassVar[str] = "logistic_regression"
    datasets = ("linear", "blobs", "breast_cancer", "iris", "wine", "digits")
    defaults: ClassVar[dict[str, Any]] = {
        "dataset": "linear", "dim": 10, "classes": 2, "n_train": 256, "batch_size": 32, "init_scale": 1.0,
        "subset": 0,
    }


class MLPClassificationFamily(DataFamily):
    """MLP classifiers: ``depth`` hidden layers of ``width`` units (or a per-layer width list)."""

    name: ClassVar[str] = "mlp_classification"
    datasets = CLASSIFICATION_DATASETS
    defaults: ClassVar[dict[str, Any]] = {
        "dataset": "spirals", "width": 32, "depth": 1, "activation": "sigmoid", "batch_size": 64,
        "init_scale": 1.0, "n_train": 512, "classes": 3, "dim": 2, "noise": 0.1, "subset": 0,
    }


class MLPRegressionFamily(DataFamily):
    """MLP regression (MSE) on a random tanh-teacher's outputs plus noise, or on diabetes."""

    name: ClassVar[str] = "mlp_regression"
    datasets = ("teacher", "diabetes")
    loss = "mse"
    defaults: ClassVar[dict[str, Any]] = {
        "dataset": "teacher", "dim": 8, "noise": 0.1, "width": 32, "depth": 1, "activation": "tanh",
        "batch_size": 32, "init_scale": 1.0, "n_train": 256, "subset": 0,
    }


class CNNClassificationFamily(DataFamily):
    """The small CNN of :func:`small_cnn` on 8×8 digits or 28×28 MNIST."""

    name: ClassVar[str] = "cnn_classification"
    datasets = ("digits", "mnist")
    defaults: ClassVar[dict[str, Any]] = {
        "dataset": "digits", "channels": 8, "activation": "relu", "batch_size": 64,
        "init_scale": 1.0, "subset": 0,
    }

    def build(self, data: ds.Dataset, s: Mapping[str, Any]) -> nn.Module:
        return small_cnn(data.x_train.shape[1], int(s["channels"]), data.num_classes, s["activation"])
