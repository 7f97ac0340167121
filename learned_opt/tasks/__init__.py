"""Task library: functional problems and the families that sample them."""

from learned_opt.tasks.base import Batch, Task, TaskFamily, draw
from learned_opt.tasks.families import (
    CNNClassificationFamily,
    LinearRegressionFamily,
    LogisticRegressionFamily,
    MLPClassificationFamily,
    MLPRegressionFamily,
)
from learned_opt.tasks.module_task import ModuleTask
from learned_opt.tasks.quadratic import QuadraticFamily, QuadraticTask
from learned_opt.tasks.registry import FAMILIES, family_class, make_family

__all__ = [
    "Batch",
    "CNNClassificationFamily",
    "FAMILIES",
    "LinearRegressionFamily",
    "LogisticRegressionFamily",
    "MLPClassificationFamily",
    "MLPRegressionFamily",
    "ModuleTask",
    "QuadraticFamily",
    "QuadraticTask",
    "Task",
    "TaskFamily",
    "draw",
    "family_class",
    "make_family",
]
