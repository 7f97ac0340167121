"""The meta-training loop: ``meta_train(rule, tasks, estimator=...)``.

Each meta-step advances ``tasks_per_step`` inner runs (task slots) by one truncation, asks the
estimator for each slot's meta-gradient, averages them (all-reduced across ranks), skips the update
if anything is non-finite, clips, and steps the meta-optimizer. Every slot has its own RNG streams
seeded by ``(seed, slot index)``, so results do not depend on how slots are split across ranks.
Everything needed to continue bit for bit is checkpointed (see :mod:`learned_opt.meta.checkpoint`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import platform
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learned_opt.fileio import atomic_write_bytes, atomic_write_text
from learned_opt.lockfile import LOCK_NAME, lock_directory
from learned_opt.meta.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    load_checkpoint,
    output_write_errors,
    remove_stale_temp_files,
    save_checkpoint,
)
from learned_opt.meta.config import MetaTrainConfig
from learned_opt.meta.distributed import DistContext, init_distributed
from learned_opt.meta.estimators import GradientEstimator, build_estimator
from learned_opt.meta.losses import MetaLoss
from learned_opt.meta.unroll import InnerRun
from learned_opt.rules.base import Rule, build_rule
from learned_opt.suites import Suite, SuiteEntry, load_suite
from learned_opt.tasks.base import TaskFamily, draw

log = logging.getLogger(__name__)

METRIC_FIELDS = ("step", "meta_loss", "grad_norm", "skipped", "inner_steps", "runs_finished", "val_loss", "wall_s")
# Settings that may change when resuming (the suite is compared by its contents, suite_identity, not its path).
RESUMABLE_CHANGES = ("meta_steps", "checkpoint_every", "device", "suite")
UNSET = "<unset>"  # how a suite entry key present on one side only reads in a resume mismatch
# Seed ranges used when meta-training directly on a TaskFamily (no suite file).
FAMILY_SEEDS = {"train": range(0, 10**6), "validation": range(10**6, 10**6 + 1000), "test": range(10**6 + 1000, 10**6 + 2000)}


@dataclass
class Slot:
    """One task slot: its RNG streams and its inner run in flight."""

    index: int
    rng: np.random.Generator
    noise: torch.Generator
    run: InnerRun | None = None
    runs_started: int = 0


@dataclass
class MetaTrainResult:
    """What a call to :func:`meta_train` produced (``history``: this call's metric rows)."""

    rule: Rule
    config: MetaTrainConfig
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    skipped: int = 0
    inner_steps: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    out: Path | None = None
    rank: int = 0
    local_slots: list[int] = field(default_factory=list)
    local_inner_steps: int = 0
    last_meta_loss: float | None = None  # of the run's last meta-step (also when this call ran none)

    @property
    def final_meta_loss(self) -> float | None:
        return self.history[-1]["meta_loss"] if self.history else self.last_meta_loss

    @property
    def inner_steps_per_s(self) -> float | None:
        """Meta-training throughput: optimizee steps per second, summed over the task batch (all ranks)."""
        return self.inner_steps / self.wall_s if self.wall_s > 0 else None


class MetaTrainingInterrupted(RuntimeError):
    """Raised when SIGINT/SIGTERM stopped a run (after its checkpoint was written)."""

    def __init__(self, result: MetaTrainResult, signum: int) -> None:
        super().__init__(f"meta-training stopped by signal {signum} at step {result.step}; "
                         f"resume with --resume --out {result.out}")
        self.result, self.signum = result, signum


@contextmanager
def _stop_on_signals() -> Iterator[dict[str, int | None]]:
    """Turn the first SIGINT/SIGTERM into a flag (checked between meta-steps); a second one interrupts."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: Any) -> None:
        if flag["signum"] is not None:
            raise KeyboardInterrupt
        flag["signum"] = signum
        log.warning("signal %d: finishing this meta-step, then checkpointing (again to abort)", signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# Resolving the inputs (everything is validated before any work starts)


def family_suite(family: TaskFamily, steps: int = 100) -> Suite:
    """A one-entry suite around ``family`` (for meta-training on a family object directly)."""
    entry = SuiteEntry(label=family.name, family=family, steps=int(steps), weight=1.0)
    return Suite(name=family.name, path=None, entries=[entry], seeds=dict(FAMILY_SEEDS), steps=int(steps), tables={})


def _resolve_suite(tasks: Suite | TaskFamily | str | os.PathLike[str] | None, config_suite: str) -> Suite:
    if isinstance(tasks, Suite):
        return tasks
    if isinstance(tasks, TaskFamily):
        return family_suite(tasks)
    name = tasks if tasks is not None else config_suite
    if not name:
        raise ValueError("no tasks to meta-train on: pass a suite (name or .toml path) or a TaskFamily")
    return load_suite(name)


def check_tasks_build(suite: Suite) -> None:
    """Build one training task per entry, so missing data or a bad family setting is reported before
    any output is written (the datasets they load stay cached for the run)."""
    seed = suite.seeds["train"][0]
    for entry in suite.entries:
        try:
            entry.family.sample(seed)
        except (FileNotFoundError, ImportError) as exc:
            raise ValueError(f"suite {suite.name!r}, entry {entry.label!r}: cannot build its tasks: {exc}") from exc


def _suite_ref(suite: Suite) -> str:
    return str(suite.path) if suite.path is not None else suite.name


def resolve_config(
    config: MetaTrainConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
    suite: Suite | None,
    overrides: Mapping[str, Any],
    file: str | os.PathLike[str] | None = None,
) -> MetaTrainConfig:
    """The config: ``config`` (a table or object), else the suite's ``[meta_train]`` table, then overrides."""
    if isinstance(config, (str, os.PathLike)):
        file, config = config, read_config_table(config)
    if isinstance(config, MetaTrainConfig):
        merged = replace(config, **{k: v for k, v in overrides.items() if v is not None})
        merged.validate(file)
        return merged
    table = dict(config if config is not None else (suite.tables.get("meta_train", {}) if suite else {}))
    if overrides.get("rule") not in (None, table.get("rule", "lstm")) and overrides.get("rule_config") is None:
        table.pop("rule_config", None)  # the table's rule_config belongs to the table's rule
    where = file if file is not None else (suite.path if suite is not None and config is None else None)
    return MetaTrainConfig.from_table(table, file=where, **overrides)


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    from learned_opt.suites import tomllib

    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from exc


def read_config_table(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``[meta_train]`` table of a TOML file (empty if it has none)."""
    return dict(_read_toml(path).get("meta_train", {}))


def _out_state(out: Path | None, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh); errors for unsafe combinations."""
    if out is None:
        if resume:
            raise ValueError("resume needs an output directory (--out) holding a checkpoint")
        return None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    # Temp files of an interrupted atomic write and the lock file do not count as output.
    nonempty = out.is_dir() and any(not (p.name == LOCK_NAME or p.name.startswith(".") and p.name.endswith(".tmp"))
                                    for p in out.iterdir())
    ckpt = out / CHECKPOINT_NAME
    if not resume:
        if nonempty:
            raise ValueError(f"--out {out} is not empty; pass --resume to continue the run there, or choose a new directory")
        return None
    if ckpt.is_file():
        return ckpt
    if nonempty:
        raise ValueError(f"--resume: {out} holds no {CHECKPOINT_NAME}; refusing to start a fresh run over existing output")
    return None


def run_identity(rule: Rule, estimator: GradientEstimator, suite: Suite) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it, besides the config (JSON-able)."""
    return _jsonish({"rule": rule.name, "rule_config": rule.config(), "estimator": estimator.name,
                     "estimator_config": estimator.config(), "suite": suite_identity(suite)})


def suite_identity(suite: Suite) -> dict[str, Any]:
    """Everything of ``suite`` that decides a run's tasks (its file's location does not): the seed
    splits and, per entry in order, its family, steps, weight and resolved settings (defaults included)."""
    return _jsonish({
        "seeds": {split: [r.start, r.stop] for split, r in suite.seeds.items()},
        "entries": [{"label": e.label, "family": e.family.name, "steps": e.steps, "weight": e.weight,
                     **{f"settings.{k}": v for k, v in e.family.settings.items()}} for e in suite.entries],
    })


def _suite_diffs(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One line per difference of two :func:`suite_identity` values, naming the entry and key."""
    labels = [e["label"] for e in saved["entries"]], [e["label"] for e in now["entries"]]
    if labels[0] != labels[1]:
        return [f"suite entries: checkpoint {labels[0]!r} vs now {labels[1]!r}"]
    diffs = [] if saved["seeds"] == now["seeds"] else [f"suite seeds: checkpoint {saved['seeds']!r} vs now {now['seeds']!r}"]
    for old, new in zip(saved["entries"], now["entries"]):
        diffs += [f"suite entry {old['label']!r}, {k}: checkpoint {old.get(k, UNSET)!r} vs now {new.get(k, UNSET)!r}"
                  for k in sorted(set(old) | set(new)) if old.get(k, UNSET) != new.get(k, UNSET)]
    return diffs


def _check_compatible(payload: Mapping[str, Any], config: MetaTrainConfig, identity: Mapping[str, Any],
                      source: Path) -> None:
    """CheckpointError listing every setting that differs from the checkpoint's (one line)."""
    saved, now = payload["config"], config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    saved_identity = payload["identity"]
    diffs += [f"{k}: checkpoint {saved_identity.get(k)!r} vs now {v!r}"
              for k, v in identity.items() if k != "suite" and saved_identity.get(k) != v]
    diffs += _suite_diffs(saved_identity["suite"], identity["suite"])
    if diffs:
        raise CheckpointError(f"{source} does not match this run's settings: {'; '.join(diffs)} "
                              f"(resume with the same settings and suite, or use a new --out)")


def _jsonish(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists; other objects their repr)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonish(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


# ----------------------------------------------------------------------------------------------
# Slots and runs


def _slot(seed: int, index: int) -> Slot:
    noise_seed = int(np.random.SeedSequence([seed, index, 0x5E5]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return Slot(index, np.random.default_rng([seed, index]), torch.Generator().manual_seed(noise_seed))


def _new_run(slot: Slot, rule: Rule, suite: Suite, config: MetaTrainConfig, device: torch.device) -> InnerRun:
    for _attempt in range(100):
        entry, task_seed = suite.sample("train", slot.rng)
        horizon = entry.steps if config.horizon == "suite" else int(draw(config.horizon, slot.rng))
        run = InnerRun.start(rule, entry.family.sample(task_seed).to(device), label=entry.label, seed=task_seed,
                             horizon=horizon)
        if config.random_start and slot.runs_started == 0:
            run.train_without_graph(rule, int(slot.rng.integers(0, horizon)))
        slot.runs_started += 1
        if not run.finished:
            return run
    raise RuntimeError(f"slot {slot.index}: 100 consecutive inner runs diverged before their first truncation")


def _run_payload(run: InnerRun) -> dict[str, Any]:
    return {"label": run.label, "seed": run.seed, "horizon": run.horizon, "iteration": run.iteration,
            "params": run.params, "state": run.state, "generator": run.generator.get_state(),
            "heldout_generator": run.heldout_generator.get_state(), "initial_loss": run.initial_loss,
            "diverged": run.diverged, "extra": run.extra}


def _restore_run(data: Mapping[str, Any], suite: Suite, device: torch.device) -> InnerRun:
    to = lambda x: x.to(device) if isinstance(x, Tensor) else x  # noqa: E731
    tree = _map_tensors({"params": data["params"], "state": data["state"], "extra": data["extra"]}, to)
    generator, heldout = torch.Generator(), torch.Generator()
    generator.set_state(data["generator"])
    heldout.set_state(data["heldout_generator"])
    task = suite.entry(data["label"]).family.sample(int(data["seed"])).to(device)
    initial = data["initial_loss"]
    return InnerRun(data["label"], int(data["seed"]), int(data["horizon"]), task, list(tree["params"]),
                    tree["state"], generator, heldout, int(data["iteration"]),
                    None if initial is None else initial.to(device), bool(data["diverged"]), tree["extra"])


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def _slot_payload(slot: Slot) -> dict[str, Any]:
    return {"index": slot.index, "rng": slot.rng.bit_generator.state, "noise": slot.noise.get_state(),
            "runs_started": slot.runs_started, "run": None if slot.run is None else _run_payload(slot.run)}


def _restore_slot(data: Mapping[str, Any], seed: int, suite: Suite, device: torch.device) -> Slot:
    slot = _slot(seed, int(data["index"]))
    slot.rng.bit_generator.state = data["rng"]
    slot.noise.set_state(data["noise"])
    slot.runs_started = int(data["runs_started"])
    slot.run = None if data["run"] is None else _restore_run(data["run"], suite, device)
    return slot


# ----------------------------------------------------------------------------------------------
# Evaluation and outputs


def validation_tasks(suite: Suite, n: int) -> list[tuple[SuiteEntry, int]]:
    """``n`` (entry, seed) pairs from the validation split, cycling through the entries evenly."""
    seeds = suite.seeds["validation"]
    k = len(suite.entries)
    return [(suite.entries[i % k], seeds[(i // k) % len(seeds)]) for i in range(n)]


def evaluate(rule: Rule, suite: Suite, config: MetaTrainConfig, device: torch.device,
             ctx: DistContext | None = None) -> float:
    """Mean over ``eval_tasks`` validation tasks of the normalised loss averaged over each whole run
    (the ``mean`` meta-loss over the full horizon, no truncation). Lower is better."""
    ctx = ctx or DistContext()
    objective = MetaLoss("mean", config.loss_cap)
    tasks = validation_tasks(suite, config.eval_tasks)
    total = torch.zeros(2, dtype=torch.float64)
    for i in ctx.share(len(tasks)):
        entry, seed = tasks[i]
        steps = config.horizon if isinstance(config.horizon, int) else entry.steps
        run = InnerRun.start(rule, entry.family.sample(seed).to(device), label=entry.label, seed=seed, horizon=steps)
        losses = run.train_without_graph(rule, steps)
        initial = run.initial_loss if run.initial_loss is not None else torch.ones(())
        total += torch.tensor([objective(losses, None, steps, initial).item(), 1.0], dtype=torch.float64)
    total = ctx.all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {"node": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _command() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


class _MetricsLog:
    """``metrics.csv`` (one row per meta-step, flushed) and TensorBoard events when available."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.path = out / "metrics.csv"
        if resume_step is not None and self.path.exists():
            self._trim(resume_step)
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_FIELDS)
        if new:
            self.writer.writeheader()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: no event files (metrics.csv has everything)")
        else:
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)

    def _trim(self, step: int) -> None:
        """Drop rows written after the checkpoint (and any torn last line)."""
        kept = []
        with open(self.path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    if None not in row.values() and int(row["step"]) <= step:
                        kept.append(row)
                except (TypeError, ValueError):
                    continue
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.path, buf.getvalue())

    def write(self, row: Mapping[str, Any]) -> None:
        with output_write_errors(self.path):
            self.writer.writerow(row)
            self.file.flush()
        if self.tb is not None:
            for key in ("meta_loss", "grad_norm", "val_loss"):
                if row.get(key) not in (None, ""):
                    self.tb.add_scalar(key, float(row[key]), int(row["step"]))

    def close(self) -> None:
        with output_write_errors(self.path):
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_csv: Path, png: Path) -> Path | None:
    """A PNG of meta-loss and validation loss against meta-step; None (logged) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipping %s", png)
        return None
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    meta = [float(r["meta_loss"]) for r in rows]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, meta, lw=0.6, alpha=0.4, label="meta-loss (train truncations)")
    if len(meta) >= 10:
        w = max(len(meta) // 50, 5)
        smooth = np.convolve(meta, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"meta-loss, {w}-step mean")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (whole runs)")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("log(loss / initial loss)")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(png, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# The loop


def meta_train(
    rule: Rule | str | None = None,
    tasks: Suite | TaskFamily | str | os.PathLike[str] | None = None,
    *,
    estimator: GradientEstimator | str | None = None,
    config: MetaTrainConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    **overrides: Any,
) -> MetaTrainResult:
    """Meta-train ``rule`` on ``tasks`` (a Suite, a suite name/path, or a TaskFamily).

    ``config`` is a :class:`MetaTrainConfig`, a ``[meta_train]``-style mapping, or a TOML file whose
    ``[meta_train]`` table is used (and whose ``[suite]``, if any, is the default ``tasks``); by
    default the suite file's own table; ``overrides`` are config fields (``meta_steps=200``...). With ``out``, writes
    ``metrics.csv``, checkpoints, ``best.*``/``final.*`` weights and ``curves.png`` there; ``resume``
    continues from its checkpoint (the settings must match). Raises :class:`MetaTrainingInterrupted`
    after checkpointing when stopped by SIGINT/SIGTERM.
    """
    out_dir = Path(out) if out is not None else None
    if isinstance(rule, Rule):
        overrides = {**overrides, "rule": rule.name, "rule_config": rule.config()}
    elif isinstance(rule, str):
        overrides = {**overrides, "rule": rule}
    if isinstance(estimator, GradientEstimator):
        overrides = {**overrides, "estimator": estimator.name, **_estimator_fields(estimator)}
    elif isinstance(estimator, str):
        overrides = {**overrides, "estimator": estimator}

    if isinstance(config, (str, os.PathLike)) and tasks is None and "suite" in _read_toml(config):
        tasks = config
    with _output_lock(out_dir):
        return _resolve_and_train(rule, tasks, estimator, config, out_dir, resume, progress, command, overrides)


def _output_lock(out: Path | None) -> AbstractContextManager[Any]:
    """The exclusive lock on ``out`` for the process that writes there (rank 0; other ranks only read)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return lock_directory(out) if out is not None and rank == 0 else nullcontext()


def _resolve_and_train(rule: Rule | str | None, tasks: Suite | TaskFamily | str | os.PathLike[str] | None,
                       estimator: GradientEstimator | str | None,
                       config: MetaTrainConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
                       out_dir: Path | None, resume: bool, progress: bool, command: str | None,
                       overrides: Mapping[str, Any]) -> MetaTrainResult:
    """:func:`meta_train` once ``out_dir`` is locked: resolve and check everything, then train."""
    ckpt_path = _out_state(out_dir, resume)
    payload = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if payload is not None and config is None and tasks is None:
        config = MetaTrainConfig(**payload["config"])  # `--resume --out DIR` alone: the run's own settings
    suite = _resolve_suite(tasks, config.suite if isinstance(config, MetaTrainConfig) else
                           (overrides.get("suite") or ""))
    cfg = resolve_config(config, suite, overrides)
    cfg.suite = _suite_ref(suite)
    if not isinstance(rule, Rule):
        torch.manual_seed(cfg.seed)
        try:
            rule = build_rule(cfg.rule, cfg.rule_config)
        except TypeError as exc:
            raise ValueError(f"invalid rule_config {cfg.rule_config!r} for rule {cfg.rule!r}: {exc}") from exc
    if not isinstance(estimator, GradientEstimator):
        estimator = build_estimator(cfg.estimator, second_order=cfg.second_order, sigma=cfg.es_sigma, pairs=cfg.es_pairs)
    if payload is not None:
        _check_compatible(payload, cfg, run_identity(rule, estimator, suite), ckpt_path)  # type: ignore[arg-type]
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} requested but CUDA is not available")
    check_tasks_build(suite)

    ctx = init_distributed(cfg.device)
    try:
        return _train(rule, suite, estimator, cfg, out_dir, payload, ctx, progress, command or _command())
    finally:
        ctx.close()


def _estimator_fields(estimator: GradientEstimator) -> dict[str, Any]:
    c = estimator.config()
    mapping = {"second_order": "second_order", "sigma": "es_sigma", "pairs": "es_pairs"}
    return {mapping[k]: v for k, v in c.items() if k in mapping}


def _train(rule: Rule, suite: Suite, estimator: GradientEstimator, cfg: MetaTrainConfig, out: Path | None,
           payload: Mapping[str, Any] | None, ctx: DistContext, progress: bool, command: str) -> MetaTrainResult:
    from tqdm.auto import tqdm

    from learned_opt.weights import repo_relative, save_weights

    device = ctx.device if ctx.enabled else torch.device(cfg.device)
    rule.to(device)
    rule.train()
    theta = list(rule.parameters())
    if not theta:
        raise ValueError(f"rule {rule.name!r} has no meta-parameters to train")
    if ctx.enabled:  # every rank starts from rank 0's θ
        import torch.distributed as dist

        for p in theta:
            dist.broadcast(p.data, src=0)
    opt: torch.optim.Optimizer
    if cfg.meta_optimizer == "adam":
        opt = torch.optim.Adam(theta, lr=cfg.meta_lr)
    else:
        opt = torch.optim.SGD(theta, lr=cfg.meta_lr)
    objective = MetaLoss(cfg.meta_loss, cfg.loss_cap)
    identity = run_identity(rule, estimator, suite)

    counters: dict[str, Any] = {"skipped": 0, "inner_steps": 0, "runs_finished": 0, "elapsed_s": 0.0,
                                "best_val": None, "best_step": None, "last_meta_loss": None}
    start = 0
    mine = ctx.share(cfg.tasks_per_step)
    if payload is not None:
        with torch.no_grad():
            rule.load_state_dict(_map_tensors(payload["theta"], lambda t: t.to(device)))
        opt.load_state_dict(_map_tensors(payload["meta_optimizer"], lambda t: t.to(device)))
        torch.set_rng_state(payload["torch_rng"])
        saved_slots = {int(s["index"]): s for s in payload["slots"]}
        slots = [_restore_slot(saved_slots[i], cfg.seed, suite, device) for i in mine]
        counters.update(payload["counters"])
        start = int(payload["step"])
    else:
        slots = [_slot(cfg.seed, i) for i in mine]

    main = ctx.is_main and out is not None
    if main:
        assert out is not None
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(out)
    card = {"config": {**cfg.to_dict(), "suite": repo_relative(cfg.suite)}, "seed": cfg.seed,
            "estimator": {"name": estimator.name, **estimator.config()},
            "suite": repo_relative(_suite_ref(suite)), "world_size": ctx.world_size, "machine": machine_info(device),
            "command": command}

    def checkpoint(step: int) -> None:
        gathered = ctx.gather_to_main([_slot_payload(s) for s in slots])
        if not main:
            return
        assert gathered is not None and out is not None
        all_slots = sorted((s for part in gathered for s in part), key=lambda s: s["index"])
        save_checkpoint(out / CHECKPOINT_NAME, {
            "config": cfg.to_dict(), "identity": identity, "step": step, "theta": rule.state_dict(),
            "meta_optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state(), "slots": all_slots,
            "counters": {**counters, "elapsed_s": counters["elapsed_s"] + (time.perf_counter() - t0)},
        })

    def save(name: str, step: int, extra_metrics: Mapping[str, Any]) -> None:
        if main:
            assert out is not None
            elapsed = counters["elapsed_s"] + (time.perf_counter() - t0)
            with output_write_errors(out / f"{name}.safetensors"):
                save_weights(rule, out / name, name=f"{rule.name} meta-trained on {suite.name}",
                             meta_training={**card, "steps": step, "wall_time_s": round(elapsed, 3),
                                            "inner_steps": counters["inner_steps"]},
                             metrics=dict(extra_metrics))

    t0 = time.perf_counter()
    if payload is None and out is not None:
        checkpoint(0)  # from here on, the directory always holds a checkpoint to resume from
    metrics = None
    if main and out is not None:
        with output_write_errors(out / "metrics.csv"):
            metrics = _MetricsLog(out, start if payload is not None else None)
    result = MetaTrainResult(rule, cfg, start, out=out, rank=ctx.rank, local_slots=list(mine),
                             best_val=counters["best_val"], best_step=counters["best_step"])
    bar = tqdm(total=cfg.meta_steps, initial=start, disable=not (progress and ctx.is_main), desc="meta-train",
               dynamic_ncols=True)
    step = start
    try:
        with _stop_on_signals() as stop:
            for step in range(start + 1, cfg.meta_steps + 1):
                grads = [torch.zeros_like(p) for p in theta]
                loss_sum = torch.zeros((), dtype=torch.float64)
                steps_done = finished = 0
                for slot in slots:
                    if slot.run is None or slot.run.finished:
                        slot.run = _new_run(slot, rule, suite, cfg, device)
                    length = min(int(draw(cfg.unroll, slot.rng)), slot.run.remaining())
                    est = estimator.estimate(rule, slot.run, length, objective, slot.noise)
                    grads = [g + e for g, e in zip(grads, est.grads)]
                    loss_sum += est.meta_loss.double().cpu()
                    steps_done += est.steps
                    finished += int(slot.run.finished)
                flat = torch.cat([g.reshape(-1).double() for g in grads] +
                                 [loss_sum.reshape(1), torch.tensor([steps_done, finished], dtype=torch.float64)])
                flat = ctx.all_reduce_sum(flat.to(device)).cpu()
                n = cfg.tasks_per_step
                meta_grad, meta_loss = flat[:-3] / n, float(flat[-3] / n)
                result.local_inner_steps += steps_done
                counters["inner_steps"] += int(flat[-2])
                counters["runs_finished"] += int(flat[-1])
                grad_norm = float(torch.linalg.vector_norm(meta_grad))
                counters["last_meta_loss"] = meta_loss
                if not (math.isfinite(meta_loss) and math.isfinite(grad_norm)):
                    counters["skipped"] += 1
                    log.warning("meta-step %d: non-finite meta-loss/gradient, update skipped", step)
                else:
                    if cfg.grad_clip > 0 and grad_norm > cfg.grad_clip:
                        meta_grad = meta_grad * (cfg.grad_clip / grad_norm)
                    offset = 0
                    for p in theta:
                        p.grad = meta_grad[offset: offset + p.numel()].view_as(p).to(p.dtype).to(device)
                        offset += p.numel()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                val = ""
                last = step == cfg.meta_steps
                if cfg.eval_tasks and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                    v = evaluate(rule, suite, cfg, device, ctx)
                    val = v
                    if counters["best_val"] is None or v < counters["best_val"]:
                        counters["best_val"], counters["best_step"] = v, step
                        save("best", step, {"validation_loss": v, "validation_step": step,
                                            "validation_tasks": cfg.eval_tasks})
                row = {"step": step, "meta_loss": meta_loss, "grad_norm": grad_norm, "skipped": counters["skipped"],
                       "inner_steps": counters["inner_steps"], "runs_finished": counters["runs_finished"],
                       "val_loss": val, "wall_s": round(counters["elapsed_s"] + time.perf_counter() - t0, 3)}
                result.history.append(row)
                if metrics is not None:
                    metrics.write(row)
                bar.set_postfix(meta_loss=f"{meta_loss:.4f}", skipped=counters["skipped"])
                bar.update(1)
                stopping = ctx.any(stop["signum"] is not None)
                if out is not None and (stopping or last or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                    checkpoint(step)
                if stopping:
                    result.interrupted = True
                    break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    result.step = step
    result.skipped, result.inner_steps = counters["skipped"], counters["inner_steps"]
    result.best_val, result.best_step = counters["best_val"], counters["best_step"]
    result.last_meta_loss = counters["last_meta_loss"]
    result.wall_s = counters["elapsed_s"] + time.perf_counter() - t0
    if result.interrupted:
        raise MetaTrainingInterrupted(result, int(stop["signum"] or signal.SIGTERM))
    rule.eval()
    if main:
        assert out is not None
        save("final", step, {"final_meta_loss": result.final_meta_loss, "best_validation_loss": result.best_val,
                             "best_validation_step": result.best_step})
        with output_write_errors(out / "curves.png"):
            plot_curves(out / "metrics.csv", out / "curves.png")
    ctx.barrier()
    return result
