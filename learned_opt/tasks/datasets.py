"""Dataset loaders: MNIST from IDX files, scikit-learn's bundled sets, MNIST-1D, synthetic data.

Nothing here downloads. Real datasets are cached in-process (meta-training samples thousands of
tasks from them) and returned as read-only float32/int64 arrays; synthetic sets are generated
from a seed each call (they are cheap and differ per task).
"""

from __future__ import annotations

import functools
import gzip
import os
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {"images": 2051, "labels": 2049}
# With only the official 10k test set present, tasks use a fixed split of it.
TEST_ONLY_SPLIT = 8000

SKLEARN_DATASETS = ("digits", "breast_cancer", "iris", "wine", "diabetes")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Arrays of one dataset split into train and test; ``num_classes`` is 0 for regression."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def tensors(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((x_train, y_train), (x_test, y_test))`` as torch tensors (float32 inputs).

        Converted once per Dataset, so tasks sampled from a cached real dataset share its tensors
        (tasks never write to their data).
        """
        return self._tensors

    @functools.cached_property
    def _tensors(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:

        def conv(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
            yt = torch.as_tensor(np.array(y))
            yt = yt.long() if self.num_classes else yt.float()
            return torch.as_tensor(np.array(x, dtype=np.float32)), yt

        return conv(self.x_train, self.y_train), conv(self.x_test, self.y_test)


def _readonly(*arrays: np.ndarray) -> list[np.ndarray]:
    for a in arrays:
        a.setflags(write=False)
    return list(arrays)


# ----------------------------------------------------------------------------------------- MNIST


def mnist_dir(directory: str | os.PathLike[str] | None = None) -> Path:
    """Where MNIST is read from: ``directory``, else ``$LEARNED_OPT_DATA/mnist``, else the user cache."""
    if directory is not None:
        return Path(directory).expanduser()
    root = os.environ.get("LEARNED_OPT_DATA")
    if root:
        return Path(root).expanduser() / "mnist"
    return Path.home() / ".cache" / "learned_opt" / "data" / "mnist"


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx(path: str | os.PathLike[str], kind: str) -> np.ndarray:
    """Read one IDX file (gzip or raw) of ``kind`` 'images' or 'labels', validating header and size."""
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({e})") from e
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs at least 8)")
    magic = struct.unpack(">i", raw[:4])[0]
    if magic != _IDX_MAGIC[kind]:
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (expected {_IDX_MAGIC[kind]} for MNIST {kind})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    if kind == "images" and tuple(shape[1:]) != (28, 28):
        raise ValueError(f"{path}: MNIST images must be 28x28, header says {shape[1:]}")
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "oversized"
        raise ValueError(
            f"{path}: {what} IDX file: header {shape} needs {expected} bytes, found {len(raw)}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    if kind == "labels" and data.size and data.max() > 9:
        raise ValueError(f"{path}: label {int(data.max())} out of range 0-9; file is corrupt")
    return data


@functools.lru_cache(maxsize=4)
def _load_mnist_cached(directory: str) -> Dataset:
    d = Path(directory)
    found = {key: _find_idx(d, stem) for key, stem in MNIST_FILES.items()}
    if found["test_images"] is None or found["test_labels"] is None:
        expected = ", ".join(f"{s}[.gz]" for s in MNIST_FILES.values())
        raise FileNotFoundError(
            f"MNIST not found in {d}: expected IDX files {expected} (the t10k pair at least). "
            "Pass the directory, or set LEARNED_OPT_DATA to a folder containing mnist/."
        )
    if (found["train_images"] is None) != (found["train_labels"] is None):
        # Half a training set is a broken download, not the test-only setup: say so, never fall back.
        missing = MNIST_FILES["train_images" if found["train_images"] is None else "train_labels"]
        raise FileNotFoundError(f"MNIST in {d} has only half of the training pair: {missing}[.gz] is missing")

    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(found[f"{prefix}_images"], "images")  # type: ignore[arg-type]
        labels = read_idx(found[f"{prefix}_labels"], "labels")  # type: ignore[arg-type]
        if len(images) != len(labels):
            raise ValueError(
                f"{d}: {prefix} images ({len(images)}) and labels ({len(labels)}) differ in count"
            )
        return (images.astype(np.float32) / 255.0)[:, None], labels.astype(np.int64)

    x_test, y_test = pair("test")
    if found["train_images"] is not None and found["train_labels"] is not None:
        x_train, y_train = pair("train")
    else:
        if len(x_test) <= TEST_ONLY_SPLIT:
            raise ValueError(f"{d}: test set has {len(x_test)} images, need > {TEST_ONLY_SPLIT}")
        x_train, y_train = x_test[:TEST_ONLY_SPLIT], y_test[:TEST_ONLY_SPLIT]
        x_test, y_test = x_test[TEST_ONLY_SPLIT:], y_test[TEST_ONLY_SPLIT:]
    return Dataset(*_readonly(x_train, y_train, x_test, y_test), num_classes=10)


def load_mnist(directory: str | os.PathLike[str] | None = None) -> Dataset:
    """MNIST as images ``(N, 1, 28, 28)`` in [0, 1] and int labels.

    With the full IDX set: the standard 60k/10k split. With only the t10k files: the first 8,000
    test images train, the last 2,000 test. Missing files raise FileNotFoundError naming the
    directory and the expected files; a truncated or corrupt file raises ValueError.
    """
    return _load_mnist_cached(str(mnist_dir(directory).resolve()))


# -------------------------------------------------------------------------- scikit-learn, MNIST-1D


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(0)
    std = np.maximum(x_train.std(0), 1e-6)
    return (x_train - mean) / std, (x_test - mean) / std


@functools.lru_cache(maxsize=None)
def load_sklearn(name: str, test_fraction: float = 0.25) -> Dataset:
    """A dataset bundled with scikit-learn, split by a fixed permutation (same split every run).

    Tabular inputs are standardised with training statistics; ``digits`` becomes ``(N, 1, 8, 8)``
    images in [0, 1]; ``diabetes`` targets are standardised.
    """
    if name not in SKLEARN_DATASETS:
        raise ValueError(f"unknown scikit-learn dataset {name!r}; known: {list(SKLEARN_DATASETS)}")
    try:
        from sklearn import datasets as skd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"dataset {name!r} needs scikit-learn: pip install 'learned_opt[data]'"
        ) from e
    bunch = getattr(skd, f"load_{name}")()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target)
    perm = np.random.default_rng(0).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    tr, te = perm[n_test:], perm[:n_test]
    if name == "digits":
        x_train, x_test = (x[tr] / 16.0).reshape(-1, 1, 8, 8), (x[te] / 16.0).reshape(-1, 1, 8, 8)
    else:
        x_train, x_test = _standardize(x[tr], x[te])
    if name == "diabetes":
        y_train, y_test = _standardize(y[tr, None], y[te, None])
        num_classes = 0
    else:
        y_train, y_test = y[tr].astype(np.int64), y[te].astype(np.int64)
        num_classes = int(y.max()) + 1
    arrays = [np.ascontiguousarray(a, dtype=a.dtype if a.dtype == np.int64 else np.float32)
              for a in (x_train, y_train, x_test, y_test)]
    return Dataset(*_readonly(*arrays), num_classes=num_classes)


@functools.lru_cache(maxsize=None)
def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
    """MNIST-1D (40-d sequences, 10 classes) generated procedurally by the ``mnist1d`` package.

    ``make_dataset`` seeds the global ``random``/``numpy`` generators; their state is restored.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("dataset 'mnist1d' needs the mnist1d package: pip install 'learned_opt[data]'") from e
    args = get_dataset_args()
    args.num_samples, args.seed = int(num_samples), int(seed)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = [np.ascontiguousarray(d["x"], dtype=np.float32), np.asarray(d["y"], dtype=np.int64),
              np.ascontiguousarray(d["x_test"], dtype=np.float32), np.asarray(d["y_test"], dtype=np.int64)]
    return Dataset(*_readonly(*arrays), num_classes=10)


# ------------------------------------------------------------------------------------- synthetic


def _split(x: np.ndarray, y: np.ndarray, n_train: int, num_classes: int) -> Dataset:
    x = x.astype(np.float32)
    y = y.astype(np.int64) if num_classes else y.astype(np.float32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)


def make_blobs(rng: np.random.Generator, n_train: int, n_test: int, dim: int, classes: int,
               spread: float = 1.0) -> Dataset:
    """Gaussian clusters: class centres ~ N(0, 2²) in ``dim`` dimensions, points ~ centre + N(0, spread²)."""
    centres = rng.normal(0.0, 2.0, size=(classes, dim))
    y = rng.integers(classes, size=n_train + n_test)
    x = centres[y] + rng.normal(0.0, spread, size=(len(y), dim))
    return _split(x, y, n_train, classes)


def make_spirals(rng: np.random.Generator, n_train: int, n_test: int, classes: int,
                 noise: float = 0.1, turns: float = 1.0) -> Dataset:
    """Interleaved 2-d spiral arms, one per class, with Gaussian noise."""
    y = rng.integers(classes, size=n_train + n_test)
    r = rng.uniform(0.05, 1.0, size=len(y))
    angle = 2 * np.pi * (turns * r + y / classes)
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) + rng.normal(0, noise, size=(len(y), 2))
    return _split(x, y, n_train, classes)


def make_rings(rng: np.random.Generator, n_train: int, n_test: int, classes: int,
               noise: float = 0.1) -> Dataset:
    """Concentric 2-d rings, one per class (radius (k + 1) / classes), with Gaussian noise."""
    y = rng.integers(classes, size=n_train + n_test)
    angle = rng.uniform(0.0, 2 * np.pi, size=len(y))
    r = (y + 1) / classes
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) + rng.normal(0, noise, size=(len(y), 2))
    return _split(x, y, n_train, classes)


def make_checkerboard(rng: np.random.Generator, n_train: int, n_test: int, classes: int,
                      noise: float = 0.1, cells: int = 4) -> Dataset:
    """Points uniform in [-1, 1]², labelled by their cell of a ``cells × cells`` board ((i + j) mod classes),
    then jittered by Gaussian noise: a 2-d problem a network can only fit by placing its kinks (biases)."""
    x = rng.uniform(-1.0, 1.0, size=(n_train + n_test, 2))
    idx = np.clip(((x + 1.0) / 2.0 * cells).astype(np.int64), 0, cells - 1)
    y = (idx[:, 0] + idx[:, 1]) % classes
    return _split(x + rng.normal(0, noise, size=x.shape), y, n_train, classes)


def make_linear(rng: np.random.Generator, n_train: int, n_test: int, dim: int, noise: float) -> Dataset:
    """Linear regression data: ``y = x·w + noise·ε`` with ``x, ε ~ N(0, 1)``, ``w ~ N(0, 1/dim)``."""
    x = rng.normal(size=(n_train + n_test, dim))
    w = rng.normal(size=(dim, 1)) / np.sqrt(dim)
    y = x @ w + noise * rng.normal(size=(len(x), 1))
    return _split(x, y, n_train, 0)


def make_linear_classes(rng: np.random.Generator, n_train: int, n_test: int, dim: int,
                        classes: int) -> Dataset:
    """Classification by a random linear teacher: label = sample of softmax(3·x·W) (overlapping classes)."""
    x = rng.normal(size=(n_train + n_test, dim))
    logits = 3.0 * x @ (rng.normal(size=(dim, classes)) / np.sqrt(dim))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = (p.cumsum(1) < rng.uniform(size=(len(x), 1))).sum(1).clip(max=classes - 1)
    return _split(x, y, n_train, classes)


def make_teacher_regression(rng: np.random.Generator, n_train: int, n_test: int, dim: int,
                            noise: float) -> Dataset:
    """Nonlinear regression: ``y = sum_k a_k tanh(x·v_k) + noise·ε`` from a random 1-hidden-layer teacher."""
    x = rng.normal(size=(n_train + n_test, dim))
    v = rng.normal(size=(dim, 16)) / np.sqrt(dim) * 2.0
    a = rng.normal(size=(16, 1)) / 4.0
    y = np.tanh(x @ v) @ a
    y = y / max(float(y.std()), 1e-6) + noise * rng.normal(size=y.shape)
    return _split(x, y, n_train, 0)
