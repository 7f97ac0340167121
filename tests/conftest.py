"""Test setup: point LEARNED_OPT_DATA at the shared data, and make missing data fail under CI."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("LEARNED_OPT_DATA", str(SHARED_DATA))

T = TypeVar("T")


def missing_data(reason: str) -> None:
    """Skip the test for missing data, or fail it when ``CI=true`` (CI must never skip silently)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"required data missing under CI: {reason}")
    pytest.skip(f"data missing: {reason}")


@pytest.fixture
def need_data() -> Callable[[Callable[[], T]], T]:
    """``need_data(load)`` returns ``load()``, or skips/fails (see :func:`missing_data`) when it
    raises FileNotFoundError (a dataset that is not there) or ImportError (no sklearn/mnist1d)."""

    def call(load: Callable[[], T]) -> T:
        try:
            return load()
        except (FileNotFoundError, ImportError) as e:
            missing_data(str(e))
            raise  # unreachable: missing_data always raises

    return call


@pytest.fixture
def mnist(need_data):
    """The MNIST dataset from LEARNED_OPT_DATA (the shared 10k test set in this repo's setup)."""
    from learned_opt.tasks.datasets import load_mnist

    return need_data(load_mnist)
