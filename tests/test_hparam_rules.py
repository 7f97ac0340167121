"""Hyperparameter rules against hand-computed trajectories, the paper, and torch's own optimizers."""

from __future__ import annotations

import math

import pytest
import torch

from learned_opt.optim import GradNormDecaySGD, HypergradientAdam, HypergradientSGD, LearnedOptimizer
from learned_opt.rules import (
    GradNormDecayRule,
    HypergradientAdamRule,
    HypergradientSGDRule,
    LearnableAdamRule,
    LearnableSGDRule,
)


def _quadratic_run(opt_factory, steps: int, scale: torch.Tensor, x0: torch.Tensor) -> tuple[list[float], object]:
    """Minimise 0.5 * sum(scale * x^2); returns the x trajectory (first coordinate) and the optimizer."""
    x = torch.nn.Parameter(x0.clone())
    opt = opt_factory([x])
    traj = []
    for _ in range(steps):
        x.grad = scale * x.detach()
        opt.step()
        traj.append(x.detach().clone())
    return traj, opt


def test_grad_norm_decay_hand_computed_trajectory() -> None:
    # 1-D, loss x^2/2 so g = x. lr=0.5, threshold=0.3, decay=0.5, no momentum.
    # step 1: g=1 (no decay, f=1)       x = 1 - 0.5*1*1       = 0.5
    # step 2: g=0.5 (no decay)          x = 0.5 - 0.5*0.5     = 0.25
    # step 3: g=0.25 < 0.3: f=0.5       x = 0.25 - 0.25*0.25  = 0.1875
    # step 4: g=0.1875: f=0.25          x = 0.1875*(1-0.125)  = 0.1640625
    want = [0.5, 0.25, 0.1875, 0.1640625]
    traj, opt = _quadratic_run(
        lambda p: GradNormDecaySGD(p, init_lr=0.5, decay=0.5, threshold=0.3, relative=False), 4, torch.ones(1), torch.ones(1, dtype=torch.float64)
    )
    assert [float(t) for t in traj] == pytest.approx(want, abs=1e-15)
    st = opt.group_state(0)
    assert float(st["lr_factor"]) == 0.25 and float(st["decay_count"]) == 2


def test_grad_norm_decay_uses_the_group_norm() -> None:
    # per-coordinate |g| = 0.2 < 0.3 but the group norm sqrt(4 * 0.04) = 0.4 is not: no decay
    _, opt = _quadratic_run(
        lambda p: GradNormDecaySGD(p, lr=0.0, threshold=0.3, relative=False), 1, torch.ones(4), torch.full((4,), 0.2)
    )
    assert float(opt.group_state(0)["decay_count"]) == 0


def test_grad_norm_decay_soft_tends_to_exact() -> None:
    grads = [torch.tensor([0.001, 0.002]), torch.tensor([0.2]), torch.tensor([0.0005])]
    p = [torch.zeros(2)]
    for soft_temp, tol in ((0.01, 1e-6), (1.0, None)):
        exact, soft = GradNormDecayRule(), GradNormDecayRule(soft=True, temperature=soft_temp)
        hp = {"init_lr": 0.1, "decay": 0.5, "threshold": 0.01, "momentum": 0.0}
        s_exact, s_soft = exact.init_state(p), soft.init_state(p)
        for g in grads:
            g = g[:2] if g.numel() >= 2 else g.repeat(2)
            _, s_exact = exact.update([g], p, s_exact, hp)
            _, s_soft = soft.update([g], p, s_soft, hp)
        diff = abs(float(s_exact[0]["lr_factor"]) - float(s_soft[0]["lr_factor"]))
        if tol is not None:
            assert diff < tol
        else:
            assert diff > 1e-3  # a warm switch is visibly smooth


def test_grad_norm_decay_soft_is_differentiable_in_theta() -> None:
    rule = GradNormDecayRule(soft=True, init_threshold=0.05)
    x = torch.tensor([0.1, -0.03])
    state = rule.init_state([x])
    for _ in range(5):
        updates, state = rule.update([x], [x], state, rule.meta_hparams())
        x = x + updates[0]
    loss = (x**2).sum()
    grads = torch.autograd.grad(loss, [rule.log_lr, rule.logit_decay, rule.log_threshold])
    assert all(g.abs() > 0 for g in grads)


def test_hypergradient_sgd_worked_example() -> None:
    # f(x) = x^2/2 in 1-D, alpha0 = 0.1, beta = 0.01, x0 = 1 (Baydin et al. 2018, Alg. SGD-HD):
    # t=1: g=1, h=g*0=0 -> alpha=0.1;                      x = 1 - 0.1*1       = 0.9
    # t=2: g=0.9, h=0.9*1=0.9 -> alpha=0.1+0.009=0.109;    x = 0.9 - 0.109*0.9 = 0.8019
    # t=3: g=0.8019, h=0.8019*0.9=0.72171 -> alpha=0.1162171; x = 0.8019*(1-0.1162171)
    a2 = 0.1 + 0.01 * 0.9
    x2 = 0.9 - a2 * 0.9
    a3 = a2 + 0.01 * x2 * 0.9
    x3 = x2 - a3 * x2
    traj, opt = _quadratic_run(
        lambda p: HypergradientSGD(p, init_lr=0.1, hyper_lr=0.01, normalized=False), 3, torch.ones(1), torch.ones(1, dtype=torch.float64)
    )
    assert [float(t) for t in traj] == pytest.approx([0.9, x2, x3], abs=1e-14)
    assert float(opt.state[opt.param_groups[0]["params"][0]]["lr_factor"]) * 0.1 == pytest.approx(a3, abs=1e-14)


def test_hypergradient_adam_worked_example() -> None:
    # Adam-HD: alpha_t = alpha_{t-1} + beta g_t . u_{t-1}, u = mhat / (sqrt(vhat) + eps)
    b1, b2, eps, alpha, beta = 0.9, 0.999, 1e-8, 0.01, 1e-3
    x, m, v, u_prev = 1.0, 0.0, 0.0, 0.0
    want = []
    for t in range(1, 5):
        g = 3.0 * x
        alpha = max(0.0, alpha + beta * g * u_prev)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (math.sqrt(v) / math.sqrt(1 - b2**t) + eps)
        x = x - alpha * u
        u_prev = u
        want.append(x)
    traj, _ = _quadratic_run(
        lambda p: HypergradientAdam(p, init_lr=0.01, hyper_lr=beta, normalized=False), 4, torch.full((1,), 3.0), torch.ones(1, dtype=torch.float64)
    )
    assert [float(t) for t in traj] == pytest.approx(want, rel=1e-12)


def test_hypergradient_rate_never_negative() -> None:
    # x^2/2 from x=1 with lr=1.5 overshoots to -0.5; then h = -0.5 and 1.5 + 10 * (-0.5) < 0 -> clamped to 0
    x = torch.nn.Parameter(torch.ones(1))
    opt = HypergradientSGD([x], init_lr=1.5, hyper_lr=10.0, normalized=False)
    factors, xs = [], []
    for _ in range(4):
        x.grad = x.detach().clone()
        opt.step()
        factors.append(float(opt.state[x]["lr_factor"]))
        xs.append(float(x.detach()))
    assert factors[1] == 0.0 and min(factors) >= 0.0
    assert xs[:2] == [-0.5, -0.5]  # a zero rate holds still (an unclamped one would ascend)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda p: HypergradientSGD(p, init_lr=0.05, hyper_lr=0.0, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        (lambda p: HypergradientAdam(p, init_lr=0.05, hyper_lr=0.0, betas=(0.8, 0.99)),
         lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99))),
        (lambda p: LearnedOptimizer(p, LearnableAdamRule(), init_lr=0.05, betas=(0.8, 0.99), eps=1e-6),
         lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.99), eps=1e-6)),
        (lambda p: LearnedOptimizer(p, LearnableSGDRule(), init_lr=0.05, momentum=0.7), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.7)),
        (lambda p: GradNormDecaySGD(p, init_lr=0.05, threshold=0.0, momentum=0.5), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5)),
    ],
    ids=["sgd-hd-beta0", "adam-hd-beta0", "learnable-adam", "learnable-sgd", "gnd-never-fires"],
)
def test_reduces_to_torch_optimizer(ours, theirs) -> None:
    scale = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    x0 = torch.linspace(-1, 1, 6, dtype=torch.float64)
    a, _ = _quadratic_run(ours, 15, scale, x0)
    b, _ = _quadratic_run(theirs, 15, scale, x0)
    torch.testing.assert_close(a[-1], b[-1], rtol=1e-10, atol=1e-12)


def test_scheduler_fades_the_adapted_factor() -> None:
    """When a schedule lowers lr by a ratio r, the factor is first raised to r: f_t = f_{t-1}^r + β g·u / rate."""
    x = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = HypergradientSGD([x], init_lr=0.1, hyper_lr=0.01, normalized=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    factor, prev = 1.0, 0.0
    for _ in range(4):
        x.grad = x.detach().clone()
        lr, before = opt.param_groups[0]["lr"], x.detach().clone()
        opt.step()
        sched.step()
        factor = factor ** min(1.0, lr / prev if prev else 1.0) + 0.01 * float(before) * prev_dir / (lr * 0.1) \
            if prev else 1.0
        prev, prev_dir = lr, float(before)
        assert float(opt.state[x]["lr_factor"]) == pytest.approx(factor, rel=1e-12)
        torch.testing.assert_close(x.detach(), before - lr * 0.1 * factor * before)


@pytest.mark.parametrize("rule_cls", [HypergradientSGDRule, HypergradientAdamRule, LearnableAdamRule, LearnableSGDRule])
def test_meta_hparams_differentiable(rule_cls) -> None:
    rule = rule_cls()
    x = torch.tensor([1.0, -2.0])
    state = rule.init_state([x])
    for _ in range(4):
        updates, state = rule.update([2 * x], [x], state, rule.meta_hparams())
        x = x + updates[0]
    (x**2).sum().backward()
    assert rule.log_lr.grad is not None and rule.log_lr.grad.abs() > 0


def test_bad_rule_config() -> None:
    with pytest.raises(ValueError, match="init_lr"):
        GradNormDecayRule(init_lr=0.0)
    with pytest.raises(ValueError, match="init_decay"):
        GradNormDecayRule(init_decay=1.0)
    with pytest.raises(ValueError, match="temperature"):
        GradNormDecayRule(temperature=0.0)
    with pytest.raises(ValueError, match="betas"):
        LearnableAdamRule(init_betas=(0.9, 1.2))


def test_adam_direction_meta_gradient_is_finite_for_always_zero_gradients():
    """A coordinate whose gradient is always 0 keeps v = 0; sqrt's inf derivative there must not
    turn the meta-gradient into NaN (it did, skipping ~40% of learnable-Adam meta-updates)."""
    from learned_opt.rules.directions import adam_direction, group_norm

    beta2 = torch.tensor(0.999, requires_grad=True)
    g = torch.tensor([0.0, 0.5])
    m, v = torch.zeros(2), torch.zeros(2)
    direction, m, v = adam_direction(g, m, v, torch.tensor(1.0), (0.9, beta2), 1e-8)
    assert direction[0] == 0 and torch.allclose(direction[1].detach(), torch.tensor(1.0))
    direction.sum().backward()
    assert torch.isfinite(beta2.grad)
    w = torch.zeros(3, requires_grad=True)
    group_norm([w]).backward()
    assert torch.isfinite(w.grad).all()


def test_normalized_hypergradient_adam_worked_example() -> None:
    # normalized Adam-HD on a 2-d quadratic: alpha_t = alpha_{t-1} exp(beta cos(g_t, u_{t-1}))
    b1, b2, eps, alpha, beta = 0.9, 0.999, 1e-8, 0.05, 0.3
    scales = [3.0, 0.5]
    x, m, v, u_prev = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
    want = []
    for t in range(1, 6):
        g = [s * xi for s, xi in zip(scales, x)]
        dot = sum(a * b for a, b in zip(g, u_prev))
        norms = math.sqrt(sum(a * a for a in g) * sum(b * b for b in u_prev))
        if norms > 0:
            alpha *= math.exp(beta * dot / norms)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        u_prev = [(mi / (1 - b1**t)) / (math.sqrt(vi) / math.sqrt(1 - b2**t) + eps) for mi, vi in zip(m, v)]
        x = [xi - alpha * ui for xi, ui in zip(x, u_prev)]
        want.append(list(x))
    traj, opt = _quadratic_run(
        lambda p: HypergradientAdam(p, init_lr=0.05, hyper_lr=beta, normalized=True), 5, torch.tensor(scales),
        torch.tensor([1.0, -2.0], dtype=torch.float64),
    )
    assert [t.tolist() for t in traj] == [pytest.approx(w, rel=1e-12) for w in want]
    assert float(opt.state[opt.param_groups[0]["params"][0]]["lr_factor"]) * 0.05 == pytest.approx(alpha, rel=1e-12)


@pytest.mark.parametrize("opt_cls", [HypergradientSGD, HypergradientAdam])
def test_normalized_hypergradient_is_invariant_to_the_loss_scale(opt_cls) -> None:
    """The rate's trajectory is the same when the loss (so every gradient) is scaled by 1000."""
    factors = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
        opt = opt_cls([w], init_lr=0.01 / scale if opt_cls is HypergradientSGD else 0.01, hyper_lr=0.1, normalized=True)
        for step in range(8):
            opt.zero_grad()
            (scale * ((w - torch.arange(5.0, dtype=torch.float64)) ** 2).sum()).backward()
            opt.step()
        factors.append(float(opt.state[w]["lr_factor"]))
    assert factors[0] == pytest.approx(factors[1], rel=1e-9)
    assert factors[0] != 1.0


def test_normalized_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="normalized"):
        HypergradientAdam([torch.nn.Parameter(torch.ones(1))], normalized=1)
    with pytest.raises(ValueError, match="normalized"):
        HypergradientAdamRule(normalized="yes")
