"""The LSTM rule's fused no-grad path against its differentiable reference path."""

from __future__ import annotations

import copy

import pytest
import torch

from learned_opt.optim import LSTMOptimizer
from learned_opt.rules.lstm import fast as lstm_fast
from learned_opt.rules.lstm import LSTMRule


def _rule(seed: int = 0, **config) -> LSTMRule:
    torch.manual_seed(seed)
    rule = LSTMRule(**config)
    with torch.no_grad():  # larger than the init, so the dynamics are not trivially small
        for p in rule.parameters():
            p.mul_(3.0)
    return rule


def _grads(params: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """Gradients over many scales, a third of them exactly zero (the at-rest logic)."""
    out = []
    for p in params:
        scale = 10.0 ** torch.randint(-6, 1, p.shape, generator=gen).to(p.dtype)
        g = torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
        out.append(g * (torch.rand(p.shape, generator=gen) > 0.33).to(p.dtype))
    return out


CONFIGS = [
    {"chunk_size": 16},
    {"chunk_size": 5, "num_layers": 3, "hidden_size": 7},
    {"chunk_size": 1, "num_layers": 1, "hidden_size": 4},
    {"chunk_size": 1000, "preprocess": "none", "hidden_size": 6},
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("donate", [False, True])
def test_fast_path_matches_reference_over_a_trajectory(config: dict, donate: bool) -> None:
    rule = _rule(**config)
    params = [torch.randn(17), torch.randn(2, 3), torch.randn(()), torch.randn(0), torch.randn(3, 1, 4)]
    ref_state = fast_state = rule.init_state(params)
    gen = torch.Generator().manual_seed(1)
    resting = [torch.ones(p.shape, dtype=torch.bool) for p in params]  # zero gradients so far
    with torch.no_grad():
        for _ in range(5):
            grads = _grads(params, gen)
            u_ref, ref_state = rule.update_reference(grads, params, ref_state, {"lr": 0.7})
            u_fast, fast_state = rule.update_fast(grads, params, fast_state, {"lr": 0.7}, donate_state=donate)
            for a, b, g, rest in zip(u_ref, u_fast, grads, resting):
                assert a.shape == b.shape and a.dtype == b.dtype
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
                rest &= g == 0
                assert not a[rest].any() and not b[rest].any()  # exactly zero in both paths
            for a, b in zip(ref_state[1], fast_state[1]):
                torch.testing.assert_close(b["h"], a["h"], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(b["c"], a["c"], rtol=1e-5, atol=1e-6)
            for key in ("ref_h", "ref_c"):
                assert torch.equal(ref_state[0][key], fast_state[0][key])


def test_mixed_dtypes_in_one_group_and_contiguous_state_from_a_checkpoint() -> None:
    """float32 and float64 params pack into separate chunks; a state laid out coordinate-major
    (as a safetensors checkpoint stores it) is read correctly and not modified."""
    rule = _rule(seed=2, chunk_size=7)
    params = [torch.randn(5), torch.randn(4, 3, dtype=torch.float64), torch.randn(9)]
    gen = torch.Generator().manual_seed(3)
    state = rule.init_state(params)
    with torch.no_grad():
        for _ in range(2):
            state = rule.update_reference(_grads(params, gen), params, state, {"lr": 1.0})[1]
    contiguous = (state[0], [{k: v.contiguous() for k, v in s.items()} for s in state[1]])
    saved = copy.deepcopy(contiguous)
    grads = _grads(params, gen)
    with torch.no_grad():
        u_ref, s_ref = rule.update_reference(grads, params, state, {"lr": 1.0})
        u_fast, s_fast = rule.update_fast(grads, params, contiguous, {"lr": 1.0})
    for a, b in zip(u_ref, u_fast):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(s_ref[1], s_fast[1]):
        torch.testing.assert_close(b["h"], a["h"], rtol=1e-5, atol=1e-6)
    for before, after in zip(saved[1], contiguous[1]):
        assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("dense", [False, True])
def test_fast_path_zero_gradient_from_fresh_state_moves_nothing_exactly(monkeypatch, dense: bool) -> None:
    """Both at-rest tests: CPU's (zero-gradient indices) and the GPU's dense one, run here on the CPU."""
    monkeypatch.setattr(lstm_fast, "dense_at_rest", lambda device: dense)
    rule = _rule(seed=4, chunk_size=64)
    params = [torch.randn(1000), torch.randn(3, 3, dtype=torch.float64), torch.randn(())]
    state = rule.init_state(params)
    with torch.no_grad():
        for _ in range(3):
            updates, state = rule.update_fast([torch.zeros_like(p) for p in params], params, state, {"lr": 1.0})
            assert all(torch.equal(u, torch.zeros_like(u)) for u in updates)
        grads = [torch.zeros_like(p) for p in params]
        grads[0][7] = 0.3
        updates, state = rule.update_fast(grads, params, state, {"lr": 1.0})
        assert updates[0][7] != 0 and torch.count_nonzero(updates[0]) == 1
        # the moved coordinate keeps moving on zero gradients; its neighbours at rest do not
        updates, state = rule.update_fast([torch.zeros_like(p) for p in params], params, state, {"lr": 1.0})
        assert updates[0][7] != 0 and torch.count_nonzero(updates[0]) == 1


def test_update_dispatches_to_fast_path_only_without_a_graph(monkeypatch) -> None:
    rule = _rule(seed=5)
    p = torch.randn(6)
    calls = []
    fast = LSTMRule.update_fast
    monkeypatch.setattr(LSTMRule, "update_fast", lambda self, *a, **k: calls.append(1) or fast(self, *a, **k))
    g = torch.randn(6)
    with torch.no_grad():
        rule.update([g], [p], rule.init_state([p]), {"lr": 1.0})
    assert calls == [1]
    updates, _ = rule.update([g], [p], rule.init_state([p]), {"lr": 1.0})  # θ requires grad
    assert calls == [1] and updates[0].requires_grad
    frozen = copy.deepcopy(rule).requires_grad_(False)
    updates, _ = frozen.update([g], [p], frozen.init_state([p]), {"lr": 1.0})  # nothing to record
    assert calls == [1, 1] and not updates[0].requires_grad


def test_fast_path_leaves_its_input_state_untouched_unless_donated() -> None:
    rule = _rule(seed=6, chunk_size=4)
    params = [torch.randn(10), torch.randn(3)]
    gen = torch.Generator().manual_seed(7)
    state = rule.update_fast(_grads(params, gen), params, rule.init_state(params), {"lr": 1.0})[1]
    before = copy.deepcopy(state)
    grads = _grads(params, gen)
    _, kept = rule.update_fast(grads, params, state, {"lr": 1.0})
    for a, b in zip(before[1], state[1]):
        assert torch.equal(a["h"], b["h"]) and torch.equal(a["c"], b["c"])
    _, donated = rule.update_fast(grads, params, state, {"lr": 1.0}, donate_state=True)
    for a, b, old in zip(kept[1], donated[1], state[1]):
        assert torch.equal(a["h"], b["h"]) and torch.equal(a["c"], b["c"])
        assert b["h"].data_ptr() == old["h"].data_ptr()  # reused, not reallocated


def test_state_is_shaped_per_parameter_and_stored_feature_major() -> None:
    rule = LSTMRule(num_layers=2, hidden_size=3)
    p = torch.randn(4, 5)
    _, (state,) = rule.init_state([p])
    assert state["h"].shape == (4, 5, 2, 3)
    assert state["h"].permute(2, 3, 0, 1).is_contiguous()
    _, (new,) = rule.update_fast([torch.randn(4, 5)], [p], rule.init_state([p]), {"lr": 1.0})[1]
    assert new["h"].shape == (4, 5, 2, 3) and new["h"].permute(2, 3, 0, 1).is_contiguous()


def test_optimizer_trajectory_equals_reference_rule_trajectory() -> None:
    """LSTMOptimizer (fast path, state updated in place) follows the differentiable reference."""
    rule = _rule(seed=8, chunk_size=8)
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    params = [p.detach().clone() for p in model.parameters()]
    opt = LSTMOptimizer(model.parameters(), lr=0.5, weights=copy.deepcopy(rule))
    state = rule.init_state(params)
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        updates, state = rule.update_reference(grads, params, state, {"lr": 0.5})
        params = [(p + u).detach() for p, u in zip(params, updates)]
        for got, want in zip(model.parameters(), params):
            torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
