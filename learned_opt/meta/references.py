"""Tuned-Adam references shared by the ES runs of one work folder.

A reference (tuned Adam's final loss, its lr and the initial loss of one task draw) depends on the
suite's task, the draw's seed and horizon, the code, torch and the thread count, not on the recipe.
Recipes that draw from one suite file (the told θ and ``default-free`` draw the same tasks at the
same steps; ``default-travel`` the same long draws) then compute each reference once: the cache is
a JSON file beside their run folders, keyed by the suite file's sha256, a digest of this package's
source, torch's version and the thread count as well, so a changed package or torch starts afresh.
It only accelerates: every run still keeps its own references in its checkpoint, a missing or
unreadable cache is recomputed, and each addition is merged into the file as read just before and
written atomically, so runs writing at once can at worst drop an entry another wrote in between
(recomputed when next needed).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from learned_opt.fileio import atomic_write_json
from learned_opt.suites import Suite

REFERENCE_VERSION = 1  # bump when the references' meaning changes (what the key cannot see)


@lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (16 hex digits) of this package's Python sources: any code change starts a new cache."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class SharedReferences:
    """``get``/``put`` references by draw key, in a JSON file shared by runs of the same suite file and code."""

    def __init__(self, path: str | Path, suite: Suite) -> None:
        if suite.path is None:
            raise ValueError(f"suite {suite.name!r} has no file: shared references are keyed by its file's contents")
        suite_digest = hashlib.sha256(Path(suite.path).read_bytes()).hexdigest()[:16]
        self.path = Path(path)
        self.prefix = (f"v{REFERENCE_VERSION}|suite={suite_digest}|code={source_digest()}|torch={torch.__version__}"
                       f"|threads={torch.get_num_threads()}|")
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
        """The cached ``[final, lr, initial]`` of draw ``key`` (the file re-read on a miss), or None."""
        if self.prefix + key not in self.entries:
            self.entries = {**self._read(), **self.entries}
        value = self.entries.get(self.prefix + key)
        return list(value) if value is not None else None

    def put(self, key: str, value: list[float]) -> None:
        """Add draw ``key``'s reference, merged with what other runs wrote since."""
        self.entries = {**self._read(), **self.entries, self.prefix + key: [float(x) for x in value]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self.entries)
