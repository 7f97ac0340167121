"""Finished runs cached on disk, so an interrupted benchmark resumes where it stopped.

One JSON file per run under ``DIR/cache/``, named by the sha256 of its key: suite, task identity,
optimizer identity (holding the weights' sha256 for learned optimizers), lr, seed, steps,
evaluation interval, device type and library version. A changed weights file therefore misses
its old entries. Writes are atomic; an unreadable entry is treated as missing and rerun.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from learned_opt._version import __version__
from learned_opt.bench.runner import RunResult
from learned_opt.fileio import atomic_write_json


def lr_key(lr: float | None) -> str | None:
    """A stable text form of a learning rate (12 significant digits absorb float noise)."""
    return None if lr is None else f"{lr:.12g}"


def run_key(
    *,
    suite: str,
    task: dict[str, Any],
    optimizer: dict[str, Any],
    lr: float | None,
    seed: int,
    steps: int,
    eval_every: int,
    device: str,
) -> dict[str, Any]:
    """The identity of one run (see module docstring)."""
    return {
        "suite": suite,
        "task": task,
        "optimizer": optimizer,
        "lr": lr_key(lr),
        "seed": int(seed),
        "steps": int(steps),
        "eval_every": int(eval_every),
        "device": device,
        "version": __version__,
    }


def _digest(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class RunCache:
    """Run results by key; in memory always, on disk under ``root`` when given."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = None if root is None else Path(root)
        self._memory: dict[str, RunResult] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, digest: str) -> Path:
        assert self.root is not None
        return self.root / digest[:2] / f"{digest}.json"

    def in_memory(self, key: dict[str, Any]) -> bool:
        """Whether this run was already fetched or stored in this session."""
        return _digest(key) in self._memory

    def get(self, key: dict[str, Any]) -> RunResult | None:
        digest = _digest(key)
        result = self._memory.get(digest) or self._load(digest, key)
        if result is None:
            self.misses += 1
        else:
            self.hits += 1
            self._memory[digest] = result
        return result

    def _load(self, digest: str, key: dict[str, Any]) -> RunResult | None:
        if self.root is None:
            return None
        path = self._path(digest)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if json.loads(json.dumps(key, default=repr)) != data["key"]:
                return None
            return RunResult.from_json(data["result"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warnings.warn(f"ignoring unreadable benchmark cache entry {path}: {exc}", stacklevel=3)
            return None

    def put(self, key: dict[str, Any], result: RunResult) -> None:
        digest = _digest(key)
        self._memory[digest] = result
        if self.root is not None:
            atomic_write_json(self._path(digest), {"key": json.loads(json.dumps(key, default=repr)),
                                                   "result": result.to_json()})
