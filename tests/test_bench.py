"""Benchmark harness: tuning, metrics, divergence, cache/resume, outputs, specs, CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from learned_opt.bench import metrics as M
from learned_opt.bench.baselines import (
    ADAM_1E3,
    TUNED_ADAM,
    parse_spec_string,
    resolve_optimizer,
    resolve_optimizers,
    spec_from_factory,
)
from learned_opt.bench.cache import RunCache, run_key
from learned_opt.bench.harness import benchmark
from learned_opt.bench.runner import RunResult, eval_points, run
from learned_opt.bench.settings import read_benchmark_table, resolve_steps
from learned_opt.bench.timing import time_optimizers
from learned_opt.bench.tuning import grid_lr, tune_lr
from learned_opt.tasks.base import Task, TaskFamily


class ScaledQuadratic(Task):
    """f(x) = 0.5 · a · ||x − c||² (full batch). Plain gradient descent is exact in one step at lr = 1/a,
    contracts by |1 − lr·a| per step otherwise, and diverges for lr > 2/a: a known best lr."""

    def __init__(self, a: float, dim: int = 3, name: str = "scaled-quadratic") -> None:
        self.a, self.dim, self.name = float(a), dim, name
        self.c = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [torch.randn(self.dim, generator=generator, dtype=torch.float64) + 3.0]

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        return ()

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        return 0.5 * self.a * (params[0] - self.c).pow(2).sum()

    def eval_loss(self, params: Sequence[Tensor]) -> Tensor:
        return self.loss(params, ())

    def __repr__(self) -> str:
        return f"ScaledQuadratic(a={self.a}, dim={self.dim})"


class NoisyQuadraticFamily(TaskFamily):
    """Tasks with a held-out split and minibatch noise, so test metrics and curves are exercised."""

    name = "noisy-quadratic"
    defaults = {"dim": 4}

    def sample(self, seed: int) -> Task:
        return _NoisyQuadratic(int(self.draw_settings(seed)["dim"]), seed)


class _NoisyQuadratic(Task):
    def __init__(self, dim: int, seed: int) -> None:
        g = torch.Generator().manual_seed(1000 + seed)
        self.target = torch.randn(dim, generator=g)
        self.test_target = self.target + 0.1 * torch.randn(dim, generator=g)
        self.name = f"noisy-quadratic-{seed}"

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [torch.zeros_like(self.target)]

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        return (self.target + 0.05 * torch.randn(self.target.shape, generator=generator),)

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        return (params[0] - batch[0]).pow(2).mean() + 0.01

    def eval_loss(self, params: Sequence[Tensor]) -> Tensor:
        return self.loss(params, (self.target,))

    def test_metrics(self, params: Sequence[Tensor]) -> dict[str, float]:
        return {"test_loss": float(self.loss(params, (self.test_target,))), "test_accuracy": 0.5}


def _sgd_score(task: Task, steps: int = 5, seeds: Sequence[int] = (0, 1)):
    sgd = resolve_optimizer("sgd")

    def score(lr: float) -> float:
        runs = [run(task, lambda p: sgd.build(p, lr), s, steps, 1) for s in seeds]
        return math.inf if any(r.diverged for r in runs) else sum(r.final_loss for r in runs) / len(runs)

    return score


# --- tuning ---------------------------------------------------------------------------------------


def test_grid_is_half_decades_from_1e_4_to_1() -> None:
    assert [grid_lr(k) for k in range(-8, 1)] == pytest.approx(
        [1e-4, 3.16227766e-4, 1e-3, 3.16227766e-3, 1e-2, 3.16227766e-2, 0.1, 0.316227766, 1.0])
    assert grid_lr(-6) == 1e-3  # exact: the Adam(lr=1e-3) reference reuses the grid's run


def test_tuning_finds_the_known_best_lr_inside_the_grid() -> None:
    best = grid_lr(-3)  # 10**-1.5
    result = tune_lr(_sgd_score(ScaledQuadratic(1.0 / best)))
    assert result.best_lr == pytest.approx(best)
    assert result.extended == 0
    assert sorted(result.scores) == pytest.approx([grid_lr(k) for k in range(-8, 1)])
    assert math.isinf(result.scores[grid_lr(0)])  # lr = 1 diverges on this task: ranked worst


def test_tuning_extends_past_the_lower_edge_one_step_at_a_time() -> None:
    result = tune_lr(_sgd_score(ScaledQuadratic(1e5)))  # best lr 1e-5, below the grid
    assert result.best_lr == pytest.approx(1e-5)
    assert min(result.scores) == pytest.approx(grid_lr(-11))  # went one step past the best, then stopped
    assert result.extended == 3
    assert not result.on_edge


def test_tuning_extends_past_the_upper_edge() -> None:
    result = tune_lr(_sgd_score(ScaledQuadratic(0.1)))  # best lr 10, above the grid
    assert result.best_lr == pytest.approx(10.0)
    assert max(result.scores) == pytest.approx(grid_lr(3))
    assert result.extended == 3


def test_tuning_counts_diverged_as_worst_and_stops_at_the_extension_limit() -> None:
    calls = []

    def always_diverges(lr: float) -> float:
        calls.append(lr)
        return math.inf

    result = tune_lr(always_diverges, max_extension=2)
    assert result.best_lr == pytest.approx(grid_lr(-10)) and result.on_edge
    assert len(calls) == 9 + 2
    assert tune_lr(lambda lr: math.nan, max_extension=0).best_lr == pytest.approx(1e-4)  # nan ranks as inf


# --- metrics --------------------------------------------------------------------------------------


def _curve(n: int) -> tuple[list[int], list[float]]:
    steps = list(range(0, n + 1, 10))
    return steps, [100.0 / (1.0 + s) for s in steps]


def test_speedup_on_synthetic_curves() -> None:
    steps, losses = _curve(1000)  # Adam's loss 100/(1+t), evaluated every 10 steps
    horizon = 100
    # an optimizer ending, at step 100, where Adam is at step 300: speedup 3
    assert M.speedup(100.0 / 301, horizon, steps, losses, 100.0) == M.Speedup(3.0)
    # ending where Adam is at step 100 (same speed): 1; worse (Adam's loss at step 50): 0.5
    assert M.speedup(100.0 / 101, horizon, steps, losses, 100.0).value == pytest.approx(1.0)
    assert M.speedup(100.0 / 51, horizon, steps, losses, 100.0).value == pytest.approx(0.5)
    # between evaluations: linear interpolation (target halfway between Adam's losses at 40 and 50)
    mid = (100.0 / 41 + 100.0 / 51) / 2
    assert M.speedup(mid, horizon, steps, losses, 100.0).value == pytest.approx(0.45)
    # below anything Adam reaches within 10x the horizon: "> 10"
    censored = M.speedup(0.01, horizon, steps, losses, 100.0)
    assert censored.censored and censored.value == 10 and str(censored) == "> 10"
    # Adam curve shorter than 10x (e.g. diverged early): censored at the ratio it covers
    short = M.speedup(0.01, horizon, steps[:31], losses[:31], 100.0)
    assert short.censored and short.value == pytest.approx(3.0) and str(short) == "> 3"
    # reaching only after 10x the horizon is still "> 10"
    long_steps, long_losses = _curve(2000)
    assert M.speedup(100.0 / 1501, horizon, long_steps, long_losses, 100.0).censored
    with pytest.raises(ValueError, match="diverged"):
        M.speedup(math.inf, horizon, steps, losses, 100.0)


def test_median_speedup_orders_censored_values_last() -> None:
    S = M.Speedup
    assert M.median_speedup([S(0.5), S(2.0), S(10, True)]) == S(2.0)
    assert M.median_speedup([S(0.5), S(10, True), S(10, True)]) == S(10, True)
    assert M.median_speedup([S(1.0), S(3.0)]) == S(2.0)
    assert M.median_speedup([S(2.0), S(10, True)]) == S(6.0, True)  # at least (2 + 10) / 2
    assert M.median_speedup([]) is None


def _run(seed: int, losses: list[float], diverged: bool = False) -> RunResult:
    return RunResult(seed, list(range(0, 10 * len(losses), 10)), losses, diverged)


def test_divergence_is_counted_not_averaged() -> None:
    runs = [_run(0, [10.0, 1.0]), _run(1, [10.0, 3.0]), _run(2, [10.0, 500.0], diverged=True)]
    agg = M.aggregate(runs)
    assert agg.n_diverged == 1 and agg.diverged
    assert agg.final_mean == pytest.approx(2.0)  # the diverged seed is not in the mean
    assert agg.normalised_mean == pytest.approx(0.2)
    base = M.aggregate([_run(0, [10.0, 5.0])])
    assert not M.wins(agg, base)  # divergence never wins ...
    assert M.wins(base, agg)  # ... and loses to anything that did not diverge
    assert math.isnan(M.normalised_ratio(agg, base))
    assert M.geometric_mean([math.nan, 2.0, 8.0]) == pytest.approx(4.0)


def test_win_tolerance_makes_noise_floor_ties_even() -> None:
    a = M.aggregate([_run(0, [100.0, 0.0])])
    b = M.aggregate([_run(0, [100.0, 0.005])])  # within 1e-4 x initial (0.01) of zero
    c = M.aggregate([_run(0, [100.0, 0.02])])
    assert M.wins(a, b) and M.wins(b, a)
    assert M.wins(a, c) and not M.wins(c, a)
    # ratio of normalised losses with the tolerance: (0 + 1e-4) / (5e-5 + 1e-4), not 0 / tiny
    assert M.normalised_ratio(a, b) == pytest.approx(1e-4 / 1.5e-4)


def test_runner_flags_divergence_and_stops_early() -> None:
    task = ScaledQuadratic(1.0)
    sgd = resolve_optimizer("sgd")
    result = run(task, lambda p: sgd.build(p, 3.0), seed=0, steps=50, eval_every=1)  # |1 - 3| = 2 > 1
    assert result.diverged and result.steps[-1] < 50 and math.isinf(result.final_loss)
    assert result.losses[-1] > 10 * result.losses[0]
    # a run evaluated only at the end (as in tuning) stops early too, at a minibatch check
    early = run(task, lambda p: sgd.build(p, 3.0), seed=0, steps=1000, eval_every=1000)
    assert early.diverged and early.steps == [0, 10]
    curve_steps, curve = M.mean_curve([early, run(task, lambda p: sgd.build(p, 0.5), 0, 1000, 1000)])
    assert curve_steps == [0, 1000] and math.isfinite(curve[0]) and math.isinf(curve[1])
    ok = run(task, lambda p: sgd.build(p, 0.5), seed=0, steps=7, eval_every=3)
    assert ok.steps == [0, 3, 6, 7] == eval_points(7, 3)
    assert ok.losses[-1] == pytest.approx(ok.losses[0] * 0.25 ** 7)
    assert ok.extra["lr"] == 0.5


def test_runs_are_deterministic_per_seed() -> None:
    family = NoisyQuadraticFamily()
    adam = resolve_optimizer("adam")
    a, b = (run(family.sample(3), lambda p: adam.build(p, 0.1), 3, 20, 5) for _ in range(2))
    assert a.losses == b.losses and a.test == b.test
    c = run(family.sample(4), lambda p: adam.build(p, 0.1), 4, 20, 5)
    assert c.losses != a.losses


# --- the harness ----------------------------------------------------------------------------------


def test_diverging_optimizer_is_flagged_in_the_benchmark(tmp_path: Path) -> None:
    tasks = [ScaledQuadratic(1.0, name="easy"), ScaledQuadratic(4.0, name="stiff")]
    res = benchmark(tasks, ["sgd[lr=0.3]", "momentum[lr=5]"], seeds=2, steps=20, progress=False,
                    timing_steps=0, out=tmp_path)
    rows = {t["label"]: t["results"] for t in res.results["tasks"]}
    assert rows["easy"]["sgd[lr=0.3]"]["n_diverged"] == 0
    assert rows["stiff"]["sgd[lr=0.3]"]["n_diverged"] == 0  # |1 - 1.2| < 1
    for label in ("easy", "stiff"):
        rec = rows[label]["momentum[lr=5]"]
        assert rec["n_diverged"] == 2 and rec["final_mean"] is None
        assert rec["ratio_to_tuned_adam"] is None and rec["speedup"] is None
        assert not rec["win_vs_tuned_adam"] and not rec["win_vs_adam_1e-3"]
    summary = res.results["summary"]["momentum[lr=5]"]
    assert summary["diverged_tasks"] == 2 and summary["diverged_runs"] == 4
    assert summary["geomean_ratio_to_tuned_adam"] is None  # nothing finite to average
    assert "diverged (2/2)" in res.report
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["momentum[lr=5]"]["diverged_runs"] == 4


def _without_wall(obj):
    """Results minus run wall times (the only field a rerun may change)."""
    if isinstance(obj, dict):
        return {k: _without_wall(v) for k, v in obj.items() if k != "wall_s"}
    if isinstance(obj, list):
        return [_without_wall(v) for v in obj]
    return obj


def test_resume_skips_finished_runs(tmp_path: Path) -> None:
    task = ScaledQuadratic(2.0, name="q")
    built = {"n": 0, "fail_at": 3}  # build 1 is the up-front check, 2 the first run

    def flaky_sgd(params: list[Tensor], lr: float = 0.1) -> torch.optim.Optimizer:
        built["n"] += 1
        if built["n"] == built["fail_at"]:
            raise KeyboardInterrupt  # the benchmark is interrupted mid-way
        return torch.optim.SGD(params, lr=lr)

    opts = {"flaky": spec_from_factory("flaky", flaky_sgd, lr=0.1)}
    kwargs = dict(seeds=3, steps=10, progress=False, timing_steps=0, out=tmp_path, plots=False)
    with pytest.raises(KeyboardInterrupt):
        benchmark([task], opts, **kwargs)
    n_finished = len(list((tmp_path / "cache").rglob("*.json")))
    assert n_finished > 0
    built["fail_at"] = -1
    first = benchmark([task], opts, **kwargs)
    assert first.results["cache"]["hits"] >= n_finished
    fresh = benchmark([task], opts, **{**kwargs, "out": tmp_path / "fresh"})
    n_total = fresh.results["cache"]["misses"]
    assert first.results["cache"]["misses"] == n_total - n_finished  # only the unfinished runs
    assert _without_wall(first.results["tasks"]) == _without_wall(fresh.results["tasks"])
    built["n"] = 0
    again = benchmark([task], opts, **kwargs)
    assert again.results["cache"]["misses"] == 0 and built["n"] == 1  # the up-front check; nothing rerun
    assert again.results["tasks"] == first.results["tasks"]
    assert again.results["cache"]["hits"] >= n_total


def test_changed_weights_file_invalidates_its_cache_entries(tmp_path: Path) -> None:
    from learned_opt.rules.grad_norm_decay import GradNormDecayRule
    from learned_opt.weights import save_weights

    rule = GradNormDecayRule()
    path = save_weights(rule, tmp_path / "w" / "mine", name="mine", meta_training={"test": True})
    task = ScaledQuadratic(2.0, name="q")
    kwargs = dict(seeds=2, steps=10, progress=False, timing_steps=0, out=tmp_path / "bench", plots=False)
    first = benchmark([task], [str(path)], **kwargs)
    assert first.results["cache"]["misses"] > 0
    assert benchmark([task], [str(path)], **kwargs).results["cache"]["misses"] == 0
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(0.25)
    save_weights(rule, path, name="mine", meta_training={"test": True})
    changed = benchmark([task], [str(path)], **kwargs)
    assert changed.results["cache"]["misses"] == 2  # only the learned optimizer's runs, one per seed


def test_cache_key_covers_every_field_and_survives_reload(tmp_path: Path) -> None:
    base = dict(suite="s", task={"label": "t"}, optimizer={"torch": "Adam"}, lr=1e-3, seed=0, steps=10,
                eval_every=10, device="cpu")  # what _run's curve (steps 0 and 10) records
    cache = RunCache(tmp_path)
    result = _run(0, [1.0, 0.5])
    cache.put(run_key(**base), result)
    assert RunCache(tmp_path).get(run_key(**base)) == result
    for field, value in [("suite", "x"), ("task", {"label": "u"}), ("optimizer", {"torch": "SGD"}),
                         ("lr", 3e-3), ("seed", 1), ("steps", 11), ("eval_every", 2), ("device", "cuda")]:
        assert RunCache(tmp_path).get(run_key(**{**base, field: value})) is None, field
    assert RunCache(tmp_path).get(run_key(**{**base, "lr": 0.001 * (1 + 1e-15)})) == result  # float noise


def test_report_json_and_plots_for_a_tiny_suite(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from learned_opt.bench.cli import main

    suite = tmp_path / "tiny.toml"
    suite.write_text(
        """
[suite]
name = "tiny"
steps = 30
seeds = { train = [0, 10], validation = [10, 20], test = [20, 30] }

[[suite.family]]
label = "quad-4d"
family = "quadratic"
settings = { dim = 4 }

[[suite.family]]
label = "quad-ill"
family = "quadratic"
steps = 20
settings = { dim = 4, condition = 100.0 }

[benchmark]
optimizers = ["sgd", "HypergradientSGD"]
tune = true
seeds = 2
timing_steps = 3
pairs = [["HypergradientSGD", "sgd"]]
""")
    out = tmp_path / "out"
    assert main(["--suite", str(suite), "--out", str(out), "--quiet", "--steps", "1x"]) == 0
    report = (out / "report.md").read_text()
    for text in ("# Benchmark: tiny", "## Summary", "quad-4d", "quad-ill", TUNED_ADAM, ADAM_1E3, "sgd",
                 "HypergradientSGD", "(tuned)", "wins vs"):
        assert text in report, text
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("learned-opt benchmark --suite")
    assert results["seeds"] == [20, 21]
    quad = results["tasks"][0]
    assert quad["steps"] == 30 and results["tasks"][1]["steps"] == 20
    sgd = quad["results"]["sgd"]
    assert sgd["tuned"] and sgd["tuning"]["scores"] and sgd["lr"] in [grid_lr(k) for k in range(-12, 9)]
    assert len(sgd["runs"]) == 2 and sgd["runs"][0]["steps"][-1] == 30 and len(sgd["runs"][0]["losses"]) == 31
    assert quad["results"][ADAM_1E3]["lr"] == 1e-3 and not quad["results"][ADAM_1E3]["tuned"]
    timing = quad["timing"]
    assert timing[TUNED_ADAM]["ratio_to_adam"] == 1.0 and timing["sgd"]["state_bytes_per_param"] == 0
    assert timing[TUNED_ADAM]["state_bytes_per_param"] >= 8  # exp_avg + exp_avg_sq in float32
    (pair,) = results["pairs"]  # the head-to-head row counts the per-task wins against sgd
    assert pair["candidate"] == "HypergradientSGD" and pair["baseline"] == "sgd" and pair["tasks"] == 2
    wins = [not t["results"]["HypergradientSGD"]["n_diverged"] and (t["results"]["sgd"]["n_diverged"] or
            t["results"]["HypergradientSGD"]["normalised_mean"] <= t["results"]["sgd"]["normalised_mean"] + 1e-4)
            for t in results["tasks"]]
    assert pair["wins"] == sum(wins) and "## Head to head" in report and "HypergradientSGD vs sgd" in report
    seed_wins = [sum(not c["diverged"] and (b["diverged"] or c["losses"][-1] / c["losses"][0]
                                            <= b["losses"][-1] / b["losses"][0] + 1e-4)
                     for c, b in zip(t["results"]["HypergradientSGD"]["runs"], t["results"]["sgd"]["runs"]))
                 for t in results["tasks"]]
    assert [t["pairs"]["HypergradientSGD vs sgd"]["seed_wins"] for t in results["tasks"]] == seed_wins
    assert pair["seed_wins"] == sum(seed_wins) and pair["seed_runs"] == 4 and f"{sum(seed_wins)}/4" in report
    lo, hi = pair["ratio_interval"]  # here (2 seeds, fixed resampling) it holds the ratio of the full means
    assert lo <= pair["geomean_ratio"] * (1 + 1e-9) and pair["geomean_ratio"] <= hi * (1 + 1e-9)
    assert "90% interval" in report
    for name in ("summary.png", "quad-4d.png", "quad-ill.png"):
        png = out / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_benchmark_takes_task_objects_and_factories_and_measures_speedup() -> None:
    task = ScaledQuadratic(1.0, name="q")
    # heavy-ball SGD at lr = 1 solves it in one step: Adam needs (many) more steps -> speedup > 1
    res = benchmark([task], {"exact": lambda params: torch.optim.SGD(params, lr=1.0)}, seeds=1, steps=10,
                    progress=False, timing_steps=2)
    rec = res.results["tasks"][0]["results"]["exact"]
    assert rec["win_vs_tuned_adam"] and rec["speedup"]["value"] > 1
    assert res.results["tasks"][0]["adam_extended"]["steps"] == 100  # Adam ran 10x the horizon to find it
    assert res.out is None and res.files == []


class SpikySGD(torch.optim.SGD):
    """SGD that, at lr >= 0.3, throws the parameters far away at step 2 and back at step 3: a transient
    blow-up an end-only evaluation misses."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, lr=lr)
        self.k = 0

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        self.k += 1
        if self.param_groups[0]["lr"] >= 0.3 and self.k in (2, 3):
            for p in self.param_groups[0]["params"]:
                p.add_(100.0 if self.k == 2 else -100.0)


def test_tuning_rejects_an_lr_whose_curve_run_diverges() -> None:
    spiky = spec_from_factory("spiky", SpikySGD)
    res = benchmark([ScaledQuadratic(1.0, name="q")], [spiky], tune=True, seeds=2, steps=8, eval_every=1,
                    progress=False, timing_steps=0)
    rec = res.results["tasks"][0]["results"]["spiky"]
    # lr = 1 solves the task by the end (best end-only score), but its curve run blows up at step 2
    assert rec["tuning"]["rejected_lrs"] == ["1"]
    assert rec["lr"] == pytest.approx(0.1) and rec["n_diverged"] == 0
    assert rec["tuning"]["scores"]["1"] is None  # rejected lrs are reported as diverged (inf -> null)


def test_noisy_family_reports_test_metrics() -> None:
    res = benchmark([NoisyQuadraticFamily()], ["rmsprop[lr=0.01]"], seeds=2, steps=10, progress=False,
                    timing_steps=0)
    task = res.results["tasks"][0]
    rec = task["results"]["rmsprop[lr=0.01]"]
    assert set(rec["test"]) == {"test_loss", "test_accuracy"} and rec["test"]["test_accuracy"] == 0.5
    # the held-out verdict: the win and ratio of the training loss, on the held-out loss
    adam = task["results"][TUNED_ADAM]
    floor = 1e-4 * adam["initial_loss"]
    win, ratio = rec["test_loss_vs_tuned_adam"]
    assert ratio == pytest.approx((rec["test"]["test_loss"] + floor) / (adam["test"]["test_loss"] + floor))
    assert win == (rec["test"]["test_loss"] <= adam["test"]["test_loss"] + floor)
    summary = res.results["summary"]["rmsprop[lr=0.01]"]["test_loss"]
    assert summary == {"tasks": 1, "wins_vs_tuned_adam": int(win), "geomean_ratio_to_tuned_adam": pytest.approx(ratio)}
    assert "## Test loss, per task" in res.report and "test-loss ratio" in res.report


def test_test_loss_verdict_skips_diverged_runs_and_tasks_without_a_held_out_split() -> None:
    from learned_opt.bench.metrics import Aggregate, test_loss_verdict

    def agg(test: dict, diverged: int = 0) -> Aggregate:
        return Aggregate(2, diverged, 2.0, 0.1, 0.0, 0.05, test)

    assert test_loss_verdict(agg({"test_loss": 0.0}), agg({"test_loss": 0.0})) == (True, 1.0)  # floor, not 0/0
    assert test_loss_verdict(agg({"test_loss": 3.0}), agg({"test_loss": 1.0})) == (False, pytest.approx(3.0, rel=1e-3))
    assert test_loss_verdict(agg({}), agg({"test_loss": 1.0})) is None
    assert test_loss_verdict(agg({"test_loss": 1.0}, diverged=1), agg({"test_loss": 1.0})) is None


# --- specs, settings, timing ----------------------------------------------------------------------


def test_spec_parsing_and_resolution() -> None:
    assert parse_spec_string("adam[lr=1e-3, amsgrad=true]") == ("adam", {"lr": 1e-3, "amsgrad": True})
    with pytest.raises(ValueError, match="key=value"):
        parse_spec_string("adam[lr]")
    with pytest.raises(ValueError, match="unknown optimizer 'nope'"):
        resolve_optimizer("nope")
    with pytest.raises(ValueError, match="lr must be a number"):
        resolve_optimizer("adam[lr=-1]")
    nesterov = resolve_optimizer("nesterov")
    opt = nesterov.build([torch.zeros(2, requires_grad=True)], 0.05)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.05
    assert nesterov.tuned_by_default and not resolve_optimizer("sgd[lr=0.1]").tuned_by_default
    # adam[lr=...] shares Adam's identity, so it reuses the tuning grid's cached runs
    assert resolve_optimizer("adam[lr=0.001]").key == resolve_optimizer("adam").key
    hd_spec = resolve_optimizer("HypergradientSGD")
    hd = hd_spec.build([torch.zeros(2, requires_grad=True)], None)
    assert type(hd).__name__ == "HypergradientSGD"
    assert not hd_spec.tunable and resolve_optimizer("hypergradientsgd[tune=true]").tuned_by_default
    assert not resolve_optimizer("adam[tune=false]").tunable
    with pytest.raises(ValueError, match="tune must be"):
        resolve_optimizer("adam[tune=1]")
    with pytest.raises(ValueError, match="unique"):
        resolve_optimizers(["sgd", "sgd"])


def test_module_factory_spec(tmp_path: Path) -> None:
    module = tmp_path / "myopt.py"
    module.write_text("import torch\ndef make(params, lr=0.5):\n    return torch.optim.SGD(params, lr=lr)\n")
    spec = resolve_optimizer(f"{module}:make")
    assert spec.tunable and spec.key["source_sha256"]
    assert spec.build([torch.zeros(1, requires_grad=True)], None).defaults["lr"] == 0.5
    assert resolve_optimizer("torch.optim:Adagrad").build([torch.zeros(1, requires_grad=True)], 0.2)
    with pytest.raises(ValueError, match="has no attribute"):
        resolve_optimizer("torch.optim:Nope")


def test_optional_optimizers_when_installed() -> None:
    sf = pytest.importorskip("schedulefree")
    spec = resolve_optimizer("schedulefree-adamw")
    res = benchmark([ScaledQuadratic(1.0, name="q")], [spec], tune=True, seeds=1, steps=5, progress=False,
                    timing_steps=2)
    rec = res.results["tasks"][0]["results"]["schedulefree-adamw"]
    assert rec["n_seeds"] == 1 and rec["tuned"] and "schedulefree-adamw" in res.results["tasks"][0]["timing"]
    assert isinstance(spec.build([torch.zeros(1, requires_grad=True)], None), sf.AdamWScheduleFree)


class ModeTask(ScaledQuadratic):
    """Records the mode its optimizer was in whenever a loss is computed."""

    def __init__(self) -> None:
        super().__init__(1.0, name="modes")
        self.mode, self.seen = "none", []

    def loss(self, params, batch):
        self.seen.append(("train", self.mode))
        return super().loss(params, batch)

    def eval_loss(self, params):
        self.seen.append(("eval", self.mode))
        return super().loss(params, ())


def test_eval_mode_optimizers_are_evaluated_in_eval_mode() -> None:
    task = ModeTask()

    class ModalSGD(torch.optim.SGD):  # the schedule-free protocol: train() before steps, eval() to evaluate
        def train(self):
            task.mode = "train"

        def eval(self):
            task.mode = "eval"

    result = run(task, lambda p: ModalSGD(p, lr=0.1), 0, 6, 2)
    assert not result.diverged and len(task.seen) == 6 + 4
    assert all(kind == mode for kind, mode in task.seen)


def test_prodigy_when_installed() -> None:
    pytest.importorskip("prodigyopt")
    spec = resolve_optimizer("prodigy")
    assert spec.fixed_lr == 1.0 and not spec.tunable
    res = benchmark([ScaledQuadratic(1.0, name="q")], [spec], tune=True, seeds=1, steps=5, progress=False,
                    timing_steps=2)
    rec = res.results["tasks"][0]["results"]["prodigy"]
    assert rec["lr"] == 1.0 and not rec["tuned"] and "prodigy" in res.results["tasks"][0]["timing"]


def test_missing_optional_package_is_a_clear_error() -> None:
    import importlib.util

    if importlib.util.find_spec("prodigyopt") is not None:
        pytest.skip("prodigyopt is installed")
    with pytest.raises(ValueError, match="pip install prodigyopt"):
        resolve_optimizer("prodigy")


def test_tuning_grid_multipliers_do_not_warn_but_users_are_warned() -> None:
    """The benchmark builds hand-set classes at small lr multipliers on purpose (its grid): the
    low-multiplier warning, meant for a user's absolute rate, is muted there and only there."""
    import warnings

    import learned_opt

    spec = resolve_optimizer("GradNormDecaySGD[tune=true]")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec.factory(0.003, 10)([torch.zeros(2, requires_grad=True)])
    with pytest.warns(UserWarning, match="is a multiplier of the rule's own rate"):
        learned_opt.GradNormDecaySGD([torch.zeros(2, requires_grad=True)], lr=0.003)
    with pytest.warns(UserWarning, match="is a multiplier of the rule's own rate"):  # a spec's own lr
        resolve_optimizer("GradNormDecaySGD[lr=0.003]").factory(0.003, 10)([torch.zeros(2, requires_grad=True)])


def test_a_changed_handset_default_changes_the_cache_key(monkeypatch) -> None:
    """A hand-set class's key holds the hyperparameters it is built with, so cached runs made under
    an earlier default are not reused for the new one."""
    from learned_opt.rules import grad_norm_decay

    before = resolve_optimizer("GradNormDecaySGD[tune=true]").key
    monkeypatch.setitem(grad_norm_decay.RELATIVE_DEFAULTS, "threshold", 0.123)
    after = resolve_optimizer("GradNormDecaySGD[tune=true]").key
    assert before["defaults"]["threshold"] != 0.123 and after["defaults"]["threshold"] == 0.123
    assert run_key(suite="s", task={}, optimizer=before, lr=0.1, seed=0, steps=5, eval_every=1, device="cpu") != \
        run_key(suite="s", task={}, optimizer=after, lr=0.1, seed=0, steps=5, eval_every=1, device="cpu")


def test_benchmark_table_validation() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['tunes'\].*suite.toml.*|suite.toml.*tunes"):
        read_benchmark_table({"benchmark": {"tunes": True}}, "suite.toml")
    with pytest.raises(ValueError, match="steps"):
        read_benchmark_table({"benchmark": {"steps": "ten"}}, "suite.toml")
    assert read_benchmark_table({"benchmark": {"steps": "10x"}}, None)["steps"] == "10x"
    for bad in (["sgd", "adam"], [["sgd"]], [["sgd", 1]]):
        with pytest.raises(ValueError, match=r"pairs must be a list of \[candidate, baseline\]"):
            read_benchmark_table({"benchmark": {"pairs": bad}}, "suite.toml")
    for bad, why in (([["sgd", "sgd"]], "against itself"), ([["sgd", "adam"], ["sgd", "adam"]], "given twice")):
        with pytest.raises(ValueError, match=why):
            read_benchmark_table({"benchmark": {"pairs": bad}}, "suite.toml")
    assert resolve_steps(100, "10x") == 1000 and resolve_steps(100, 30) == 30 and resolve_steps(100, None) == 100


def test_timing_pass_measures_every_optimizer() -> None:
    task = ScaledQuadratic(1.0, dim=64)
    builders = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "adam": lambda p: torch.optim.Adam(p, lr=0.1)}
    out = time_optimizers(task, 0, builders, steps=3)
    assert set(out) == {"sgd", "adam"}
    assert all(v["step_ms"] > 0 and v["train_step_ms"] >= v["step_ms"] for v in out.values())
    assert out["sgd"]["state_bytes_per_param"] == 0
    assert 16 < out["adam"]["state_bytes_per_param"] <= 16 + 8 / 64  # 2 float64 moments + a scalar step


def test_cli_reports_config_errors_before_running(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from learned_opt.bench.cli import main

    assert main(["--suite", "quickstart", "--seeds", "1,2", "--out", str(tmp_path)]) == 2
    assert "not in the suite's test split" in capsys.readouterr().err
    assert main(["--suite", "quickstart", "--optimizers", "adam[lr=x]"]) == 2
    assert "lr must be a number" in capsys.readouterr().err
    assert main(["--suite", "no_such_suite"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_cli_reports_bad_flags_devices_and_missing_data_before_running(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from learned_opt.bench.cli import main

    for flag, value, message in [("--steps", "0", "argument --steps: steps must be a positive int"),
                                 ("--seeds", "x", "argument --seeds: expected a count")]:
        with pytest.raises(SystemExit) as exc:
            main(["--suite", "quickstart", flag, value])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert main(["--suite", "quickstart", "--device", "tpu", "--out", str(tmp_path)]) == 2
    assert "invalid device 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--suite", "quickstart", "--device", "cuda", "--out", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    monkeypatch.setenv("LEARNED_OPT_DATA", str(tmp_path / "no-data"))
    assert main(["--suite", "l2l_mnist", "--out", str(tmp_path), "--quiet"]) == 2
    assert "task 'mnist-mlp-20-sigmoid': cannot build it: MNIST not found" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_dispatch_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.cli import main

    assert main(["--help"]) == 0
    assert "benchmark" in capsys.readouterr().out
    assert main(["nope"]) == 2
    with pytest.raises(SystemExit):
        main(["benchmark", "--help"])
    assert "--tune" in capsys.readouterr().out


def test_validation_split_runs_on_validation_seeds_and_says_so(tmp_path):
    """Settings are chosen on validation seeds; reports use test seeds; the report names the split."""
    import learned_opt
    from learned_opt.bench.harness import BenchmarkConfigError
    from learned_opt.suites import load_suite

    suite_file = tmp_path / "s.toml"
    suite_file.write_text(
        '[suite]\nsteps = 5\nseeds = { train = [0, 10], validation = [10, 20], test = [20, 30] }\n'
        '[[suite.family]]\nlabel = "q"\nfamily = "quadratic"\n[suite.family.settings]\ndim = 3\n'
    )
    res = learned_opt.benchmark(str(suite_file), ["sgd[lr=0.01]"], seeds=2, split="validation", progress=False,
                                timing_steps=0)
    assert res.results["seeds"] == [10, 11] and res.results["split"] == "validation"
    assert "validation split" in res.report
    assert learned_opt.benchmark(load_suite(suite_file), ["sgd[lr=0.01]"], seeds=1, progress=False,
                                 timing_steps=0).results["seeds"] == [20]
    with pytest.raises(BenchmarkConfigError, match="validation split"):
        learned_opt.benchmark(str(suite_file), ["sgd[lr=0.01]"], seeds=[20], split="validation", progress=False)
    with pytest.raises(BenchmarkConfigError, match="split"):
        learned_opt.benchmark(str(suite_file), ["sgd[lr=0.01]"], seeds=1, split="train", progress=False)


def test_pairs_of_the_suites_own_optimizers_must_name_them(tmp_path):
    """A [benchmark] pair naming an optimizer the table does not run is an error before any run; with
    optimizers given by the caller, pairs outside them are left out."""
    import learned_opt
    from learned_opt.bench.harness import BenchmarkConfigError

    suite_file = tmp_path / "s.toml"
    suite_file.write_text(
        '[suite]\nsteps = 5\nseeds = { train = [0, 10], validation = [10, 20], test = [20, 30] }\n'
        '[[suite.family]]\nlabel = "q"\nfamily = "quadratic"\n[suite.family.settings]\ndim = 3\n'
        '[benchmark]\noptimizers = ["sgd[lr=0.01]"]\npairs = [["sgd[lr=0.01]", "sgdd"]]\n'
    )
    with pytest.raises(BenchmarkConfigError, match=r"pairs name \['sgdd'\]"):
        learned_opt.benchmark(str(suite_file), seeds=1, progress=False, timing_steps=0)
    res = learned_opt.benchmark(str(suite_file), ["sgd[lr=0.02]"], seeds=1, progress=False, timing_steps=0)
    assert res.results["pairs"] == [] and "Head to head" not in res.report
    # a shipped name may be paired (the ship tool benchmarks it); left out when it is not run
    suite_file.write_text(suite_file.read_text().replace('"sgdd"', '"default[horizon=true]"'))
    res = learned_opt.benchmark(str(suite_file), seeds=1, progress=False, timing_steps=0)
    assert res.results["pairs"] == []
    res = learned_opt.benchmark(str(suite_file), ["sgd[lr=0.01]", "default[horizon=true]"], seeds=1, progress=False,
                                timing_steps=0)
    assert [(p["candidate"], p["baseline"]) for p in res.results["pairs"]] == [("sgd[lr=0.01]", "default[horizon=true]")]
    suite_file.write_text(suite_file.read_text().replace('"default[horizon=true]"', '"default[horizn=true]"'))
    with pytest.raises(BenchmarkConfigError, match=r"pairs name \['default\[horizn=true\]'\]"):
        learned_opt.benchmark(str(suite_file), seeds=1, progress=False, timing_steps=0)


def test_report_counts_how_often_the_decay_branch_fired(tmp_path):
    """Issue 6 asks how often grad-norm decay fires per task: runs record the rules' end state."""
    import learned_opt

    suite_file = tmp_path / "s.toml"
    suite_file.write_text(
        '[suite]\nsteps = 20\nseeds = { train = [0, 10], validation = [10, 20], test = [20, 30] }\n'
        '[[suite.family]]\nlabel = "q"\nfamily = "quadratic"\n[suite.family.settings]\ndim = 3\n'
    )
    res = learned_opt.benchmark(str(suite_file), {"always": "GradNormDecaySGD[threshold=1e6,lr=0.01,relative=false]",
                                                  "never": "GradNormDecaySGD[threshold=1e-12,lr=0.01]"},
                                seeds=2, progress=False, timing_steps=0)
    runs = res.results["tasks"][0]["results"]
    assert [r["extra"]["state"]["decay_count"] for r in runs["always"]["runs"]] == [20.0, 20.0]
    assert [r["extra"]["state"]["decay_count"] for r in runs["never"]["runs"]] == [0.0, 0.0]
    assert "always: decay fired (steps)" in res.report
    # fired 20 times from step 1 on (both seeds): lr factor 0.9**20; never fired: factor 1
    assert "| q | 20 | 20 | 1 (2/2) | 0.122 | 0 | never (0/2) | 1 |" in res.report
    assert "| always | 0.122 | 0.122 | 0.122 | 2 | 1/1 |" in res.report  # the final factor's spread
    assert "| never | 1 | 1 | 1 | 2 | 0/1 |" in res.report
    assert "state" not in runs["adam (tuned)"]["runs"][0]["extra"]


def test_ratio_interval_resamples_seeds_in_pairs():
    from learned_opt.bench.metrics import paired_normalised, ratio_interval
    from learned_opt.bench.runner import RunResult

    def runs(finals, diverged=()):
        return [RunResult(seed=i, steps=[0, 1], losses=[2.0, f], diverged=i in diverged) for i, f in enumerate(finals)]

    # a candidate exactly half the baseline on every seed: every resample gives the same ratio
    even = paired_normalised(runs([0.2, 0.4, 0.6]), runs([0.4, 0.8, 1.2]))
    assert even == [[0.1, 0.2], [0.2, 0.4], [0.3, 0.6]]
    lo, hi = ratio_interval([even], tolerance=0.0)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    # seeds that disagree widen it around the ratio of the means, and a diverged task is left out
    noisy = paired_normalised(runs([0.1, 0.9, 0.5]), runs([0.5, 0.5, 0.5]))
    lo, hi = ratio_interval([noisy, paired_normalised(runs([0.1, 0.1], {1}), runs([0.5, 0.5]))], tolerance=0.0)
    assert lo < 0.6 and hi > 1.4  # seeds of 0.2x and 1.8x the baseline leave the verdict open
    assert ratio_interval([noisy], tolerance=0.0) == (lo, hi)  # the same seed: the same interval
    # over tasks it is a geometric mean: exact 0.5x and 2x tasks give 1, two 0.5x tasks 0.5
    double = paired_normalised(runs([0.8, 0.8]), runs([0.4, 0.4]))
    assert ratio_interval([even, double], tolerance=0.0) == pytest.approx((1.0, 1.0))
    assert ratio_interval([even, even], tolerance=0.0) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="invalid resamples"):
        ratio_interval([even], resamples=0)
    assert ratio_interval([[[math.nan, 0.5]]]) is None
    with pytest.raises(ValueError, match="invalid level"):
        ratio_interval([even], level=1.0)
    with pytest.raises(ValueError, match="the same seeds"):
        paired_normalised(runs([0.1]), runs([0.1, 0.2]))


def test_paired_seed_wins_apply_the_verdict_per_seed():
    from learned_opt.bench.metrics import paired_seed_wins
    from learned_opt.bench.runner import RunResult

    def run(final, diverged=False):
        return RunResult(seed=0, steps=[0, 1], losses=[1.0, final], diverged=diverged)

    cand = [run(0.5), run(0.30005), run(0.1, diverged=True), run(0.9)]
    base = [run(0.6), run(0.3), run(0.05), run(0.2, diverged=True)]
    assert paired_seed_wins(cand, base) == 3  # within the tolerance wins; a diverged candidate loses
    with pytest.raises(ValueError, match="the same seeds"):
        paired_seed_wins(cand, base[:2])
    with pytest.raises(ValueError, match="the same seeds"):
        paired_seed_wins([run(0.5)], [RunResult(seed=1, steps=[0, 1], losses=[1.0, 0.5])])
