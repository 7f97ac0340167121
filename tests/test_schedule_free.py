"""The schedule-free form of the relative rules: the z/x/y recursion, eval()/train(), the batched engine."""

from __future__ import annotations

import math

import pytest
import torch

import learned_opt
from learned_opt.bench.runner import run
from learned_opt.meta.es import stack_members
from learned_opt.meta.population import run_population
from learned_opt.optim import LearnedOptimizer
from learned_opt.rules.relative import LearnedRelativeAdamRule, RelativeAdamRule, schedule
from learned_opt.rules.transforms import apply_update
from learned_opt.tasks.families import MLPClassificationFamily


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=g)), torch.nn.Parameter(torch.zeros(3))]


def _grads(steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(4, 3, generator=g), torch.randn(3, generator=g)] for _ in range(steps)]


def _reference(params, grads, alpha, beta1=0.9, beta2=0.999, eps=1e-8, floor=1e-3, warmup=0.05):
    """Defazio et al.'s schedule-free recursion written out, with the relative step on z: y (trained at), x."""
    z = [p.detach().clone().double() for p in params]
    x = [t.clone() for t in z]
    v = [torch.zeros_like(t) for t in z]
    total = 0.0
    for t, gs in enumerate(grads, start=1):
        s = float(schedule(torch.tensor(float(t)), torch.tensor(0.0), warmup))
        total += s**2
        c = s**2 / total
        for i, g in enumerate(gs):
            g = g.double()
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            u = g / ((v[i] / (1 - beta2**t)).sqrt() + eps)
            rms = lambda a: a.pow(2).mean().sqrt()  # noqa: E731
            z[i] = z[i] - alpha * s * (rms(z[i]) + floor) / rms(u) * u
            x[i] = (1 - c) * x[i] + c * z[i]
    y = [(1 - beta1) * zi + beta1 * xi for zi, xi in zip(z, x)]
    return y, x


def test_step_is_the_schedule_free_recursion_and_eval_gives_the_average():
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = learned_opt.RelativeAdam(params, alpha=0.1, schedule_free=True)
    grads = _grads(15)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    y, x = _reference(start, grads, 0.1)
    for p, want in zip(params, y):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
    opt.eval()
    assert opt.evaluating
    for p, want in zip(params, x):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
    opt.train()
    for p, want in zip(params, y):
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_step_in_eval_mode_is_refused_and_eval_train_are_idempotent():
    params = _params()
    opt = learned_opt.RelativeAdam(params, alpha=0.1, schedule_free=True)
    opt.eval()  # before any step: nothing to move
    opt.train()
    for gs in _grads(3):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    opt.eval()
    at_x = [p.detach().clone() for p in params]
    opt.eval()
    assert all(torch.equal(p.detach(), a) for p, a in zip(params, at_x))
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step()
    opt.train()
    opt.train()
    opt.step()


def test_untold_default_is_the_schedule_free_rule_with_its_eval_point():
    params = _params()
    opt = learned_opt.load_optimizer("default", params)
    assert opt.rule.schedule_free and opt.card["name"] == "default-travel"
    for p, g in zip(params, _grads(1)[0]):
        p.grad = g.clone()
    opt.step()
    before = [p.detach().clone() for p in params]
    opt.eval()
    assert opt.evaluating and not all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    opt.train()
    assert all(torch.allclose(p.detach(), b) for p, b in zip(params, before))


def test_other_rules_eval_is_a_no_op():
    params = _params()
    for opt in (learned_opt.RelativeAdam(params), learned_opt.load_optimizer("default", params, total_steps=100),
                learned_opt.LSTMOptimizer(params)):
        for p, g in zip(params, _grads(1)[0]):
            p.grad = g.clone()
        opt.step()
        before = [p.detach().clone() for p in params]
        opt.eval()
        assert not opt.evaluating and all(torch.equal(p.detach(), b) for p, b in zip(params, before))
        opt.step()


def test_told_runs_are_evaluated_where_they_train():
    params = _params()
    opt = learned_opt.RelativeAdam(params, alpha=0.1, schedule_free=True, total_steps=10, final=0.15)
    for gs in _grads(4):
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    before = [p.detach().clone() for p in params]
    opt.eval()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    opt.train()


def test_state_dict_keeps_the_mode_and_resumes_bitwise():
    grads = _grads(8)

    def train(params, opt, gs):
        for step in gs:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()

    a = _params()
    oa = learned_opt.RelativeAdam(a, alpha=0.1, schedule_free=True)
    train(a, oa, grads)
    b = _params()
    ob = learned_opt.RelativeAdam(b, alpha=0.1, schedule_free=True)
    train(b, ob, grads[:4])
    ob.eval()
    saved_params, saved = [p.detach().clone() for p in b], ob.state_dict()
    assert saved["learned_opt"]["evaluating"] is True
    c = [torch.nn.Parameter(t.clone()) for t in saved_params]
    oc = learned_opt.RelativeAdam(c, alpha=0.1, schedule_free=True)
    oc.load_state_dict(saved)
    assert oc.evaluating
    oc.train()
    train(c, oc, grads[4:])
    for p, q in zip(a, c):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", [RelativeAdamRule(schedule_free=True), LearnedRelativeAdamRule(schedule_free=True)],
                         ids=["hand", "learned"])
@pytest.mark.parametrize("total_steps", [None, 50])
def test_lr_is_a_multiplier(rule, total_steps):
    params = [p.detach() for p in _params()]
    grads = _grads(1)[0]

    def first_update(lr):
        hparams = {**rule.hyperparameters, "lr": lr, "total_steps": total_steps}
        return rule.update(grads, params, rule.init_state(params), hparams)[0]

    for full, half in zip(first_update(1.0), first_update(0.5)):
        assert full.abs().sum() > 0
        torch.testing.assert_close(half, 0.5 * full, rtol=1e-6, atol=0.0)


def test_state_is_v_z_and_the_weight_sum_and_cards_keep_the_form(tmp_path):
    rule = LearnedRelativeAdamRule(hidden=0, schedule_free=True)
    _, (st, _) = rule.init_state([torch.zeros(4, 3), torch.zeros(3)])
    assert sorted(st) == ["controller", "exp_avg_sq", "p0", "sf_weight", "z"]
    assert rule.config()["schedule_free"] is True
    assert "schedule_free" not in LearnedRelativeAdamRule(hidden=0).config()
    with pytest.raises(ValueError, match="schedule_free"):
        RelativeAdamRule(schedule_free=1)


@pytest.mark.parametrize("extra", [{}, {"init_travel_gain": 4.0}])
def test_population_run_evaluates_where_the_optimizer_does(extra):
    """The batched engine's final loss is the optimizer's after eval(): the average when not told
    (with the travel input too)."""
    family = MLPClassificationFamily(dataset="blobs", dim=4, classes=3, width=8, depth=2, activation="relu",
                                     n_train=64, batch_size=16)
    task = family.sample(3)
    rule = LearnedRelativeAdamRule(hidden=0, schedule_free=True, init_alpha=0.1, **extra)
    base = torch.nn.utils.parameters_to_vector(rule.parameters()).detach()
    thetas = torch.stack([base, base + 0.3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(1))])
    horizons = torch.tensor([30.0, 0.0])

    def update(member, grads, params, state, *, checked=False):
        result = apply_update(rule.with_theta(member[0]), grads, params, state,
                              {"lr": 1.0, "total_steps": member[1]}, checked=checked)
        return result.updates, result.state

    result = run_population(task, 7, 30, (stack_members(rule, thetas), horizons), 2, update, rule.init_state,
                            eval_point=lambda m, p, st: rule.eval_point(p, st, {"total_steps": m[1]}))
    plain = run_population(task, 7, 30, (stack_members(rule, thetas), horizons), 2, update, rule.init_state)
    for i, total in enumerate((30, None)):
        member = LearnedRelativeAdamRule(hidden=0, schedule_free=True, init_alpha=0.1, **extra)
        torch.nn.utils.vector_to_parameters(thetas[i].clone(), member.parameters())
        single = run(task, lambda ps: LearnedOptimizer(ps, member, total_steps=total), 7, 30, 30)
        assert single.losses[-1] == pytest.approx(float(result.final_losses[i]), rel=1e-4)
    assert float(plain.final_losses[0]) == pytest.approx(float(result.final_losses[0]), rel=1e-6)  # told: at y
    assert not math.isclose(float(plain.final_losses[1]), float(result.final_losses[1]), rel_tol=1e-4)
