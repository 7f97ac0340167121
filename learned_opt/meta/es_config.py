"""Settings of a population-ES meta-training run (:mod:`learned_opt.meta.es`): a recipe's
``[population_es]`` table, checked key by key so a typo or a bad value fails before any run starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ESConfig:
    """Settings of a full-horizon ES run (a recipe's ``[population_es]`` table; every key optional)."""

    suite: str = "meta_train_general"
    meta_steps: int = 150
    pairs: int = 8
    sigma: float = 0.05
    meta_lr: float = 0.02
    tasks_per_step: int = 2
    horizon: tuple[int, int] = (50, 600)
    horizon_known: float = 0.5
    augment: float = 0.25
    augment_range: tuple[float, float] = (1e-2, 1e2)
    ratio_clip: tuple[float, float] = (-1.5, 3.0)
    pool: int = 64
    val_tasks: int = 12
    eval_every: int = 25
    checkpoint_every: int = 5
    seed: int = 0
    rule: dict[str, Any] = field(default_factory=dict)
    long_labels: tuple[str, ...] = ()
    long_horizon: tuple[int, int] = (2000, 5000)
    long_pool: int = 0
    long_every: int = 0
    long_val: int = 0
    weight_decay: float = 0.0
    init_weights: str = ""  # a shipped name or .safetensors path whose θ starts the search ("" : the rule's init_*)
    train_rows: tuple[str, ...] = ()  # the θ entries ES perturbs and moves (none named: all of θ)
    entry_weights: dict[str, float] = field(default_factory=dict)  # suite label -> its draw weight instead

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str = "[population_es]") -> ESConfig:
        """Build from a TOML table; unknown keys and bad values are ValueErrors naming ``where`` and the key."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
        cfg = cls(**values)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "ESConfig") -> None:
        for key in ("meta_steps", "pairs", "tasks_per_step", "pool", "val_tasks", "eval_every", "checkpoint_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {key} must be an int >= 1, got {value!r}")
        for key in ("sigma", "meta_lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{where}: {key} must be a number > 0, got {value!r}")
        if isinstance(self.weight_decay, bool) or not isinstance(self.weight_decay, (int, float)) or not (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"{where}: weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.init_weights, str):
            raise ValueError(f"{where}: init_weights must be a shipped name or a weights path, got {self.init_weights!r}")
        for key in ("horizon_known", "augment"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{where}: {key} must be in [0, 1], got {value!r}")
        for key in ("horizon", "long_horizon"):
            value = getattr(self, key)
            if not (isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
                    and 1 <= value[0] <= value[1]):
                raise ValueError(f"{where}: {key} must be [low, high] ints with 1 <= low <= high, got {value!r}")
        for key in ("long_pool", "long_every", "long_val"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}: {key} must be an int >= 0, got {value!r}")
        for key, what in (("long_labels", "suite entry labels"), ("train_rows", "θ entry names")):
            value = getattr(self, key)
            if not isinstance(value, tuple) or not all(isinstance(x, str) for x in value):
                raise ValueError(f"{where}: {key} must be {what}, got {value!r}")
        if not isinstance(self.entry_weights, dict):
            raise ValueError(f"{where}: entry_weights must map suite entry labels to numbers > 0, "
                             f"got {self.entry_weights!r}")
        for label, weight in self.entry_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight) and weight > 0):
                raise ValueError(f"{where}: entry_weights[{label!r}] must be a number > 0, got {weight!r}")
        if (self.long_val or self.long_every) and not self.long_labels:
            raise ValueError(f"{where}: long_val/long_every need long_labels (the entries long runs draw from)")
        if bool(self.long_every) != bool(self.long_pool):
            raise ValueError(f"{where}: long_every and long_pool go together (got {self.long_every!r}, "
                             f"{self.long_pool!r}): a long training draw every long_every steps, from long_pool")
