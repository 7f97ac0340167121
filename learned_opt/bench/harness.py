"""``learned_opt.benchmark``: run optimizers over a suite, tune baselines, measure, and report.

Per task: every optimizer runs on the same seeds (same initial parameters and batches); tuned
ones pick their lr by mean final training loss; the references — Adam tuned per task and
Adam(lr=1e-3) — always run, because wins, loss ratios and speedups are measured against them.
Tuned Adam is rerun up to 10× the horizon only when an optimizer ends below Adam's final loss
(to find the step where Adam gets there). Then a separate, uncached timing pass.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from learned_opt._version import __version__
from learned_opt.bench import metrics as M
from learned_opt.bench.baselines import (
    ADAM_1E3,
    TUNED_ADAM,
    OptimizerSpec,
    check_spec_builds,
    reference_specs,
    resolve_optimizers,
)
from learned_opt.bench.cache import RunCache, lr_key, run_key
from learned_opt.bench.problems import BenchTask, as_bench_tasks
from learned_opt.bench.runner import RunResult, default_eval_every, run
from learned_opt.bench.settings import BENCHMARK_DEFAULTS, check_steps_override, read_benchmark_table, resolve_steps
from learned_opt.bench.timing import time_optimizers
from learned_opt.bench.tuning import GRID_HIGH, GRID_LOW, tune_lr
from learned_opt.suites import load_suite
from learned_opt.tasks.base import Task


@dataclass
class BenchmarkResult:
    """What :func:`benchmark` returns: the results (as written to results.json) and the report."""

    results: dict[str, Any]
    report: str
    out: Path | None = None
    files: list[Path] = field(default_factory=list)


@dataclass
class _SuiteSource:
    name: str
    path: Path | None
    tasks: list[BenchTask]
    test_seeds: Sequence[int] | None  # the chosen split's seeds (None: any seed)
    tables: dict[str, Any]
    split: str = "test"


BENCH_SPLITS = ("test", "validation")  # the suite splits a benchmark may score (train is meta-training's)


def _suite_source(suite: Any, steps: int | str | None, split: str = "test") -> _SuiteSource:
    """The tasks, seeds and tables to benchmark: a suite (by name, path or object) or custom tasks."""
    if isinstance(suite, (str, Path)):
        suite = load_suite(suite)
    if hasattr(suite, "entries") and hasattr(suite, "seeds"):
        return _SuiteSource(suite.name, suite.path, as_bench_tasks(suite.entries, None),
                            suite.seeds[split], dict(suite.tables), split)
    if isinstance(suite, (Task, BenchTask)) or hasattr(suite, "sample"):
        suite = [suite]
    if isinstance(steps, str) or steps is None:
        fixed = None
    else:
        fixed = int(steps)
    return _SuiteSource("custom", None, as_bench_tasks(list(suite), fixed), None, {}, "custom")


def _pick_seeds(seeds: int | Sequence[int], test_seeds: Sequence[int] | None, split: str = "test") -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        pool = test_seeds if test_seeds is not None else range(seeds)
        if seeds > len(pool):
            raise ValueError(f"asked for {seeds} seeds but the suite's {split} split has only {len(pool)}")
        return [int(s) for s in list(pool)[:seeds]]
    out = [int(s) for s in seeds]
    if not out:
        raise ValueError("seeds must not be empty")
    if test_seeds is not None:
        outside = [s for s in out if s not in test_seeds]
        if outside:
            raise ValueError(f"seeds {outside} are not in the suite's {split} split {test_seeds}")
    return out


def _finite_or_none(obj: Any) -> Any:
    """results.json is strict JSON: non-finite floats become null (divergence is flagged separately)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


class _Harness:
    def __init__(self, suite_name: str, seeds: list[int], cache: RunCache, device: str, pbar: Any) -> None:
        self.suite_name, self.seeds, self.cache, self.device, self.pbar = suite_name, seeds, cache, device, pbar
        self._tasks: dict[tuple[str, int], Task] = {}

    def task(self, bt: BenchTask, seed: int) -> Task:
        key = (bt.label, seed)
        if key not in self._tasks:
            self._tasks[key] = bt.make(seed).to(self.device)
        return self._tasks[key]

    def runs(self, bt: BenchTask, spec: OptimizerSpec, lr: float | None, steps: int, every: int) -> list[RunResult]:
        out = []
        for seed in self.seeds:
            key = run_key(suite=self.suite_name, task=bt.fingerprint, optimizer=spec.key, lr=lr, seed=seed,
                          steps=steps, eval_every=every, device=torch.device(self.device).type)
            seen = self.cache.in_memory(key)  # asked again this session (tuning re-asks): not progress
            result = self.cache.get(key)
            if result is None:
                self.pbar.set_postfix_str(f"{bt.label} · {spec.label} · lr={lr_key(lr)} · seed {seed}", refresh=False)
                result = run(self.task(bt, seed), spec.factory(lr, steps), seed, steps, every)
                self.cache.put(key, result)
            out.append(result)
            if not seen:
                self.pbar.update(1)
        return out

    def score(self, bt: BenchTask, spec: OptimizerSpec, steps: int, lr: float) -> float:
        """Mean final loss over seeds (inf if any diverged); tuning runs evaluate only at the end,
        since full-data evaluations can cost more than the training steps."""
        runs = self.runs(bt, spec, lr, steps, steps)
        return math.inf if any(r.diverged for r in runs) else sum(r.final_loss for r in runs) / len(runs)

    def grow_total(self, n: int) -> None:
        self.pbar.total = (self.pbar.total or 0) + n
        self.pbar.refresh()


def _tune(h: _Harness, bt: BenchTask, spec: OptimizerSpec, steps: int, every: int,
          rejected: list[str]) -> tuple[Any, float, list[RunResult]]:
    """Tune the lr, then run the winner with curves. Tuning runs evaluate only at the end, so they can
    miss a transient blow-up that the curve run's evaluations catch: such an lr is rejected (scored
    as diverged) and tuning picks again, so a reported tuned run never diverged where another lr did not."""
    while True:
        tuning = tune_lr(lambda lr: math.inf if lr_key(lr) in rejected else h.score(bt, spec, steps, lr),
                         on_extend=lambda: h.grow_total(len(h.seeds)))
        runs = h.runs(bt, spec, tuning.best_lr, steps, every)
        if not any(r.diverged for r in runs) or math.isinf(tuning.scores[tuning.best_lr]):
            return tuning, tuning.best_lr, runs
        rejected.append(str(lr_key(tuning.best_lr)))
        h.grow_total(len(h.seeds))


def _optimizer_record(spec: OptimizerSpec, tuned: bool, lr: float | None, runs: list[RunResult],
                      tuning: Any) -> dict[str, Any]:
    agg = M.aggregate(runs)
    used = runs[0].extra.get("lr", lr)
    return {
        "spec": spec.label, "tuned": tuned, "lr": used, "requested_lr": lr,
        "tuning": None if tuning is None else {"scores": {lr_key(k): v for k, v in tuning.scores.items()},
                                               "extended": tuning.extended, "on_edge": tuning.on_edge},
        "n_seeds": agg.n_seeds, "n_diverged": agg.n_diverged, "initial_loss": agg.initial_mean,
        "final_mean": agg.final_mean, "final_std": agg.final_std, "normalised_mean": agg.normalised_mean,
        "test": agg.test, "runs": [r.to_json() for r in runs], "_agg": agg,
    }


def _bench_task(h: _Harness, bt: BenchTask, specs: list[OptimizerSpec], tune: bool,
                steps: int, every: int, pairs: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    records: dict[str, dict[str, Any]] = {}
    for spec in specs:
        tuned = _is_tuned(spec, tune)
        tuning, rejected = None, []
        if tuned:
            tuning, lr, runs = _tune(h, bt, spec, steps, every, rejected)
        else:
            lr = spec.fixed_lr
            runs = h.runs(bt, spec, lr, steps, every)
        records[spec.label] = _optimizer_record(spec, tuned, lr, runs, tuning)
        if tuning is not None:
            records[spec.label]["tuning"]["rejected_lrs"] = rejected

    adam = records[TUNED_ADAM]
    adam_spec = next(s for s in specs if s.label == TUNED_ADAM)
    adam_runs = [RunResult.from_json(r) for r in adam["runs"]]
    curve = M.mean_curve(adam_runs)
    extended: dict[str, Any] | None = None
    targets = [r["final_mean"] for r in records.values() if not r["n_diverged"]]
    if targets and min(targets) < min(curve[1]):
        # someone ended below anything Adam reached within the horizon: run Adam 10x longer
        h.grow_total(len(h.seeds))
        long_runs = h.runs(bt, adam_spec, adam["lr"], M.SPEEDUP_CAP * steps, every)
        curve = M.mean_curve(long_runs)
        extended = {"lr": adam["lr"], "steps": M.SPEEDUP_CAP * steps, "curve_steps": curve[0],
                    "curve_losses": curve[1], "n_diverged": sum(r.diverged for r in long_runs)}
    aggs = {label: rec.pop("_agg") for label, rec in records.items()}
    for label, rec in records.items():
        agg = aggs[label]
        rec["win_vs_tuned_adam"] = M.wins(agg, aggs[TUNED_ADAM])
        rec["win_vs_adam_1e-3"] = M.wins(agg, aggs[ADAM_1E3])
        rec["ratio_to_tuned_adam"] = M.normalised_ratio(agg, aggs[TUNED_ADAM])
        rec["test_loss_vs_tuned_adam"] = M.test_loss_verdict(agg, aggs[TUNED_ADAM])
        if agg.diverged:
            rec["speedup"] = None
        else:
            sp = M.speedup(agg.final_mean, steps, curve[0], curve[1], adam["initial_loss"])
            rec["speedup"] = {"value": sp.value, "censored": sp.censored, "text": str(sp)}
    seed_runs = {label: [RunResult.from_json(r) for r in rec["runs"]] for label, rec in records.items()}
    head_to_head = {f"{c} vs {b}": {"win": M.wins(aggs[c], aggs[b]), "ratio": M.normalised_ratio(aggs[c], aggs[b]),
                                    "seed_wins": M.paired_seed_wins(seed_runs[c], seed_runs[b]),
                                    "seeds": len(seed_runs[c])}
                    for c, b in pairs}
    return {"label": bt.label, "steps": steps, "eval_every": every, "initial_loss": adam["initial_loss"],
            "results": records, "adam_extended": extended, "pairs": head_to_head}


def _pair_summary(tasks: list[dict[str, Any]], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per (candidate, baseline) pair: wins of the candidate over the tasks, the geometric-mean loss
    ratio (tasks where either diverged are left out, as in the summary) and its 90% seed-bootstrap
    interval, from the tasks' per-seed runs."""
    def runs(task: dict[str, Any], label: str) -> list[RunResult]:
        return [RunResult.from_json(r) for r in task["results"][label]["runs"]]

    out = []
    for c, b in pairs:
        rows = [t["pairs"][f"{c} vs {b}"] for t in tasks]
        seeds = [M.paired_normalised(runs(t, c), runs(t, b)) for t in tasks]
        out.append({"candidate": c, "baseline": b, "tasks": len(rows), "wins": sum(r["win"] for r in rows),
                    "geomean_ratio": M.geometric_mean([r["ratio"] for r in rows]),
                    "ratio_interval": M.ratio_interval(seeds),
                    "seed_wins": sum(r["seed_wins"] for r in rows), "seed_runs": sum(r["seeds"] for r in rows)})
    return out


def _summary(tasks: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for label in labels:
        recs = [t["results"][label] for t in tasks]
        speedups = [M.Speedup(r["speedup"]["value"], r["speedup"]["censored"]) for r in recs if r["speedup"]]
        med = M.median_speedup(speedups)
        ratios = [t.get("timing", {}).get(label, {}).get("ratio_to_adam") for t in tasks]
        ratios = [r for r in ratios if r is not None]
        test = [r["test_loss_vs_tuned_adam"] for r in recs if r.get("test_loss_vs_tuned_adam") is not None]
        out[label] = {
            "tasks": len(recs),
            "wins_vs_tuned_adam": sum(r["win_vs_tuned_adam"] for r in recs),
            "wins_vs_adam_1e-3": sum(r["win_vs_adam_1e-3"] for r in recs),
            "geomean_ratio_to_tuned_adam": M.geometric_mean([r["ratio_to_tuned_adam"] for r in recs]),
            "median_speedup": None if med is None else {"value": med.value, "censored": med.censored,
                                                        "text": str(med)},
            "diverged_runs": sum(r["n_diverged"] for r in recs),
            "diverged_tasks": sum(r["n_diverged"] > 0 for r in recs),
            "step_time_ratio_to_adam": M.geometric_mean(ratios),
            "test_loss": {"tasks": len(test), "wins_vs_tuned_adam": sum(w for w, _ in test),
                          "geomean_ratio_to_tuned_adam": M.geometric_mean([r for _, r in test])},
        }
    return out


class BenchmarkConfigError(ValueError):
    """A bad suite, table, optimizer spec or option, found before any run starts."""


def check_device(device: str) -> torch.device:
    """The torch device ``device`` names; ValueError if it is not one, or not available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def _shipped_label(label: str, device: str) -> bool:
    """Whether ``label`` is a shipped name, with or without valid fixed settings (``default[horizon=true]``)."""
    from learned_opt.weights import list_pretrained

    if label.split("[", 1)[0] not in list_pretrained():
        return False
    try:
        spec = resolve_optimizers([label])[0]
        check_spec_builds(spec, spec.fixed_lr if spec.fixed_lr is not None else _PROBE_LR, device)
    except ValueError:
        return False
    return True


def _configure(suite: Any, optimizers: Any, tune: bool | None, seeds: Any, steps: int | str | None,
               eval_every: int | None, timing_steps: int | None, device: str, split: str = "test",
               out: str | Path | None = None) -> tuple[Any, ...]:
    """Resolve and validate everything (function arguments over the suite's [benchmark] table)."""
    from learned_opt.cli import check_output_dir

    check_steps_override(steps, "steps")
    check_device(device)
    if out is not None:
        check_output_dir(out)
    if split not in BENCH_SPLITS:
        raise ValueError(f"split must be one of {list(BENCH_SPLITS)}, got {split!r}")
    src = _suite_source(suite, steps, split)
    table = read_benchmark_table(src.tables, src.path) if src.tables.get("benchmark") is not None \
        else dict(BENCHMARK_DEFAULTS)
    tune = table["tune"] if tune is None else bool(tune)
    steps = table["steps"] if steps is None else steps
    every_cfg = table["eval_every"] if eval_every is None else eval_every
    timing_n = table["timing_steps"] if timing_steps is None else timing_steps
    if every_cfg < 0 or timing_n < 0:
        raise ValueError(f"eval_every and timing_steps must be >= 0, got {every_cfg}, {timing_n}")
    seed_list = _pick_seeds(table["seeds"] if seeds is None else seeds, src.test_seeds, src.split)
    from_table = f"{src.path}: [benchmark] optimizers: " if optimizers is None and src.path is not None else ""
    try:
        user_specs = resolve_optimizers(table["optimizers"] if optimizers is None else optimizers)
        specs = list(reference_specs()) + [s for s in user_specs if not _same_as_reference(s, tune)]
        for spec in specs:
            check_spec_builds(spec, _PROBE_LR if _is_tuned(spec, tune) else spec.fixed_lr, device)
    except ValueError as exc:
        raise ValueError(f"{from_table}{exc}") from exc
    labels = {s.label for s in specs}
    pairs = [p for p in table["pairs"] if set(p) <= labels]
    # a pair may name a shipped optimizer (the ship tool benchmarks every shipped name); others must run
    named = {x for p in table["pairs"] for x in p}
    unknown = [] if optimizers is not None else sorted(x for x in named - labels if not _shipped_label(x, device))
    if unknown:
        raise ValueError(f"{src.path or '<suite>'}: [benchmark] pairs name {unknown}, which are not among the "
                         f"benchmarked optimizers {sorted(labels)}")
    return src, specs, seed_list, tune, steps, every_cfg, timing_n, pairs


_PROBE_LR = 1e-3  # a tuned spec is only ever built at grid lrs; this is one


def _is_tuned(spec: OptimizerSpec, tune: bool) -> bool:
    """Tuned Adam always; any other spec when ``tune`` and it is tunable with no fixed lr."""
    return spec.label == TUNED_ADAM or (tune and spec.tuned_by_default)


def benchmark(
    suite: Any,
    optimizers: Sequence[str | OptimizerSpec] | Mapping[str, Callable[..., torch.optim.Optimizer] | str] | None = None,
    *,
    tune: bool | None = None,
    seeds: int | Sequence[int] | None = None,
    steps: int | str | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    eval_every: int | None = None,
    timing_steps: int | None = None,
    progress: bool = True,
    plots: bool = True,
    command: str | None = None,
    split: str = "test",
) -> BenchmarkResult:
    """Benchmark ``optimizers`` on ``suite`` against tuned Adam and Adam(lr=1e-3); see the module doc.

    ``suite``: a suite name or file (its ``[benchmark]`` table supplies defaults), a Suite, or a
    list of SuiteEntry / TaskFamily / Task objects (the latter two need ``steps``).
    ``optimizers``: spec strings (see :mod:`learned_opt.bench.baselines`), OptimizerSpec objects, or
    ``{label: factory}`` with ``factory(params[, lr=...])``. ``seeds``: how many of the suite's
    ``split`` seeds (``"test"`` for reports, ``"validation"`` for choosing settings), or a list of them. ``steps``: horizon override, an int or ``"10x"``. ``out``: directory
    for the run cache, report.md, results.json and plots (None: nothing written, nothing cached).
    """
    try:
        src, specs, seed_list, tune, steps, every_cfg, timing_n, pairs = _configure(
            suite, optimizers, tune, seeds, steps, eval_every, timing_steps, device, split, out)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise BenchmarkConfigError(str(exc)) from exc

    out_dir = None if out is None else Path(out)
    cache = RunCache(None if out_dir is None else out_dir / "cache")
    grid = GRID_HIGH - GRID_LOW + 1
    per_task = sum(grid + 1 if _is_tuned(s, tune) else 1 for s in specs)
    pbar = tqdm(total=len(src.tasks) * len(seed_list) * per_task, desc="benchmark", unit="run",
                disable=not progress, file=sys.stderr, dynamic_ncols=True)
    h = _Harness(src.name, seed_list, cache, device, pbar)
    for bt in src.tasks:  # build each task once up front: missing data is reported before any run
        try:
            h.task(bt, seed_list[0])
        except (FileNotFoundError, ImportError) as exc:
            pbar.close()
            raise BenchmarkConfigError(f"task {bt.label!r}: cannot build it: {exc}") from exc
    tasks = []
    try:
        for bt in src.tasks:
            n = resolve_steps(bt.steps, steps)
            every = every_cfg or default_eval_every(n)
            tasks.append(_bench_task(h, bt, specs, tune, n, every, pairs))
    finally:
        pbar.close()
    if timing_n:
        for bt, t in zip(src.tasks, tasks):
            builders = {s.label: s.factory(t["results"][s.label]["requested_lr"], t["steps"]) for s in specs}
            timing = time_optimizers(h.task(bt, seed_list[0]), seed_list[0], builders, timing_n)
            base = timing[TUNED_ADAM]["step_ms"]
            for v in timing.values():
                v["ratio_to_adam"] = v["step_ms"] / base if base > 0 else math.nan
            t["timing"] = timing
    labels = [s.label for s in specs]
    results = {
        "command": command or _api_command(suite, optimizers, tune, seeds, steps, out, device),
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "suite": src.name, "suite_path": None if src.path is None else str(src.path),
        "seeds": seed_list, "split": src.split, "device": device, "tune": tune, "steps_override": steps,
        "timing_steps": timing_n, "torch": torch.__version__,
        "optimizers": [{"label": s.label, "key": s.key, "reference": s.label in (TUNED_ADAM, ADAM_1E3)} for s in specs],
        "cache": {"hits": cache.hits, "misses": cache.misses},
        "tasks": tasks,
        "summary": _summary(tasks, labels),
        "pairs": _pair_summary(tasks, pairs),
    }
    results = _finite_or_none(results)
    from learned_opt.bench.report import render_report, write_outputs

    report = render_report(results)
    files = [] if out_dir is None else write_outputs(results, report, out_dir, plots=plots)
    return BenchmarkResult(results, report, out_dir, files)


def _same_as_reference(spec: OptimizerSpec, tune: bool) -> bool:
    """A user's ``adam`` (tuned) or ``adam[lr=0.001]`` is a reference already: don't run it twice."""
    adam, adam3 = reference_specs()
    if spec.key != adam.key:
        return False
    return spec.fixed_lr == 1e-3 or (tune and spec.tuned_by_default)


def _api_command(*args: Any) -> str:
    names = ("suite", "optimizers", "tune", "seeds", "steps", "out", "device")
    return "learned_opt.benchmark(" + ", ".join(f"{n}={a!r}" for n, a in zip(names, args)) + ")"
