"""Finished runs cached on disk, so an interrupted benchmark resumes where it stopped.

One JSON file per run under ``DIR/cache/``, named by the sha256 of its key: suite, task identity,
optimizer identity (holding the weights' sha256 for learned optimizers), lr, seed, steps,
evaluation interval, device type and library version. A changed weights file therefore misses
its old entries. Writes are atomic; an unreadable or inconsistent entry (see :func:`check_result`)
is treated as missing and rerun.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

from learned_opt._version import __version__
from learned_opt.bench.runner import RunResult, eval_points
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


def _key_digest(key: dict[str, Any]) -> str:
    text = json.dumps(key, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_result(result: RunResult, key: dict[str, Any]) -> RunResult:
    """``result`` if it is what :func:`learned_opt.bench.runner.run` could have recorded for ``key``;
    ValueError otherwise. An edited or bit-rotted entry (NaN losses in a run not flagged as
    diverged, a curve that stops early) would otherwise crash every later report, or skew it."""
    steps, losses = result.steps, result.losses
    if not steps or len(steps) != len(losses) or steps[0] != 0:
        raise ValueError(f"evaluations {steps!r} and losses do not form a curve starting at step 0")
    if any(not isinstance(s, int) or isinstance(s, bool) for s in steps) or sorted(set(steps)) != steps:
        raise ValueError(f"evaluated steps {steps!r} are not increasing ints")
    if result.seed != key["seed"] or not isinstance(result.diverged, bool):
        raise ValueError(f"seed {result.seed!r} / diverged {result.diverged!r} do not match the entry")
    if not result.diverged:
        if steps != eval_points(key["steps"], key["eval_every"]):
            raise ValueError(f"a finished run evaluates at {eval_points(key['steps'], key['eval_every'])}, "
                             f"this one at {steps}")
        if not all(math.isfinite(x) for x in losses):
            raise ValueError("non-finite losses in a run not flagged as diverged")
    return result


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
        return _key_digest(key) in self._memory

    def get(self, key: dict[str, Any]) -> RunResult | None:
        digest = _key_digest(key)
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
            return check_result(RunResult.from_json(data["result"]), key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"ignoring benchmark cache entry {path} (unreadable or inconsistent; rerunning it): {exc}",
                          stacklevel=3)
            return None

    def put(self, key: dict[str, Any], result: RunResult) -> None:
        digest = _key_digest(key)
        self._memory[digest] = result
        if self.root is not None:
            atomic_write_json(self._path(digest), {"key": json.loads(json.dumps(key, default=repr)),
                                                   "result": result.to_json()})
