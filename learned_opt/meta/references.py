"""Tuned-Adam references shared by the ES runs of one work folder.

A reference (tuned Adam's final loss, its lr and the initial loss of one task draw) depends only on
the suite's task, the draw's seed and horizon, this code and the thread count, not on the recipe.
Recipes that draw from one suite file (the told θ and ``default-free`` draw the same tasks at the
same steps; ``default-travel`` the same long draws) then compute each reference once: the cache
is a JSON file beside their run folders, keyed by the suite file's sha256 as well. It only
accelerates: every run still keeps its own references in its checkpoint, a missing or unreadable
cache is recomputed, and each addition is merged into the file and written atomically, so two runs
writing at once can at worst drop each other's newest entry (recomputed when next needed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from learned_opt.fileio import atomic_write_json
from learned_opt.suites import Suite

REFERENCE_VERSION = 1  # bump when tuned_adam_final changes what it computes


class SharedReferences:
    """``get``/``put`` references by draw key, in a JSON file shared by runs of the same suite file."""

    def __init__(self, path: str | Path, suite: Suite) -> None:
        if suite.path is None:
            raise ValueError(f"suite {suite.name!r} has no file: shared references are keyed by its file's contents")
        digest = hashlib.sha256(Path(suite.path).read_bytes()).hexdigest()[:16]
        self.path = Path(path)
        self.prefix = f"v{REFERENCE_VERSION}|{digest}|threads={torch.get_num_threads()}|"
        self.entries = self._read()

    def _read(self) -> dict[str, list[float]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: [float(x) for x in v] for k, v in data.items()
                if isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)}

    def get(self, key: str) -> list[float] | None:
        """The cached ``[final, lr, initial]`` of draw ``key``, or None."""
        value = self.entries.get(self.prefix + key)
        return list(value) if value is not None else None

    def put(self, key: str, value: list[float]) -> None:
        """Add draw ``key``'s reference, merged with what other runs wrote since."""
        self.entries = {**self._read(), **self.entries, self.prefix + key: [float(x) for x in value]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.entries)
