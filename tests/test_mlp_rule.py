"""The per-coordinate MLP rule: features, batching, zero-gradient rest, Adam start, meta-gradients, weights."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

import learned_opt
from learned_opt.optim import LSTMOptimizer, MLPOptimizer, load_optimizer
from learned_opt.rules import LSTMRule, MLPRule, build_rule
from learned_opt.rules.chunks import plan_chunks
from learned_opt.weights import save_weights

META = {"config": {}, "seed": 0, "steps": 0, "wall_time_s": 0.0, "machine": "test", "command": "pytest"}


def _random_rule(seed: int = 0, scale: float = 3.0, **config) -> MLPRule:
    """A rule with larger-than-init weights, so updates are far from trivial."""
    torch.manual_seed(seed)
    rule = MLPRule(**config)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(torch.randn_like(p) * scale)
    return rule


def _run(rule: MLPRule, params: list[torch.Tensor], grads_seq: list[list[torch.Tensor]], lr: float = 1.0):
    state = rule.init_state(params)
    outs = []
    for grads in grads_seq:
        updates, state = rule.update(grads, params, state, {"lr": lr})
        params = [p + u for p, u in zip(params, updates)]
        outs.append(updates)
    return outs, state


def test_features_match_hand_computation() -> None:
    rule = MLPRule(momentum_decays=(0.5, 0.9), rms_decays=(0.999, 0.9), timescales=(1, 10))
    p = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]], dtype=torch.float64)
    g1 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, -1.0]], dtype=torch.float64)
    g2 = torch.tensor([[-1.0, 1.0, 0.25], [0.0, 2.0, 3.0]], dtype=torch.float64)
    params, state = [p], rule.init_state([p])
    for g in (g1, g2):
        _, state = rule.update([g], params, state, {"lr": 0.0})  # lr 0: params stay p
    mom, rms, step = state[1][0]["mom"], state[1][0]["rms"], state[0]["step"]
    assert float(step) == 2.0
    got = rule.features(p, g2, mom, rms, step)

    def ema(beta: float, f) -> list[float]:
        return [(beta * (1 - beta) * f(a) + (1 - beta) * f(b)) for a, b in zip(g1.reshape(-1).tolist(), g2.reshape(-1).tolist())]

    m = {b: ema(b, lambda x: x) for b in (0.5, 0.9)}
    v = {b: ema(b, lambda x: x * x) for b in (0.999, 0.9)}
    rs = {b: [1 / math.sqrt(x + 1e-6) for x in v[b]] for b in v}
    adam = [(mi / (1 - 0.9**2)) / (math.sqrt(vi / (1 - 0.999**2)) + 1e-8) for mi, vi in zip(m[0.9], v[0.999])]
    cols = [p.reshape(-1).tolist(), g2.reshape(-1).tolist(), m[0.5], m[0.9], v[0.999], v[0.9]]
    cols += [[a * b for a, b in zip(m[mb], rs[vb])] for mb in (0.5, 0.9) for vb in (0.999, 0.9)]
    cols += [rs[0.999], rs[0.9], adam]
    want = [[x / math.sqrt(1e-5 + sum(y * y for y in col) / len(col)) for x in col] for col in cols]
    want += [[math.tanh(2 / x)] * 6 for x in (1, 10)]
    assert got.shape == (6, len(rule.feature_names())) == (6, len(want))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64).T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mom[..., 0], torch.tensor(m[0.5], dtype=torch.float64).reshape(2, 3))
    torch.testing.assert_close(rms[..., 1], torch.tensor(v[0.9], dtype=torch.float64).reshape(2, 3))


def test_update_is_mlp_of_features_with_paper_step() -> None:
    """update = -d · exp(mag · exp_mult) · step_mult · lr, the MLP run as an nn.Sequential."""
    rule = _random_rule(seed=1, scale=1.0, exp_mult=0.1, step_mult=0.01).double()
    p, g = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    (updates,), state = _run(rule, [p], [[g]], lr=0.5)
    x = rule.features(p, g, state[1][0]["mom"], state[1][0]["rms"], state[0]["step"])
    layers = []
    for lin in rule.mlp:
        layers += [lin, torch.nn.ReLU()]
    out = torch.nn.Sequential(*layers[:-1])(x)
    want = -out[:, 0] * torch.exp(out[:, 1] * 0.1) * 0.01 * 0.5
    torch.testing.assert_close(updates[0], want.reshape(4, 5).detach(), rtol=1e-12, atol=1e-15)


def test_permutation_equivariance_and_chunk_invariance() -> None:
    torch.manual_seed(2)
    f64 = torch.float64  # float64, so batch-size-dependent matmul rounding stays far below the tolerance
    params = [torch.randn(17, dtype=f64), torch.randn(2, 3, dtype=f64), torch.randn((), dtype=f64), torch.zeros(0, 4, dtype=f64)]
    seq = [[torch.randn_like(p) for p in params] for _ in range(4)]
    base = _random_rule(seed=3, chunk_size=1000)
    outs, _ = _run(base, params, seq)
    for chunk_size in (1, 5, 23):
        other = copy.deepcopy(base)
        other.chunk_size = chunk_size
        outs_c, _ = _run(other, params, seq)
        for o, oc in zip(outs, outs_c):
            for a, b in zip(o, oc):
                torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    perm = torch.randperm(17)
    outs_p, _ = _run(base, [params[0][perm], *params[1:]], [[gs[0][perm], *gs[1:]] for gs in seq])
    for o, op in zip(outs, outs_p):
        torch.testing.assert_close(op[0], o[0][perm], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op[1], o[1], rtol=1e-10, atol=1e-12)
    assert all(o[3].shape == (0, 4) for o in outs)


@pytest.mark.parametrize("residual", [False, True])
def test_zero_gradient_from_fresh_state_moves_nothing(residual: bool) -> None:
    rule = _random_rule(seed=4, adam_residual=residual, chunk_size=4)
    params = [torch.randn(3, 3) * 5, torch.randn(6)]
    zeros = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    outs, _ = _run(rule, params, zeros)
    assert all(torch.count_nonzero(u) == 0 for step in outs for u in step)
    # per coordinate: a coordinate whose gradients have all been zero stays put while others move
    g = torch.randn(6)
    g[[1, 4]] = 0.0
    outs, _ = _run(rule, [params[1]], [[g], [g * 2], [torch.zeros(6)]])
    for (u,) in outs:
        assert u[1] == 0 and u[4] == 0
    assert torch.count_nonzero(outs[0][0]) == 4
    assert torch.count_nonzero(outs[2][0]) == 4  # after a gradient, a coordinate may keep moving


def test_adam_residual_fresh_rule_is_adam() -> None:
    torch.manual_seed(5)
    ours = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_a = MLPOptimizer(ours, weights=MLPRule(adam_residual=True, chunk_size=5))
    opt_b = torch.optim.Adam(theirs, lr=1e-3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    for _ in range(6):
        for ps, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            ((x @ ps[0] + ps[1] - y) ** 2).mean().backward()
            opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    assert not torch.equal(ours[1].detach(), torch.zeros(3))


@pytest.mark.parametrize("residual", [False, True])
def test_meta_gradients_flow_to_theta(residual: bool) -> None:
    """An unrolled quadratic: d(final loss)/dθ is finite and reaches every θ that acts at init."""
    torch.manual_seed(6)
    rule = MLPRule(hidden_size=8, adam_residual=residual, chunk_size=5, step_mult=0.1)
    target = torch.randn(3, 4)
    params = [torch.randn(3, 4, requires_grad=True)]
    state = rule.init_state(params)
    for _ in range(3):
        loss = ((params[0] - target) ** 2).sum()
        (g,) = torch.autograd.grad(loss, params, create_graph=True)  # second order: through the gradient
        updates, state = rule.update([g], params, state, rule.meta_hparams())
        params = [p + u for p, u in zip(params, updates)]
    final = ((params[0] - target) ** 2).sum()
    final.backward()
    live = ["log_lr0", f"mlp.{len(rule.mlp) - 1}.weight", f"mlp.{len(rule.mlp) - 1}.bias"] if residual else None
    for name, theta in rule.named_parameters():
        assert theta.grad is not None and torch.isfinite(theta.grad).all(), name
        if live is None or name in live:  # residual: earlier layers act once the last layer is non-zero
            assert theta.grad.abs().sum() > 0, name


def test_float64_state_and_steps() -> None:
    rule = _random_rule(seed=7)
    p = torch.randn(5, dtype=torch.float64)
    (step,), state = _run(rule, [p], [[torch.randn(5, dtype=torch.float64)]])
    assert step[0].dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in (*state[1][0].values(), state[0]["step"]))


def test_state_bytes_per_parameter_matches_docs() -> None:
    """docs/optimizers.md: 4 · (len(momentum_decays) + len(rms_decays)) bytes per float32 element."""
    p = torch.nn.Parameter(torch.randn(7, 11))
    opt = MLPOptimizer([p], weights=None)
    p.grad = torch.randn_like(p)
    opt.step()
    per_param = [v for v in opt.state[p].values() if v.shape[: p.dim()] == p.shape]
    assert sum(v.numel() * v.element_size() for v in per_param) / p.numel() == 24
    assert "| `MLPOptimizer`" in (Path(__file__).parents[1] / "docs" / "optimizers.md").read_text() and "24" in (
        Path(__file__).parents[1] / "docs" / "optimizers.md"
    ).read_text()


def test_weights_round_trip_and_names(tmp_path: Path) -> None:
    rule = _random_rule(seed=8, scale=0.1, hidden_size=6, hidden_layers=1, adam_residual=True)
    path = save_weights(rule, tmp_path / "mine", name="mine", meta_training=META)
    p1, p2 = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt1 = load_optimizer(path, [p1])
    opt2 = MLPOptimizer([p2], weights=copy.deepcopy(rule))
    assert isinstance(opt1, MLPOptimizer) and opt1.card["rule"] == "mlp" and opt1.weights_sha256 == opt1.card["sha256"]
    assert build_rule("mlp", opt1.card["rule_config"]).config() == rule.config()
    for _ in range(3):
        for p, opt in ((p1, opt1), (p2, opt2)):
            p.grad = torch.arange(4.0) - p.detach()
            opt.step()
    assert torch.equal(p1, p2)
    assert isinstance(MLPOptimizer([p1], weights=path).rule, MLPRule)
    with pytest.raises(TypeError, match="weights"):
        learned_opt.MLPOptimizer([p1])  # no MLP weights ship: the caller must say which (or None)
    with pytest.raises(ValueError, match="needs 'mlp' weights"):
        learned_opt.MLPOptimizer([p1], weights="default")  # the shipped default is another rule
    with pytest.raises(ValueError, match="needs 'mlp' weights"):
        MLPOptimizer([p1], weights=LSTMRule())
    with pytest.raises(ValueError, match="needs 'lstm' weights"):
        LSTMOptimizer([p1], weights=rule)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 0}, "invalid hidden_size"),
        ({"hidden_layers": -1}, "invalid hidden_layers"),
        ({"momentum_decays": (0.9, 1.0)}, "invalid momentum_decays"),
        ({"rms_decays": ()}, "invalid rms_decays"),
        ({"timescales": (1, 0)}, "invalid timescales"),
        ({"momentum_decays": (0.5,)}, "Adam's direction needs"),
        ({"adam_residual": 1}, "invalid adam_residual"),
        ({"adam_residual": True, "init_lr0": 0.0}, "invalid init_lr0"),
        ({"exp_mult": float("nan")}, "invalid exp_mult"),
        ({"chunk_size": 0}, "invalid chunk_size"),
    ],
)
def test_bad_config(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        MLPRule(**kwargs)


def test_no_adam_features_needs_no_adam_decays() -> None:
    rule = MLPRule(momentum_decays=(0.5,), rms_decays=(0.99,), adam_feature=False)
    assert "adam" not in rule.feature_names()
    (u,), _ = _run(rule, [torch.randn(3)], [[torch.randn(3)]])
    assert torch.isfinite(u[0]).all()


def test_plan_chunks_packs_and_splits() -> None:
    kinds = ["a", "a", "a", "b", "b"]
    chunks = plan_chunks([3, 0, 9, 2, 2], kinds, 4)
    assert chunks == [[(0, 0, 3), (2, 0, 1)], [(2, 1, 5)], [(2, 5, 9)], [(3, 0, 2), (4, 0, 2)]]
    assert plan_chunks([], [], 4) == []
    with pytest.raises(ValueError, match="invalid chunk_size"):
        plan_chunks([1], ["a"], 0)
