"""The learned start of the told decay (``init_decay_start``: warm-up, stable, then the cosine)."""

import pytest
import torch

from learned_opt.adapter import LearnedOptimizer
from learned_opt.rules.horizon import schedule
from learned_opt.rules.relative import LearnedRelativeAdamRule
from learned_opt.weights import copy_weights, save_weights


def test_decay_start_holds_the_peak_then_decays_over_the_rest():
    steps = torch.arange(1, 101, dtype=torch.float32)
    plain = schedule(steps, torch.tensor(100.0), 0.1, 0.2)
    late = schedule(steps, torch.tensor(100.0), 0.1, 0.2, torch.tensor(0.5))
    torch.testing.assert_close(late[:10], plain[:10])  # the same warm-up
    assert torch.all(late[9:55] == 1.0)  # stable until half of the 90 steps after the warm-up
    assert float(late[-1]) == pytest.approx(0.2) and torch.all(late[55:].diff() <= 1e-7)
    assert torch.all(late >= plain - 1e-7)
    # the cosine over the last half is the whole cosine compressed into it
    torch.testing.assert_close(late[54::2], plain[9::4][: late[54::2].numel()], rtol=0, atol=0.03)
    torch.testing.assert_close(schedule(steps, torch.tensor(100.0), 0.1, 0.2, 0.0), plain)
    untold = schedule(steps, torch.tensor(0.0), 0.05, 0.2, torch.tensor(0.5))
    torch.testing.assert_close(untold, schedule(steps, torch.tensor(0.0), 0.05))  # no horizon: no decay


def _told_losses(rule: LearnedRelativeAdamRule, total: int | None) -> list[float]:
    g = torch.Generator().manual_seed(0)
    a, target = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
    w = torch.zeros(8, requires_grad=True)
    opt = LearnedOptimizer([w], rule, total_steps=total)
    out = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((a @ w - target) ** 2).mean()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def test_decay_start_is_a_meta_parameter_of_told_runs_only():
    rule = LearnedRelativeAdamRule(hidden=0, init_final=0.1, init_decay_start=0.3)
    plain = LearnedRelativeAdamRule(hidden=0, init_final=0.1)
    assert rule.config()["init_decay_start"] == pytest.approx(0.3) and "init_decay_start" not in plain.config()
    assert LearnedRelativeAdamRule(**rule.config()).config() == pytest.approx(rule.config())
    assert "logit_decay_start" in rule.theta() and "logit_decay_start" not in plain.theta()
    assert _told_losses(rule, None) == _told_losses(plain, None)  # untold: bitwise the rule without it
    late, early = _told_losses(rule, 20), _told_losses(plain, 20)
    assert late[0] == early[0] and late != early  # told: the same first (warm-up) step, then a later decay
    with pytest.raises(ValueError, match="init_decay_start"):
        LearnedRelativeAdamRule(init_decay_start=1.0)


def test_weights_without_the_decay_start_warm_start_a_rule_with_it(tmp_path):
    source = LearnedRelativeAdamRule(hidden=0, init_final=0.1)
    with torch.no_grad():
        source.log_alpha.fill_(-2.0)
    path = save_weights(source, tmp_path / "w", name="w", meta_training={})
    target = LearnedRelativeAdamRule(hidden=0, init_final=0.1, init_decay_start=0.3)
    copy_weights(target, path)
    assert target.log_alpha.item() == -2.0
    assert torch.sigmoid(target.logit_decay_start).item() == pytest.approx(0.3)
