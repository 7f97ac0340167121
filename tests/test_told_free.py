"""The ``told_free`` form of the learned relative rule: told runs keep the untold form and the
horizon reaches only the controller's inputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from learned_opt.optim import LearnedOptimizer
from learned_opt.rules.controller import FEATURES
from learned_opt.rules.relative import LearnedRelativeAdamRule

PROGRESS, KNOWN = FEATURES.index("t / T (0 when T is unknown)"), FEATURES.index("1 when T is known, else 0")


def _rule(told_free: bool, horizon_rows: float) -> LearnedRelativeAdamRule:
    """A schedule-free rule with an anchor and a controller that acts, its horizon rows set to ``horizon_rows``."""
    rule = LearnedRelativeAdamRule(hidden=0, schedule_free=True, init_anchor=0.5, init_travel_gain=1.0,
                                   told_free=told_free)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        rule.ctrl.ws.copy_(0.5 * torch.randn(rule.ctrl.ws.shape, generator=g))
        rule.ctrl.ws[[PROGRESS, KNOWN]] = horizon_rows
    return rule


def _train(rule: LearnedRelativeAdamRule, total_steps: int | None, steps: int = 12) -> tuple[list, list]:
    """Parameters while training and at the evaluation point after ``steps`` steps on a fixed quadratic."""
    g = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(6, 3, generator=g))
    b = torch.nn.Parameter(torch.zeros(3))
    target = torch.randn(6, 3, generator=g)
    opt = LearnedOptimizer([w, b], rule, total_steps=total_steps)
    for _ in range(steps):
        opt.zero_grad()
        ((w - target).pow(2).sum() + (b - 1).pow(2).sum()).backward()
        opt.step()
    trained = [w.detach().clone(), b.detach().clone()]
    opt.eval()
    return trained, [w.detach().clone(), b.detach().clone()]


def test_told_free_run_is_the_untold_run_when_the_controller_ignores_the_horizon():
    """No cosine, the anchor kept, evaluated at the average: with its horizon rows at zero, a told
    run of a ``told_free`` rule is its untold run, step for step (past the horizon too)."""
    rule = _rule(told_free=True, horizon_rows=0.0)
    untold = _train(rule, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no past-horizon warning: nothing ends at the horizon
        told = _train(rule, 5)
    for a, b in zip(untold[0] + untold[1], told[0] + told[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(untold[0][0], untold[1][0])  # the evaluation point is the average, not y


def test_told_free_horizon_acts_through_the_controller_only():
    """With nonzero horizon rows the told run differs from the untold one; without ``told_free`` the
    same θ's told run takes the cosine and evaluates where it trains."""
    told = _train(_rule(told_free=True, horizon_rows=0.5), 12)
    assert not torch.allclose(_train(_rule(told_free=True, horizon_rows=0.0), 12)[1][0], told[1][0])
    cosine = _train(_rule(told_free=False, horizon_rows=0.5), 12)
    torch.testing.assert_close(cosine[0][0], cosine[1][0], rtol=0, atol=0)  # told: evaluated at y
    assert not torch.allclose(cosine[1][0], told[1][0])


def test_told_free_is_kept_in_the_config_and_validated():
    rule = _rule(told_free=True, horizon_rows=0.0)
    assert rule.config()["told_free"] is True
    assert "told_free" not in LearnedRelativeAdamRule(hidden=0).config()  # older cards read the same
    assert LearnedRelativeAdamRule(**rule.config()).told_free
    with pytest.raises(ValueError, match="told_free"):
        LearnedRelativeAdamRule(told_free="yes")
