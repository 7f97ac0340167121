"""The ``[benchmark]`` table of a suite file: its keys, defaults and validation.

```toml
[benchmark]
optimizers = ["adam", "sgd", "HypergradientSGD"]   # specs, see learned_opt.bench.baselines
tune = true          # tune each tunable optimizer's lr per task (log grid 1e-4 … 1, extended)
seeds = 5            # the first N seeds of the suite's test split
steps = "10x"        # horizon override: an int, or "Nx" to multiply each entry's steps
eval_every = 0       # full-data evaluation interval; 0 = about 25 evaluations per run (tuning runs: at the end only)
timing_steps = 20    # steps of the interleaved timing pass (0 = no timing pass)
pairs = [["GradNormDecaySGD[tune=true]", "sgd"]]  # (rule, the rule it decorates): head-to-head rows
```
Function arguments and command-line flags override the table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BENCHMARK_DEFAULTS: dict[str, object] = {
    "optimizers": ["adam", "sgd"],
    "tune": False,
    "seeds": 5,
    "steps": None,
    "eval_every": 0,
    "timing_steps": 20,
    "pairs": [],
}

_MULTIPLIER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[x×]\s*$")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_steps_override(value: Any, where: str) -> int | str | None:
    """``None``, a positive int, or ``"Nx"`` (N > 0)."""
    if value is None or (_is_int(value) and value > 0):
        return value
    if isinstance(value, str):
        if value.strip().isdigit() and int(value) > 0:
            return int(value)
        match = _MULTIPLIER.match(value)
        if match and float(match[1]) > 0:
            return value.strip()
    raise ValueError(f"{where}: steps must be a positive int or 'Nx' (e.g. '10x'), got {value!r}")


def resolve_steps(entry_steps: int, override: int | str | None) -> int:
    """The horizon for an entry: its own, a fixed override, or a multiple of its own (``"10x"``)."""
    if override is None:
        return int(entry_steps)
    if isinstance(override, str):
        match = _MULTIPLIER.match(override)
        if match is None:
            return int(override)
        return max(1, round(float(match[1]) * entry_steps))
    return int(override)


def read_benchmark_table(tables: Mapping[str, Any], file: str | Path | None) -> dict[str, Any]:
    """The validated ``[benchmark]`` table merged over :data:`BENCHMARK_DEFAULTS`."""
    from learned_opt.suites import check_table

    table = check_table(tables.get("benchmark", {}), BENCHMARK_DEFAULTS, file=file, table_name="benchmark")
    where = f"{file or '<suite>'}: [benchmark]"
    opts = table["optimizers"]
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise ValueError(f"{where}.optimizers must be a list of optimizer specs (strings), got {opts!r}")
    if not isinstance(table["tune"], bool):
        raise ValueError(f"{where}.tune must be true or false, got {table['tune']!r}")
    if not (_is_int(table["seeds"]) and table["seeds"] > 0):
        raise ValueError(f"{where}.seeds must be a positive int (how many test seeds), got {table['seeds']!r}")
    table["steps"] = check_steps_override(table["steps"], f"{where}.steps")
    for key in ("eval_every", "timing_steps"):
        if not (_is_int(table[key]) and table[key] >= 0):
            raise ValueError(f"{where}.{key} must be an int >= 0, got {table[key]!r}")
    table["pairs"] = check_pairs(table["pairs"], f"{where}.pairs")
    return table


def check_pairs(value: Any, where: str) -> list[tuple[str, str]]:
    """``[[candidate, baseline], ...]`` (optimizer labels) as a list of tuples; ValueError otherwise."""
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in value)
    if not ok:
        raise ValueError(f"{where} must be a list of [candidate, baseline] optimizer labels, got {value!r}")
    pairs = [(c, b) for c, b in value]
    for i, (c, b) in enumerate(pairs):
        if c == b or (c, b) in pairs[:i]:
            raise ValueError(f"{where}: [{c!r}, {b!r}] is {'an optimizer against itself' if c == b else 'given twice'}")
    return pairs
