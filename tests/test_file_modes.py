"""Output files honour the umask (0o666 less it), like any other tool's, not mkstemp's 0o600."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from learned_opt.fileio import atomic_write_bytes, atomic_write_json
from learned_opt.rules import GradNormDecayRule
from learned_opt.weights import save_weights


@pytest.fixture(params=[0o022, 0o002, 0o077], ids=oct)
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_honour_the_umask(tmp_path: Path, umask: int) -> None:
    expected = 0o666 & ~umask
    new = atomic_write_bytes(tmp_path / "sub" / "new.bin", b"x")
    assert _mode(new) == expected
    existing = tmp_path / "existing.json"
    existing.write_text("{}")
    existing.chmod(0o600)
    atomic_write_json(existing, {"a": 1})  # a replaced file is a new file: the umask decides, as for cp
    assert _mode(existing) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.json", "sub"]  # no temp file left


def test_weights_and_card_honour_the_umask(tmp_path: Path, umask: int) -> None:
    weights = save_weights(GradNormDecayRule(), tmp_path / "w", name="w", meta_training={})
    assert _mode(weights) == _mode(tmp_path / "w.json") == 0o666 & ~umask


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "f", object())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
