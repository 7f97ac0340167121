"""The meta-training throughput benchmark, and the fused path's meta-gradients against the plain loop's."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from learned_opt.bench import meta_speed
from learned_opt.meta.estimators import TruncatedBPTT
from learned_opt.meta.losses import MetaLoss
from learned_opt.meta.unroll import InnerRun
from learned_opt.rules.lstm import LSTMRule
from learned_opt.suites import load_suite
from learned_opt.tasks import make_family


def test_fused_and_plain_paths_give_the_same_meta_gradient() -> None:
    """Two truncations of first-order BPTT on an MLP task: same meta-loss and θ-gradient either way."""
    task = make_family("mlp_classification", {"dataset": "blobs", "width": 8, "depth": 1, "activation": "sigmoid",
                                                "batch_size": 16}).sample(3)
    results = {}
    for fused in (True, False):
        torch.manual_seed(0)
        rule = LSTMRule(chunk_size=50, fused_training=fused)
        run = InnerRun.start(rule, task, label="t", seed=3, horizon=20)
        estimates = [TruncatedBPTT().estimate(rule, run, 10, MetaLoss("mean"), torch.Generator()) for _ in range(2)]
        results[fused] = (estimates, copy.deepcopy(run.params))
    (fused_est, fused_params), (plain_est, plain_params) = results[True], results[False]
    for a, b in zip(fused_est, plain_est):
        torch.testing.assert_close(a.meta_loss, b.meta_loss, rtol=1e-5, atol=1e-6)
        for ga, gb in zip(a.grads, b.grads):
            torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-6)
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in fused_est[0].grads)


def test_measure_reports_both_paths_and_the_bound() -> None:
    suite = load_suite("l2l_quadratic")
    row = meta_speed.measure_meta_throughput(suite, tasks=2, unroll=3, repeats=2, warmup=0)
    for key in ("fused_steps_per_s", "plain_steps_per_s", "bound_steps_per_s", "matmul_gflops"):
        assert row[key] > 0
    assert row["fused_over_plain"] == pytest.approx(row["fused_steps_per_s"] / row["plain_steps_per_s"])
    assert row["fused_fraction_of_bound"] == pytest.approx(row["fused_steps_per_s"] / row["bound_steps_per_s"])
    # 10 coordinates in one chunk, 2 layers: 3 matmuls of 2·N·k·4H each, k = 1 + inputs + H.
    assert row["flops_per_step"] == 3 * 2 * 10 * 4 * 20 * ((1 + 2 + 20) + (1 + 20 + 20))


def test_each_path_is_timed_on_a_rule_whose_config_selects_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path is the rule's config (no attribute flipped): each path runs on its own rule with
    the caller's θ, and the caller's rule is left as it was."""
    seen = []
    estimate = TruncatedBPTT.estimate
    monkeypatch.setattr(TruncatedBPTT, "estimate",
                        lambda self, rule, *a: seen.append((rule.fused_training, rule.state_dict())) or estimate(self, rule, *a))
    rule = LSTMRule(hidden_size=4, num_layers=1)
    meta_speed.measure_meta_throughput(load_suite("l2l_quadratic"), rule=rule, tasks=1, unroll=2, repeats=1, warmup=0)
    assert [fused for fused, _ in seen] == [True, False]
    for _, state in seen:
        assert all(torch.equal(state[k], v) for k, v in rule.state_dict().items())
    assert rule.fused_training is True


def test_gate_matmul_flops_follow_the_chunk_plan() -> None:
    rule = LSTMRule(num_layers=1, hidden_size=4, chunk_size=100)
    _, flops = meta_speed.meta_gate_matmuls(rule, [torch.Size([250]), torch.Size([7])], tasks=2)
    coordinates = 2 * (250 + 7)  # chunks of 100, 100, 50 and 7, twice
    assert flops == 3 * 2 * coordinates * (1 + 2 + 4) * 4 * 4


@pytest.mark.parametrize("bad", [{"tasks": 0}, {"unroll": 0}, {"repeats": 0}, {"warmup": -1}, {"paths": ["slow"]}])
def test_bad_settings_raise_value_error(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        meta_speed.measure_meta_throughput("l2l_quadratic", **bad)


def test_cli_writes_table_and_json(tmp_path: Path, capsys) -> None:
    code = meta_speed.main(["--suite", "l2l_quadratic", "--tasks", "1", "--unroll", "2", "--repeats", "1",
                            "--warmup", "0", "--paths", "fused", "--out", str(tmp_path)], prog="bench_meta_speed.py")
    assert code == 0
    row = json.loads((tmp_path / "meta_speed.json").read_text())
    assert "plain_steps_per_s" not in row and row["fused_steps_per_s"] > 0
    text = (tmp_path / "meta_speed.md").read_text()
    assert "| fused |" in text and "bench_meta_speed.py --suite l2l_quadratic" in text
    assert "| fused |" in capsys.readouterr().out
