"""What the benchmark runs on: suite entries, task families or single Task objects, one interface.

A :class:`BenchTask` is a report row: a label, a horizon, a ``seed -> Task`` maker and an identity
(``fingerprint``) for the run cache, so an edited suite entry never reuses stale runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from learned_opt.tasks.base import Task, TaskFamily


@dataclass(frozen=True)
class BenchTask:
    label: str
    steps: int
    make: Callable[[int], Task]
    fingerprint: dict[str, Any]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=repr))


def from_entry(entry: Any) -> BenchTask:
    """A ``learned_opt.suites.SuiteEntry`` (label, family, steps)."""
    return from_family(entry.family, int(entry.steps), entry.label)


def from_family(family: TaskFamily, steps: int, label: str | None = None) -> BenchTask:
    """Seeds draw tasks from ``family``; the identity holds the family class and its settings."""
    label = label or family.name
    fingerprint = {"label": label, "family": type(family).__module__ + "." + type(family).__qualname__,
                   "settings": _jsonable(family.settings)}
    return BenchTask(label, steps, family.sample, fingerprint)


def from_task(task: Task, steps: int, label: str | None = None) -> BenchTask:
    """A fixed Task: seeds vary only its initial parameters and batches."""
    label = label or task.name
    fingerprint = {"label": label, "task": type(task).__module__ + "." + type(task).__qualname__,
                   "repr": repr(task)}
    return BenchTask(label, steps, lambda seed: task, fingerprint)


def as_bench_tasks(items: Sequence[Any], default_steps: int | None) -> list[BenchTask]:
    """Suite entries, TaskFamily or Task objects (the latter two need ``default_steps``)."""
    out: list[BenchTask] = []
    for item in items:
        if isinstance(item, BenchTask):
            out.append(item)
        elif hasattr(item, "family") and hasattr(item, "label") and hasattr(item, "steps"):
            out.append(from_entry(item))
        elif isinstance(item, (TaskFamily, Task)):
            if default_steps is None:
                raise ValueError(f"benchmarking {item!r} directly needs steps= (a horizon)")
            out.append(from_family(item, default_steps) if isinstance(item, TaskFamily)
                       else from_task(item, default_steps))
        else:
            raise TypeError(f"cannot benchmark {type(item).__name__}: expected a SuiteEntry, TaskFamily or Task")
    labels = [t.label for t in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"task labels must be unique; repeated: {dupes}")
    return out
