"""The LSTM rule's first-order meta-training path (fused chunk step, written-out backward)."""

from __future__ import annotations

import pytest
import torch

from learned_opt.rules.lstm import LSTMRule
from learned_opt.rules.lstm.kernels import chunk_step, fuse_weights


def _rule(seed: int = 0, **config) -> LSTMRule:
    torch.manual_seed(seed)
    rule = LSTMRule(**config).double()
    with torch.no_grad():
        for p in rule.parameters():
            p.normal_(0.0, 0.5)
    return rule


def _params(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for shape in [(7, 5), (5,), (3, 2, 2), (1,)]]


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """Random gradients with some coordinates always zero (at rest) and some zero only now."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for p in params:
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 10.0 ** torch.randint(-6, 1, p.shape, generator=g)
        grad.view(-1)[:3] = 0.0  # never any gradient: stays at rest
        if step % 2:
            grad.view(-1)[-2:] = 0.0  # zero now, not at rest
        out.append(grad)
    return out


def _trajectory(rule: LSTMRule, method: str, steps: int, lr: torch.Tensor) -> tuple[torch.Tensor, list]:
    params = _params(0)
    state = rule.init_state(params)
    total = torch.zeros((), dtype=torch.float64)
    for t in range(steps):
        updates, state = getattr(rule, method)(_grads(params, t), params, state, {"lr": lr})
        params = [p + u for p, u in zip(params, updates)]
        total = total + sum((p * torch.linspace(-1, 1, p.numel(), dtype=p.dtype).reshape(p.shape)).sum() for p in params)
    return total, params


@pytest.mark.parametrize("chunk_size", [4, 9, 1000])
def test_first_order_path_matches_reference_values_and_gradients(chunk_size: int) -> None:
    rule = _rule(chunk_size=chunk_size)
    lr = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    results = {}
    for method in ("update_reference", "update_first_order"):
        total, params = _trajectory(rule, method, 5, lr)
        theta = [lr, *rule.parameters()]
        results[method] = (params, torch.autograd.grad(total, theta))
    (p_ref, g_ref), (p_fast, g_fast) = results["update_reference"], results["update_first_order"]
    for a, b in zip(p_ref, p_fast):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ref, g_fast):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


def test_first_order_path_keeps_never_touched_coordinates_exactly_still() -> None:
    rule = _rule(chunk_size=9)
    _, params = _trajectory(rule, "update_first_order", 4, torch.tensor(1.0, dtype=torch.float64))
    for p0, p in zip(_params(0), params):
        assert torch.equal(p.view(-1)[:3], p0.view(-1)[:3])
        if p.numel() > 3:
            assert not torch.equal(p.view(-1)[3:], p0.view(-1)[3:])


def test_update_dispatches_first_order_only_for_constant_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = _rule()
    params = _params(0)
    state = rule.init_state(params)
    calls: list[str] = []
    for name in ("update_reference", "update_first_order", "update_fast"):
        original = getattr(LSTMRule, name)
        monkeypatch.setattr(LSTMRule, name, lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k))
    grads = _grads(params, 0)
    rule.update(grads, params, state, {"lr": 1.0})
    rule.update([g.requires_grad_() for g in grads], params, state, {"lr": 1.0})
    with torch.no_grad():
        rule.update(grads, params, state, {"lr": 1.0})
    assert calls == ["update_first_order", "update_reference", "update_fast"]


def test_the_config_chooses_the_first_order_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fused_training=False`` (a config value that survives a rebuild) sends first-order steps
    through the reference path; the default takes the fused one."""
    calls: list[str] = []
    for name in ("update_reference", "update_first_order"):
        original = getattr(LSTMRule, name)
        monkeypatch.setattr(LSTMRule, name, lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k))
    params = _params(0)
    for config in ({}, {"fused_training": False}):
        rule = LSTMRule(**LSTMRule(**config).config())
        rule.update(_grads(params, 0), params, rule.init_state(params), {"lr": 1.0})
    assert calls == ["update_first_order", "update_reference"]


def test_chunk_step_gradcheck() -> None:
    """The written-out backward against finite differences, every input that takes a gradient.
    (Pinned columns are covered by the trajectory test against the reference path.)"""
    rule = _rule(num_layers=2, hidden_size=3)
    L, H, n = 2, 3, 6
    g = torch.Generator().manual_seed(1)
    weights = {k: v.detach().clone().requires_grad_() for k, v in rule.named_parameters()}
    rest = torch.zeros(0, dtype=torch.long)

    def f(x, h, c, lr, ref, ref_h, ref_c, head_w, head_b, *raw):
        w = dict(zip(weights, raw))
        return chunk_step((L, H, 0.1), x, h, c, lr, ref, ref_h, ref_c, rest, head_w, head_b, fuse_weights(w, L, H))

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    inputs = (rand(2, n), rand(L * H, n), rand(L * H, n), rand(()), rand(()), torch.zeros(L * H, dtype=torch.float64), torch.zeros(L * H, dtype=torch.float64), rand(1, H),
              rand(1), *weights.values())
    assert torch.autograd.gradcheck(f, inputs)


def test_first_order_chunk_plan_keeps_large_tensors_apart() -> None:
    """Large tensors get chunks of their own (views, no copies); small ones are packed after them."""
    rule = LSTMRule(chunk_size=100)
    params = [torch.zeros(s) for s in [(120,), (3,), (60,), (4,), (2, 3)]]
    _, per_param = rule.init_state(params)
    plan = rule.chunk_plan(params, per_param, large_apart=True)
    assert plan == [[(0, 0, 100)], [(0, 100, 120)], [(2, 0, 60)], [(1, 0, 3), (3, 0, 4), (4, 0, 6)]]
    packed = rule.chunk_plan(params, per_param)
    assert sorted(seg for chunk in packed for seg in chunk) == sorted(seg for chunk in plan for seg in chunk)
