"""Dataset loaders: MNIST IDX parsing/validation, scikit-learn sets, MNIST-1D, synthetic data."""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from learned_opt.tasks import datasets as ds


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, compress: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file; ``magic`` overrides the header's magic number."""
    kind = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">i", magic if magic is not None else kind)
    header += struct.pack(f">{array.ndim}i", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist(directory: Path, n_train: int | None, n_test: int, compress: bool = True) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    pairs = [("t10k", n_test)] + ([("train", n_train)] if n_train else [])
    for prefix, n in pairs:
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress=compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), compress=compress)


def test_shared_mnist_uses_fixed_8000_2000_split(mnist):
    assert mnist.x_train.shape == (8000, 1, 28, 28) and mnist.x_test.shape == (2000, 1, 28, 28)
    assert mnist.y_train.shape == (8000,) and mnist.y_test.shape == (2000,)
    assert mnist.x_train.dtype == np.float32 and 0.0 <= mnist.x_train.min() and mnist.x_train.max() <= 1.0
    assert set(np.unique(mnist.y_train)) == set(range(10))
    assert not mnist.x_train.flags.writeable  # the in-process cache cannot be corrupted by a caller
    assert ds.load_mnist() is mnist  # cached in-process


def test_shared_mnist_split_is_first_and_last_of_test_file(mnist):
    from learned_opt.tasks.datasets import mnist_dir, read_idx

    labels = read_idx(mnist_dir() / "t10k-labels-idx1-ubyte.gz", "labels")
    np.testing.assert_array_equal(mnist.y_train, labels[:8000])
    np.testing.assert_array_equal(mnist.y_test, labels[8000:])


def test_full_idx_set_uses_standard_train_test_files(tmp_path):
    write_mnist(tmp_path, n_train=30, n_test=12, compress=False)
    d = ds.load_mnist(tmp_path)
    assert len(d.x_train) == 30 and len(d.x_test) == 12
    raw = ds.read_idx(tmp_path / "train-images-idx3-ubyte", "images")
    np.testing.assert_allclose(d.x_train[:, 0], raw / 255.0, rtol=1e-6)


def test_directory_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("LEARNED_OPT_DATA", str(tmp_path))
    assert ds.mnist_dir() == tmp_path / "mnist"
    assert ds.mnist_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("LEARNED_OPT_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ds.mnist_dir() == tmp_path / "home" / ".cache" / "learned_opt" / "data" / "mnist"


def test_missing_mnist_names_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ds.load_mnist(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "t10k-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg


def test_half_a_training_pair_is_an_error(tmp_path):
    write_mnist(tmp_path, n_train=30, n_test=8010)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-labels-idx1-ubyte\[.gz\] is missing") as err:
        ds.load_mnist(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file_is_an_error(tmp_path, compress):
    write_mnist(tmp_path, n_train=None, n_test=8010, compress=compress)
    name = "t10k-images-idx3-ubyte" + (".gz" if compress else "")
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(ValueError, match="truncated") as err:
        ds.load_mnist(tmp_path)
    assert name in str(err.value)


def test_bad_magic_number_is_an_error(tmp_path):
    write_mnist(tmp_path, n_train=None, n_test=8010)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(8010, np.uint8), magic=2051)
    with pytest.raises(ValueError, match="magic number 2051"):
        ds.load_mnist(tmp_path)


def test_garbage_gzip_is_an_error(tmp_path):
    write_mnist(tmp_path, n_train=None, n_test=8010)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip data")
    with pytest.raises(ValueError, match="corrupt"):
        ds.load_mnist(tmp_path)


def test_count_mismatch_and_bad_labels_are_errors(tmp_path):
    write_mnist(tmp_path, n_train=None, n_test=8010)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(8009, np.uint8))
    with pytest.raises(ValueError, match="differ in count"):
        ds.load_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(8010, 12, np.uint8))
    with pytest.raises(ValueError, match="label 12 out of range"):
        ds.load_mnist(tmp_path)


def test_wrong_image_shape_is_an_error(tmp_path):
    path = write_idx(tmp_path / "imgs", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="28x28"):
        ds.read_idx(path, "images")


@pytest.mark.parametrize("name", ["breast_cancer", "wine", "iris", "diabetes"])
def test_sklearn_tabular_sets_are_standardised_with_fixed_split(name, need_data):
    d = need_data(lambda: ds.load_sklearn(name))
    np.testing.assert_allclose(d.x_train.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(d.x_train.std(0), 1.0, atol=1e-3)
    assert len(d.x_test) > 0 and d.x_train.dtype == np.float32
    ds.load_sklearn.cache_clear()
    again = ds.load_sklearn(name)
    np.testing.assert_array_equal(again.x_test, d.x_test)


def test_digits_are_images(need_data):
    d = need_data(lambda: ds.load_sklearn("digits"))
    assert d.x_train.shape[1:] == (1, 8, 8) and d.num_classes == 10
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0


def test_unknown_sklearn_dataset():
    with pytest.raises(ValueError, match="'nope'"):
        ds.load_sklearn("nope")


def test_mnist1d_is_cached_and_leaves_global_rngs_alone(need_data):
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    d = need_data(ds.load_mnist1d)
    assert (np.random.rand(), random.random()) == (expect_np, expect_py)
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40) and d.num_classes == 10
    assert ds.load_mnist1d() is d


def test_synthetic_sets_are_seeded_and_sized():
    a = ds.make_spirals(np.random.default_rng(5), 100, 25, classes=3)
    b = ds.make_spirals(np.random.default_rng(5), 100, 25, classes=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (100, 2) and a.x_test.shape == (25, 2) and set(np.unique(a.y_train)) == {0, 1, 2}
    blobs = ds.make_blobs(np.random.default_rng(0), 50, 10, dim=7, classes=4)
    assert blobs.x_train.shape == (50, 7) and blobs.y_train.max() < 4
    lin = ds.make_linear(np.random.default_rng(0), 2000, 10, dim=3, noise=0.0)
    w, *_ = np.linalg.lstsq(lin.x_train, lin.y_train, rcond=None)
    np.testing.assert_allclose(lin.x_train @ w, lin.y_train, atol=1e-4)  # noise 0: exactly linear


@pytest.mark.parametrize("make", [ds.make_rings, ds.make_checkerboard], ids=["rings", "checkerboard"])
def test_2d_sets_are_seeded_and_label_by_geometry(make):
    a, b = make(np.random.default_rng(3), 400, 100, classes=3, noise=0.0), make(np.random.default_rng(3), 400, 100, 3, 0.0)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (400, 2) and a.x_test.shape == (100, 2) and set(np.unique(a.y_train)) == {0, 1, 2}
    x, y = a.x_train, a.y_train
    if make is ds.make_rings:  # noise 0: each class on its own radius
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), (y + 1) / 3, atol=1e-5)
    else:  # noise 0: the label is the cell's (i + j) mod classes on the 4 x 4 board
        cells = np.clip(((x + 1) / 2 * 4).astype(int), 0, 3)
        np.testing.assert_array_equal(y, cells.sum(1) % 3)


def test_missing_data_fails_under_ci_and_skips_otherwise(need_data, monkeypatch):
    def load():
        raise FileNotFoundError("no such data here")

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no such data here"):
        need_data(load)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="no such data here"):
        need_data(load)
    assert need_data(lambda: 5) == 5
