"""The coordinate-wise LSTM rule: the paper's preprocessing, torch.nn.LSTM equivalence, batching."""

from __future__ import annotations

import math

import pytest
import torch

from learned_opt.rules.lstm import LSTMRule, preprocess_log_sign


def _random_rule(seed: int = 0, **config) -> LSTMRule:
    torch.manual_seed(seed)
    rule = LSTMRule(**config)
    with torch.no_grad():  # larger weights than the init, so the test sees non-trivial dynamics
        for p in rule.parameters():
            p.mul_(3.0)
    return rule


def _run(rule: LSTMRule, grads_seq: list[list[torch.Tensor]], lr: float = 1.0) -> list[list[torch.Tensor]]:
    params = [torch.zeros_like(g) for g in grads_seq[0]]
    state = rule.init_state(params)
    outs = []
    for grads in grads_seq:
        updates, state = rule.update(grads, params, state, {"lr": lr})
        outs.append(updates)
    return outs


def test_preprocessing_matches_paper_formula_at_and_around_threshold() -> None:
    p = 10.0
    e = math.exp(-p)
    g = torch.tensor([e, -e, e * (1 + 1e-9), e * (1 - 1e-9), 0.0, 0.5, -3.0, 1e-7], dtype=torch.float64)
    got = preprocess_log_sign(g, p)
    for value, (a, b) in zip(g.tolist(), got.tolist()):
        if abs(value) >= e:
            want = (math.log(abs(value)) / p, math.copysign(1.0, value) if value != 0 else 0.0)
        else:
            want = (-1.0, math.exp(p) * value)
        assert a == pytest.approx(want[0], abs=1e-12)
        assert b == pytest.approx(want[1], abs=1e-6)
    # at |g| = e^-p both branches give (-1, ±1): the map is continuous there
    assert got[0].tolist() == pytest.approx([-1.0, 1.0])
    assert got[3].tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)


def test_rule_equals_torch_lstm_applied_per_coordinate() -> None:
    rule = _random_rule(num_layers=2, hidden_size=7)
    torch.manual_seed(1)
    steps = 5
    grads_seq = [[torch.randn(3, 4) * 10 ** torch.randint(-6, 1, (3, 4)).float(), torch.randn(5)] for _ in range(steps)]
    grads_seq[2][1][0] = 0.0
    outs = _run(rule, grads_seq, lr=0.7)
    ref_seq = preprocess_log_sign(torch.zeros(steps, 1), rule.p)  # a zero gradient's features
    ref_out, _ = rule.lstm(ref_seq)
    ref = rule.head(ref_out).squeeze(-1) * rule.output_scale  # (steps, 1)
    for t_idx in (0, 1):
        g_all = torch.stack([gs[t_idx].reshape(-1) for gs in grads_seq])  # (steps, n)
        x = preprocess_log_sign(g_all, rule.p)  # (steps, n, 2): batch = coordinates, independent
        for j in range(g_all.shape[1]):
            seq_out, _ = rule.lstm(x[:, j : j + 1])  # one coordinate on its own
            want = (rule.head(seq_out).squeeze(-1) * rule.output_scale - ref) * 0.7
            got = torch.stack([o[t_idx].reshape(-1)[j] for o in outs])
            torch.testing.assert_close(got, want.squeeze(-1), rtol=1e-5, atol=1e-7)


def test_permutation_equivariance_and_chunk_invariance() -> None:
    rule = _random_rule(seed=3, chunk_size=5)
    big = _random_rule(seed=3, chunk_size=1000)
    torch.manual_seed(2)
    seq = [[torch.randn(17), torch.randn(2, 3)] for _ in range(4)]
    perm = torch.randperm(17)
    outs = _run(rule, seq)
    outs_perm = _run(rule, [[gs[0][perm], gs[1]] for gs in seq])
    outs_big = _run(big, seq)
    for o, op, ob in zip(outs, outs_perm, outs_big):
        torch.testing.assert_close(op[0], o[0][perm])
        torch.testing.assert_close(ob[0], o[0])
        torch.testing.assert_close(ob[1], o[1])


def test_zero_gradient_from_fresh_state_moves_nothing_exactly() -> None:
    rule = _random_rule(seed=4, chunk_size=64)
    params = [torch.randn(1000), torch.randn(3, 3, dtype=torch.float64), torch.randn(())]
    state = rule.init_state(params)
    for _ in range(3):
        updates, state = rule.update([torch.zeros_like(p) for p in params], params, state, {"lr": 1.0})
        for u in updates:
            assert torch.equal(u, torch.zeros_like(u))
    # a real gradient then moves the coordinate; its neighbours at rest stay put
    grads = [torch.zeros_like(p) for p in params]
    grads[0][7] = 0.3
    updates, state = rule.update(grads, params, state, {"lr": 1.0})
    assert updates[0][7] != 0
    assert torch.count_nonzero(updates[0]) == 1


def test_lr_scales_update_and_float64_state() -> None:
    rule = _random_rule(seed=5)
    p = torch.randn(6, dtype=torch.float64)
    g = torch.randn(6, dtype=torch.float64)
    u1, st = rule.update([g], [p], rule.init_state([p]), {"lr": 1.0})
    u2, _ = rule.update([g], [p], rule.init_state([p]), {"lr": 0.25})
    u0, _ = rule.update([g], [p], rule.init_state([p]), {"lr": 0.0})
    torch.testing.assert_close(u2[0], 0.25 * u1[0])
    assert torch.equal(u0[0], torch.zeros_like(p))
    assert st[1][0]["h"].dtype == torch.float64 and st[1][0]["h"].shape == (6, 2, 20)


def test_rule_is_differentiable_in_theta_and_through_gradients() -> None:
    rule = _random_rule(seed=6)
    p = torch.randn(4)
    g = torch.randn(4, requires_grad=True)
    updates, _ = rule.update([g], [p], rule.init_state([p]), {"lr": 1.0})
    loss = (updates[0] ** 2).sum()
    grads = torch.autograd.grad(loss, [rule.lstm.weight_ih_l0, g], create_graph=True)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    (grads[1].sum()).backward()  # second order through the gradient
    assert rule.lstm.weight_ih_l0.grad is not None


@pytest.mark.parametrize(
    "bad", [{"preprocess": "log"}, {"num_layers": 0}, {"hidden_size": -1}, {"p": float("nan")}, {"chunk_size": 0},
            {"fused_training": "yes"}]
)
def test_bad_config_raises_value_error(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        LSTMRule(**bad)
