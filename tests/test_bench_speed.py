"""The step-cost benchmark (scripts/bench_speed.py): end to end on the smallest size, and its parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learned_opt.bench import speed
from learned_opt.bench.timing import state_bytes
from learned_opt.optim import HypergradientAdam, LSTMOptimizer
from learned_opt.rules.lstm import LSTMRule

ROOT = Path(__file__).resolve().parents[1]


def test_script_runs_end_to_end_on_the_smallest_size(tmp_path: Path, capsys) -> None:
    code = speed.main(
        ["--sizes", "10k", "--repeats", "1", "--warmup", "0", "--optimizers", "lstm", "--out", str(tmp_path)],
        prog="bench_speed.py",
    )
    assert code == 0
    report = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["optimizer"]: r for r in report["rows"]}
    assert list(rows) == ["adam", "lstm"]  # the baseline is always measured, first
    assert rows["adam"]["ratio_vs_adam"] == 1.0
    for r in rows.values():
        assert abs(r["params"] - 10_000) < 200 and r["step_s"] > 0 and r["peak_rss_bytes"] >= r["model_rss_bytes"] > 0
    assert rows["adam"]["state_bytes_per_param"] == pytest.approx(8.0, rel=0.01)
    lstm = rows["lstm"]
    assert lstm["state_bytes_per_param"] == pytest.approx(320.0, rel=0.01)
    assert lstm["chunk_size"] == LSTMRule().chunk_size
    assert lstm["efficiency"] == pytest.approx(lstm["gate_matmul_s"] / lstm["lstm_step_s"])
    assert 0 < lstm["step_min_s"] <= lstm["step_s"]
    table = (tmp_path / "speed.md").read_text()
    assert "| lstm |" in table and "bench_speed.py --sizes 10k" in table
    assert "| lstm |" in capsys.readouterr().out


def test_help_explains_the_measurements() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_speed.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for words in ("Adam(foreach=True)", "gate matmuls", "fresh subprocess", "--sizes", "peak resident memory"):
        assert words in " ".join(out.split())


@pytest.mark.parametrize(("text", "value"), [("10k", 10_000), ("1M", 1_000_000), ("2.5M", 2_500_000), ("250000", 250_000)])
def test_parse_size(text: str, value: int) -> None:
    assert speed.parse_size(text) == value


@pytest.mark.parametrize("text", ["ten", "1G", "5", "-3k"])
def test_parse_size_rejects_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        speed.parse_size(text)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="repeats"):
        speed.run_speed_benchmark(["10k"], repeats=0)
    spec = speed.SpeedSpec("x", HypergradientAdam)
    with pytest.raises(ValueError, match="unique"):
        speed.run_speed_benchmark(["10k"], [spec, spec])


@pytest.mark.parametrize("target", [10_000, 100_000, 1_000_000, 10_000_000])
def test_mlp_sizes_are_close_to_the_target(target: int) -> None:
    b = speed.IN_FEATURES + speed.CLASSES + 2
    width = round((-b + (b * b + 4 * (target - speed.CLASSES)) ** 0.5) / 2)
    params = width * width + b * width + speed.CLASSES  # what mlp_for builds, without allocating 10M
    assert abs(params - target) / target < 0.01
    if target <= 100_000:
        assert sum(p.numel() for p in speed.mlp_for(target).parameters()) == params


def test_state_bytes_counts_shared_group_state_once() -> None:
    params = [torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(5))]
    opt = LSTMOptimizer(params, weights=LSTMRule(num_layers=1, hidden_size=2))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    # h, c: 15 coords x 1 x 2 floats each; ref_h, ref_c: 2 floats each; nonfinite_skips: one scalar
    assert state_bytes(opt) == (2 * 15 * 2 + 2 * 2 + 1) * 4
    opt.state[params[0]]["extra"] = {"nested": [torch.zeros(3)]}  # nested containers are walked
    assert state_bytes(opt) == (2 * 15 * 2 + 2 * 2 + 1 + 3) * 4


def test_gate_matmul_flops_follow_the_formula() -> None:
    rule = LSTMRule(num_layers=2, hidden_size=20, chunk_size=1000)
    run, flops = speed.gate_matmuls(rule, 2500)
    run()
    # per chunk and layer 2·N·(inputs + H)·4H, chunks of 1000, 1000, 500
    assert flops == sum(2 * n * k * 80 for n in (1000, 1000, 500) for k in (22, 40))


def test_optimizer_specs_are_picklable_for_subprocesses() -> None:
    import pickle

    for spec in speed.default_optimizers():
        clone = pickle.loads(pickle.dumps(spec))
        assert clone.name == spec.name and isinstance(clone.factory([torch.nn.Parameter(torch.zeros(2))]), torch.optim.Optimizer)
