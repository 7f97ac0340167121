"""The ``[meta_train]`` table and the resolution of a run's inputs.

A suite file may carry a ``[meta_train]`` table (see ``tasks/l2l_quadratic.toml``); command-line
flags override it. :meth:`MetaTrainConfig.validate` checks every value before any work starts.
:func:`resolve` turns what :func:`~learned_opt.meta.train.meta_train` was given (names, objects, a
TOML file read once, overrides) into one :class:`Resolved`: the config, the suite, the rule and
the estimator, the config describing the rule and estimator objects it came with.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

import torch

from learned_opt.meta.estimators import ESTIMATORS, GradientEstimator, build_estimator
from learned_opt.meta.losses import META_LOSS_KINDS
from learned_opt.rules.base import Rule, build_rule
from learned_opt.suites import Suite, SuiteEntry, load_suite, parse_suite, tomllib
from learned_opt.tasks.base import TaskFamily, validate_spec

META_OPTIMIZERS = ("adam", "sgd")
DEVICES = ("cpu", "cuda")
# The settings with a closed set of values (the estimators' registry among them); validation and
# the command line's choices both read this.
CHOICES: dict[str, tuple[str, ...]] = {"estimator": tuple(ESTIMATORS), "meta_loss": META_LOSS_KINDS,
                                       "meta_optimizer": META_OPTIMIZERS}


def _setting(default: Any = None, help: str | None = None, *, factory: Any = None) -> Any:  # noqa: A002
    """A config field with its help text (the command line's flag help)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class MetaTrainConfig:
    """Meta-training settings: the ``[meta_train]`` keys, plus ``suite``; each field's help says what it sets.

    ``unroll`` and ``horizon`` take an int or a range spec (``{log_int = [10, 50]}``: log-uniform);
    ``horizon = "suite"`` uses each suite entry's ``steps``.
    """

    rule: str = _setting("lstm", "rule to meta-train")
    rule_config: dict[str, Any] = _setting(
        factory=dict, help='rule constructor kwargs as JSON, e.g. \'{"hidden_size": 20}\'')
    estimator: str = _setting("bptt", "meta-gradient estimator")
    second_order: bool = _setting(False, "bptt: differentiate through the optimizee gradients too")
    es_sigma: float = _setting(0.01, "es/pes perturbation scale")
    es_pairs: int = _setting(1, "es/pes antithetic pairs per task and truncation")
    unroll: Any = _setting(20, "steps per truncation: N, or LO:HI for log-uniform lengths")
    horizon: Any = _setting("suite", "steps per inner run: N, LO:HI (log-uniform) or 'suite'")
    random_start: bool = _setting(True, "start each slot's first run at a random iteration (desynchronises truncations)")
    tasks_per_step: int = _setting(4, "inner runs per meta-step (split across ranks)")
    meta_loss: str = _setting("mean", "how a truncation is scored")
    loss_cap: float = _setting(3.0, "cap on log(loss / initial loss)")
    meta_optimizer: str = _setting("adam", "optimizer of the meta-parameters")
    meta_lr: float = _setting(1e-3, "meta-optimizer learning rate")
    grad_clip: float = _setting(1.0, "meta-gradient norm clip (0: off)")
    meta_steps: int = _setting(1000, "meta-steps to train for")
    seed: int = _setting(0, "seeds every sampler")
    eval_every: int = _setting(100, "meta-steps between validation runs (best.*)")
    eval_tasks: int = _setting(8, "validation tasks per evaluation")
    checkpoint_every: int = _setting(50, "meta-steps between checkpoints")
    device: str = _setting("cpu", "cpu or cuda (cuda:N)")
    suite: str = _setting("", "suite name (e.g. meta_train) or .toml path")

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
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise bad(key, f"choose from {list(allowed)}")
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


# ----------------------------------------------------------------------------------------------
# Resolving a run's inputs (everything is validated before any work starts)

# Seed ranges used when meta-training directly on a TaskFamily (no suite file).
FAMILY_SEEDS = {"train": range(0, 10**6), "validation": range(10**6, 10**6 + 1000), "test": range(10**6 + 1000, 10**6 + 2000)}
# Estimator constructor kwargs -> the config fields that hold them.
ESTIMATOR_FIELDS = {"second_order": "second_order", "sigma": "es_sigma", "pairs": "es_pairs"}


@dataclass(frozen=True)
class ConfigFile:
    """A TOML file given as the config, read once: its ``[meta_train]`` table and, if it has one, its suite."""

    path: Path
    document: dict[str, Any]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> ConfigFile:
        file = Path(path).expanduser()
        try:
            document = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from exc
        if "population_es" in document and "meta_train" not in document:
            raise ValueError(f"{path}: a [population_es] recipe is run by `python scripts/ship_pretrained.py NAME` "
                             "or learned_opt.meta.es.train_es, not by meta-train (which reads [meta_train])")
        return cls(file, document)

    @property
    def table(self) -> dict[str, Any]:
        return dict(self.document.get("meta_train", {}))

    def suite(self) -> Suite | None:
        return parse_suite(self.document, name=self.path.stem, path=self.path) if "suite" in self.document else None


ConfigSource = Union[MetaTrainConfig, Mapping[str, Any], ConfigFile, str, "os.PathLike[str]", None]
TasksSource = Union[Suite, TaskFamily, str, "os.PathLike[str]", None]


@dataclass
class Resolved:
    """A run's inputs, resolved and validated: what :class:`~learned_opt.meta.trainer.MetaTrainer` runs."""

    config: MetaTrainConfig
    suite: Suite
    rule: Rule
    estimator: GradientEstimator


def resolve(rule: Rule | str | None = None, tasks: TasksSource = None, *,
            estimator: GradientEstimator | str | None = None, config: ConfigSource = None,
            saved: Mapping[str, Any] | None = None, **overrides: Any) -> Resolved:
    """Resolve :func:`~learned_opt.meta.train.meta_train`'s inputs (see there); ``saved`` is the
    config of the checkpoint being resumed, used when neither ``config`` nor ``tasks`` is given.

    Rule and estimator objects are used as they are, and the config records their names and
    settings (checkpoints compare and cards show the config); names are built from the config.
    """
    if isinstance(config, (str, os.PathLike)):
        config = ConfigFile.read(config)
    settings = {**overrides, **_rule_fields(rule), **_estimator_fields(estimator)}
    if saved is not None and config is None and tasks is None:
        config = MetaTrainConfig(**saved)  # `--resume --out DIR` alone: the run's own settings
    suite = _resolve_suite(tasks, config, settings)
    cfg = _resolve_config(config, suite, settings)
    cfg.suite = str(suite.path) if suite.path is not None else suite.name
    if not isinstance(rule, Rule):
        rule = _build_rule(cfg)
    if not isinstance(estimator, GradientEstimator):
        estimator = build_estimator(cfg.estimator, second_order=cfg.second_order, sigma=cfg.es_sigma, pairs=cfg.es_pairs)
    return Resolved(cfg, suite, rule, estimator)


def _rule_fields(rule: Rule | str | None) -> dict[str, Any]:
    if isinstance(rule, Rule):
        return {"rule": rule.name, "rule_config": rule.config()}
    return {"rule": rule} if isinstance(rule, str) else {}


def _estimator_fields(estimator: GradientEstimator | str | None) -> dict[str, Any]:
    if isinstance(estimator, GradientEstimator):
        kwargs = estimator.config()
        return {"estimator": estimator.name, **{f: kwargs[k] for k, f in ESTIMATOR_FIELDS.items() if k in kwargs}}
    return {"estimator": estimator} if isinstance(estimator, str) else {}


def family_suite(family: TaskFamily, steps: int = 100) -> Suite:
    """A one-entry suite around ``family`` (for meta-training on a family object directly)."""
    entry = SuiteEntry(label=family.name, family=family, steps=int(steps), weight=1.0)
    return Suite(name=family.name, path=None, entries=[entry], seeds=dict(FAMILY_SEEDS), steps=int(steps), tables={})


def _resolve_suite(tasks: TasksSource, config: ConfigSource, settings: Mapping[str, Any]) -> Suite:
    """The suite: ``tasks``, else the config file's ``[suite]``, else the config's ``suite`` setting."""
    if isinstance(tasks, Suite):
        return tasks
    if isinstance(tasks, TaskFamily):
        return family_suite(tasks)
    if tasks is None and isinstance(config, ConfigFile):
        own = config.suite()
        if own is not None:
            return own
    name = tasks if tasks is not None else (config.suite if isinstance(config, MetaTrainConfig) else
                                            settings.get("suite") or "")
    if not name:
        raise ValueError("no tasks to meta-train on: pass a suite (name or .toml path) or a TaskFamily")
    return load_suite(name)


def _resolve_config(config: ConfigSource, suite: Suite, settings: Mapping[str, Any]) -> MetaTrainConfig:
    """The config: ``config`` (an object, a table or a file's table), else the suite's
    ``[meta_train]`` table; then ``settings`` over it (None values ignored), validated."""
    if isinstance(config, MetaTrainConfig):
        merged = replace(config, **{k: v for k, v in settings.items() if v is not None})
        merged.validate()
        return merged
    if isinstance(config, ConfigFile):
        table, where = config.table, config.path
    elif config is not None:
        table, where = dict(config), None  # type: ignore[arg-type]
    else:
        table, where = dict(suite.tables.get("meta_train", {})), suite.path
    if settings.get("rule") not in (None, table.get("rule", "lstm")) and settings.get("rule_config") is None:
        table.pop("rule_config", None)  # the table's rule_config belongs to the table's rule
    return MetaTrainConfig.from_table(table, file=where, **settings)


def _build_rule(cfg: MetaTrainConfig) -> Rule:
    torch.manual_seed(cfg.seed)  # the rule's initial θ
    try:
        return build_rule(cfg.rule, cfg.rule_config)
    except TypeError as exc:
        raise ValueError(f"invalid rule_config {cfg.rule_config!r} for rule {cfg.rule!r}: {exc}") from exc


def check_runnable(inputs: Resolved) -> None:
    """ValueError if the run cannot start here: a CUDA device without CUDA, or a suite entry whose
    tasks cannot be built (missing data, a bad family setting): before any output is written."""
    device = inputs.config.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    suite = inputs.suite
    seed = suite.seeds["train"][0]
    for entry in suite.entries:  # the datasets they load stay cached for the run
        try:
            entry.family.sample(seed)
        except (FileNotFoundError, ImportError) as exc:
            raise ValueError(f"suite {suite.name!r}, entry {entry.label!r}: cannot build its tasks: {exc}") from exc
