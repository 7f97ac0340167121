"""Task-family registry: built-in names, plus ``module:Class`` for users' own TaskFamily classes."""

from __future__ import annotations

import importlib

from learned_opt.tasks.base import TaskFamily
from learned_opt.tasks.families import (
    CNNClassificationFamily,
    LinearRegressionFamily,
    LogisticRegressionFamily,
    MLPClassificationFamily,
    MLPRegressionFamily,
)
from learned_opt.tasks.quadratic import QuadraticFamily

FAMILIES: dict[str, type[TaskFamily]] = {
    cls.name: cls
    for cls in (
        QuadraticFamily,
        LinearRegressionFamily,
        LogisticRegressionFamily,
        MLPClassificationFamily,
        MLPRegressionFamily,
        CNNClassificationFamily,
    )
}


def family_class(name: str) -> type[TaskFamily]:
    """The TaskFamily class for a built-in ``name`` or a ``package.module:ClassName`` reference."""
    if name in FAMILIES:
        return FAMILIES[name]
    if ":" not in name:
        raise ValueError(
            f"unknown task family {name!r}; built-in families: {sorted(FAMILIES)}, "
            "or give 'module:Class' for your own TaskFamily"
        )
    module_name, _, attr = name.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import task family {name!r}: {e}") from e
    if not (isinstance(obj, type) and issubclass(obj, TaskFamily)):
        raise ValueError(f"{name!r} is not a TaskFamily subclass (got {obj!r})")
    return obj


def make_family(name: str, settings: dict | None = None) -> TaskFamily:
    """Instantiate the family ``name`` with ``settings`` (fixed values or range specs)."""
    return family_class(name)(**dict(settings or {}))
