"""tools/user_trial.py: a user's loop on sklearn's digits, judged on held-out data."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("sklearn")

from tools.user_trial import main, make_optimizer, trial  # noqa: E402


def test_trial_reports_held_out_figures_per_optimizer_and_seed() -> None:
    rows = trial(["adamw", "default[horizon=true,weight_decay=0.001]"], steps=5, seeds=[0, 1])
    assert [(r["optimizer"], r["seed"]) for r in rows] == [("adamw", 0), ("adamw", 1), ("default[horizon=true,weight_decay=0.001]", 0),
                                                            ("default[horizon=true,weight_decay=0.001]", 1)]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("train_loss", "test_loss", "weight_norm"))
        assert 0.0 <= r["test_accuracy"] <= 1.0
    assert rows[0] != rows[1]  # seeds differ


def test_specs_pass_the_horizon_and_weight_decay() -> None:
    import torch

    p = [torch.nn.Parameter(torch.ones(3))]
    opt = make_optimizer("default[horizon=true,weight_decay=0.01]", p, steps=7)
    assert opt.param_groups[0]["total_steps"] == 7 and opt.param_groups[0]["weight_decay"] == 0.01
    assert make_optimizer("default", p, steps=7).param_groups[0]["total_steps"] is None
    assert main(["--steps", "1", "--seeds", "1", "no-such-name"]) == 2
