"""The output-directory lock: one run per directory, stale locks of dead processes taken over."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import learned_opt.lockfile
from learned_opt.lockfile import LOCK_NAME, DirectoryLockError, lock_directory

# Loads the module from its file, so the child starts fast (no torch import through the package).
HOLDER = f"""
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("lockfile", {learned_opt.lockfile.__file__!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with mod.lock_directory(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_holder_is_refused_naming_directory_and_owner(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with lock_directory(out) as path:
        assert path == out / LOCK_NAME and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(DirectoryLockError, match=rf"^{out} is in use by another run \(PID {os.getpid()} on .*"
                                                     r"use another output directory$"):
            with lock_directory(out):
                pass
        (out / "metrics.csv").write_text("step\n")
    assert not path.exists() and (out / "metrics.csv").exists()  # released; the run's output stays
    with lock_directory(out):  # free again
        pass


def test_directories_it_created_are_removed_when_left_empty(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with lock_directory(out):
            raise RuntimeError("refused before writing anything")
    assert not (tmp_path / "a").exists()


def test_a_regular_file_is_not_a_directory_to_lock(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DirectoryLockError, match="file exists and is not a directory"):
        with lock_directory(tmp_path / "file"):
            pass
    with pytest.raises(DirectoryLockError, match=r"cannot create output directory .*file/out: Not a directory"):
        with lock_directory(tmp_path / "file" / "out"):
            pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "since": "then"}))
    with caplog.at_level(logging.INFO, logger="learned_opt.lockfile"), lock_directory(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"taking over a stale lock (PID {dead.pid} on h, since then" in caplog.text


def test_live_process_holds_the_lock_until_killed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(DirectoryLockError, match=f"in use by another run \\(PID {holder.pid} on "):
            with lock_directory(out):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays behind
        holder.wait()
    assert (out / LOCK_NAME).exists()
    with lock_directory(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
