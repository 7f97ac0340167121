"""Suites: which task families, with which ranges, horizons and seeds — read from ``tasks/*.toml``.

A suite file's ``[suite]`` table lists ``[[suite.family]]`` entries and disjoint task-seed ranges
for the ``train``, ``validation`` and ``test`` splits. Other tables (``[meta_train]``,
``[benchmark]``) are kept raw in :attr:`Suite.tables` for the tools that own them; each tool
validates its own table with :func:`check_table`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from learned_opt.tasks.base import Task, TaskFamily
from learned_opt.tasks.registry import make_family

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SPLITS = ("train", "validation", "test")
# Top-level tables a suite file may hold: [suite] here, the others read by the tool that owns them.
# A misspelt table would otherwise be silently ignored, so anything else is an error.
TOP_LEVEL_TABLES = ("suite", "meta_train", "benchmark")
# Installed wheels carry the suite files here (copied from the top-level tasks/ at build time).
PACKAGE_SUITES = Path(__file__).resolve().parent / "suite_files"
# Running from a checkout: the repository's tasks/ folder, the one source of truth.
CHECKOUT_SUITES = Path(__file__).resolve().parent.parent / "tasks"

_SUITE_KEYS: dict[str, object] = {"name": None, "description": "", "steps": 100, "seeds": None, "family": None}
_ENTRY_KEYS: dict[str, object] = {"label": None, "family": None, "steps": None, "weight": 1.0, "settings": {}}


@dataclass
class SuiteEntry:
    """One ``[[suite.family]]`` entry: one row in reports."""

    label: str
    family: TaskFamily
    steps: int
    weight: float = 1.0

    def task(self, seed: int) -> Task:
        """The task of this entry for ``seed`` (init/batches then come from a generator with that seed)."""
        return self.family.sample(seed)


@dataclass
class Suite:
    name: str
    path: Path | None
    entries: list[SuiteEntry]
    seeds: dict[str, range]
    steps: int
    tables: dict[str, dict] = field(default_factory=dict)
    description: str = ""

    def sample(self, split: str, rng: np.random.Generator,
               labels: Sequence[str] | None = None) -> tuple[SuiteEntry, int]:
        """A weight-proportional entry (among ``labels`` if given) and a uniformly drawn task seed of ``split``."""
        if split not in self.seeds:
            raise ValueError(f"unknown split {split!r}; splits: {list(self.seeds)}")
        entries = self.entries if labels is None else [self.entry(label) for label in labels]
        if not entries:
            raise ValueError(f"suite {self.name!r}: no entries to sample from (labels={labels!r})")
        weights = np.array([e.weight for e in entries], dtype=float)
        entry = entries[int(rng.choice(len(entries), p=weights / weights.sum()))]
        seeds = self.seeds[split]
        return entry, int(rng.integers(seeds.start, seeds.stop))

    def reweighted(self, weights: Mapping[str, float]) -> Suite:
        """A copy whose entries named in ``weights`` (label -> weight) are drawn with those weights
        instead (a recipe's reweighting of a shared suite); an unknown label is a ValueError."""
        labels = [e.label for e in self.entries]
        unknown = sorted(set(weights) - set(labels))
        if unknown:
            raise ValueError(f"suite {self.name!r}: entry_weights names {unknown}, not entries of it; entries: {labels}")
        entries = [replace(e, weight=float(weights.get(e.label, e.weight))) for e in self.entries]
        return replace(self, entries=entries)

    def entry(self, label: str) -> SuiteEntry:
        """The entry called ``label``."""
        for e in self.entries:
            if e.label == label:
                return e
        raise ValueError(f"suite {self.name!r} has no entry {label!r}; entries: {[e.label for e in self.entries]}")


def check_table(
    table: Mapping[str, Any],
    allowed: Mapping[str, object],
    *,
    file: str | Path | None,
    table_name: str,
) -> dict:
    """``{**allowed, **table}``; an unknown key raises ValueError naming file, table, key and allowed keys."""
    if not isinstance(table, Mapping):
        raise ValueError(f"{file or '<suite>'}: [{table_name}] must be a table, got {type(table).__name__}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ValueError(
            f"{file or '<suite>'}: unknown key(s) {unknown} in [{table_name}]; allowed keys: {sorted(allowed)}"
        )
    return {**allowed, **table}


def _seed_ranges(seeds: Any, file: str | Path | None) -> dict[str, range]:
    where = f"{file or '<suite>'}: [suite].seeds"
    if not isinstance(seeds, Mapping):
        raise ValueError(f"{where} must be a table {{train = [a, b], validation = [...], test = [...]}}")
    check_table(seeds, dict.fromkeys(SPLITS), file=file, table_name="suite.seeds")
    out: dict[str, range] = {}
    for split in SPLITS:
        value = seeds.get(split)
        if not (isinstance(value, (list, tuple)) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
                and 0 <= value[0] < value[1]):
            raise ValueError(f"{where}.{split} must be a half-open range [a, b) with 0 <= a < b, got {value!r}")
        out[split] = range(value[0], value[1])
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            if out[a].start < out[b].stop and out[b].start < out[a].stop:
                raise ValueError(f"{where}: {a} {list(seeds[a])} and {b} {list(seeds[b])} overlap")
    return out


def _positive(value: Any, types: type | tuple[type, ...]) -> bool:
    """``value`` is a finite number > 0 of ``types``; TOML's true/false and nan/inf are not."""
    return isinstance(value, types) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _entry(raw: Any, i: int, steps: int, file: str | Path | None) -> SuiteEntry:
    where = f"suite.family[{i}]"
    e = check_table(raw, _ENTRY_KEYS, file=file, table_name=where)
    if not isinstance(e["settings"], Mapping):
        raise ValueError(f"{file or '<suite>'}: [{where}].settings must be a table, got {e['settings']!r}")
    if not isinstance(e["label"], str) or not e["label"]:
        raise ValueError(f"{file or '<suite>'}: [{where}] needs a non-empty string 'label'")
    if not isinstance(e["family"], str):
        raise ValueError(f"{file or '<suite>'}: [{where}] ({e['label']}) needs 'family' (a name or module:Class)")
    try:
        family = make_family(e["family"], e["settings"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{file or '<suite>'}: [{where}] ({e['label']}): {err}") from err
    entry_steps = steps if e["steps"] is None else e["steps"]
    if not _positive(entry_steps, int):
        raise ValueError(f"{file or '<suite>'}: [{where}] ({e['label']}): steps must be a positive int, got {entry_steps!r}")
    if not _positive(e["weight"], (int, float)):
        raise ValueError(f"{file or '<suite>'}: [{where}] ({e['label']}): weight must be a finite number > 0, "
                         f"got {e['weight']!r}")
    return SuiteEntry(e["label"], family, entry_steps, float(e["weight"]))


def parse_suite(data: Mapping[str, Any], *, name: str, path: Path | None = None) -> Suite:
    """Build a Suite from an already-parsed TOML document (validating ``[suite]`` only)."""
    if "suite" not in data:
        raise ValueError(f"{path or '<suite>'}: no [suite] table")
    unknown = sorted(set(data) - set(TOP_LEVEL_TABLES))
    if unknown:
        raise ValueError(
            f"{path or '<suite>'}: unknown top-level table(s) {unknown}; allowed: {list(TOP_LEVEL_TABLES)}"
        )
    s = check_table(data["suite"], _SUITE_KEYS, file=path, table_name="suite")
    if not _positive(s["steps"], int):
        raise ValueError(f"{path or '<suite>'}: [suite].steps must be a positive int, got {s['steps']!r}")
    seeds = _seed_ranges(s["seeds"], path)
    raw_entries = s["family"]
    if not isinstance(raw_entries, list) or not raw_entries:
        raise ValueError(f"{path or '<suite>'}: [suite] needs at least one [[suite.family]] entry")
    entries = [_entry(raw, i, s["steps"], path) for i, raw in enumerate(raw_entries)]
    labels = [e.label for e in entries]
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f"{path or '<suite>'}: duplicate entry label(s) {duplicates}")
    tables = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items() if k != "suite"}
    return Suite(s["name"] or name, path, entries, seeds, s["steps"], tables, s["description"])


def suite_dirs() -> list[Path]:
    """Where suites are looked up by name: the installed package data, else the checkout's tasks/."""
    return [PACKAGE_SUITES] if PACKAGE_SUITES.is_dir() else [CHECKOUT_SUITES]


def list_suites() -> list[str]:
    """Names of the suites found by :func:`load_suite`."""
    return sorted(p.stem for d in suite_dirs() if d.is_dir() for p in d.glob("*.toml"))


def load_suite(name_or_path: str | Path) -> Suite:
    """Load a suite by name (``"heldout"``: installed package data or the checkout's tasks/) or by path."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"suite file {path} does not exist")
    else:
        candidates = [d / f"{text}.toml" for d in suite_dirs()]
        path = next((p for p in candidates if p.is_file()), None)  # type: ignore[assignment]
        if path is None:
            raise ValueError(f"unknown suite {text!r}; known suites: {list_suites()} (or pass a .toml path)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: invalid TOML: {e}") from e
    return parse_suite(data, name=path.stem, path=path)
