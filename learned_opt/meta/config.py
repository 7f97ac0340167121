"""The ``[meta_train]`` table: every meta-training setting, its default, and its validation.

A suite file may carry a ``[meta_train]`` table (see ``tasks/l2l_quadratic.toml``); command-line
flags override it. :meth:`MetaTrainConfig.validate` checks every value before any work starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from learned_opt.meta.estimators import ESTIMATORS
from learned_opt.meta.losses import META_LOSS_KINDS
from learned_opt.tasks.base import validate_spec

META_OPTIMIZERS = ("adam", "sgd")
DEVICES = ("cpu", "cuda")


@dataclass
class MetaTrainConfig:
    """Meta-training settings (the ``[meta_train]`` keys, plus ``suite``).

    rule, rule_config: the Rule to meta-train (registry name and constructor kwargs).
    estimator: ``bptt`` | ``es`` | ``pes``; second_order (bptt), es_sigma and es_pairs (es/pes).
    unroll: optimizee steps per truncation, an int or a range spec (``{log_int = [10, 50]}``: log-uniform).
    horizon: steps per inner run, ``"suite"`` (each entry's ``steps``), an int or a range spec.
    random_start: each task slot's first run starts at a random iteration (desynchronises truncations).
    tasks_per_step: inner runs per meta-step (the task batch; split across ranks).
    meta_loss: ``mean`` | ``final`` | ``heldout``; loss_cap: cap on log(loss / initial loss).
    meta_optimizer (adam | sgd), meta_lr, grad_clip (meta-gradient norm; 0 disables), meta_steps.
    seed: seeds every sampler; eval_every / eval_tasks: validation schedule and size (best.*);
    checkpoint_every: meta-steps between checkpoints; device: cpu | cuda.
    """

    rule: str = "lstm"
    rule_config: dict[str, Any] = field(default_factory=dict)
    estimator: str = "bptt"
    second_order: bool = False
    es_sigma: float = 0.01
    es_pairs: int = 1
    unroll: Any = 20
    horizon: Any = "suite"
    random_start: bool = True
    tasks_per_step: int = 4
    meta_loss: str = "mean"
    loss_cap: float = 3.0
    meta_optimizer: str = "adam"
    meta_lr: float = 1e-3
    grad_clip: float = 1.0
    meta_steps: int = 1000
    seed: int = 0
    eval_every: int = 100
    eval_tasks: int = 8
    checkpoint_every: int = 50
    device: str = "cpu"
    suite: str = ""

    @classmethod
    def table_defaults(cls) -> dict[str, Any]:
        """The keys a ``[meta_train]`` table may hold, with their defaults."""
        return {f.name: getattr(cls(), f.name) for f in fields(cls) if f.name != "suite"}

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, file: str | Path | None = None, **overrides: Any) -> MetaTrainConfig:
        """Config from a ``[meta_train]`` table (unknown keys → ValueError naming file and key),
        then ``overrides`` (None values are ignored), validated."""
        from learned_opt.suites import check_table

        values = check_table(table, cls.table_defaults(), file=file, table_name="meta_train")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown meta-training setting(s) {unknown}; allowed: {sorted(f.name for f in fields(cls))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate(file)
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, file: str | Path | None = None) -> None:
        """ValueError naming the first bad setting and its value."""
        where = f"{file}: [meta_train]" if file else "meta-training config"

        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"{where}: invalid {key} = {getattr(self, key)!r} ({why})")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.rule, str) or not self.rule:
            raise bad("rule", "a registered rule name")
        if not isinstance(self.rule_config, Mapping):
            raise bad("rule_config", "a table of the rule's constructor arguments")
        if self.estimator not in ESTIMATORS:
            raise bad("estimator", f"choose from {sorted(ESTIMATORS)}")
        if self.meta_loss not in META_LOSS_KINDS:
            raise bad("meta_loss", f"choose from {list(META_LOSS_KINDS)}")
        if self.meta_optimizer not in META_OPTIMIZERS:
            raise bad("meta_optimizer", f"choose from {list(META_OPTIMIZERS)}")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in DEVICES:
            raise bad("device", f"choose from {list(DEVICES)} (cuda:N allowed)")
        for key in ("second_order", "random_start"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")
        for key, low in (("es_pairs", 1), ("tasks_per_step", 1), ("meta_steps", 0), ("eval_every", 0),
                         ("eval_tasks", 0), ("checkpoint_every", 0), ("seed", 0)):
            if not is_int(getattr(self, key)) or getattr(self, key) < low:
                raise bad(key, f"an integer >= {low}")
        for key, positive in (("es_sigma", True), ("loss_cap", True), ("meta_lr", True), ("grad_clip", False)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise bad(key, "a finite number " + ("> 0" if positive else ">= 0"))
        for key in ("unroll", "horizon"):
            v = getattr(self, key)
            if key == "horizon" and v == "suite":
                continue
            if isinstance(v, Mapping):
                try:
                    validate_spec(v, key)
                except ValueError as exc:
                    raise bad(key, str(exc)) from exc
                kind, values = next(iter(v.items()))
                if kind not in ("int", "log_int", "choice") or not all(is_int(x) and x >= 1 for x in values):
                    raise bad(key, "a range of integers >= 1: {int = [lo, hi]}, {log_int = [lo, hi]} or {choice = [...]}")
            elif not is_int(v) or v < 1:
                raise bad(key, "an integer >= 1 or a range spec" + (' or "suite"' if key == "horizon" else ""))


def parse_range_flag(text: str | None) -> Any:
    """A ``--unroll``/``--horizon`` flag: ``20`` (fixed), ``10:50`` (log-uniform integers) or ``suite``."""
    if text is None or text == "suite":
        return text
    if ":" in text:
        lo, hi = text.split(":", 1)
        try:
            return {"log_int": [int(lo), int(hi)]}
        except ValueError:
            raise ValueError(f"invalid range {text!r}: expected LO:HI with integers") from None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid value {text!r}: expected an integer, LO:HI or 'suite'") from None
