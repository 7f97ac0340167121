"""The torch.optim contract, check by check, for every optimizer of the library."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

from learned_opt.optim import (
    GradNormDecayAdam,
    GradNormDecaySGD,
    HypergradientAdam,
    HypergradientSGD,
    LearnedOptimizer,
    LSTMOptimizer,
    MLPOptimizer,
    RelativeAdam,
)
from learned_opt.rules import LearnableAdamRule, LearnableSGDRule, LearnedRelativeAdamRule, LSTMRule, MLPRule


def _lstm_rule() -> LSTMRule:
    torch.manual_seed(123)
    rule = LSTMRule(hidden_size=6)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return rule


LSTM_RULE = _lstm_rule()


def _mlp_rule() -> MLPRule:
    """An MLP rule that descends (Adam-residual start) with a non-zero learned part."""
    torch.manual_seed(321)
    rule = MLPRule(hidden_size=8, adam_residual=True, init_lr0=0.05, chunk_size=7)
    with torch.no_grad():
        for p in rule.mlp[-1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return rule


MLP_RULE = _mlp_rule()


def _relative_rule(schedule_free: bool = False) -> LearnedRelativeAdamRule:
    """A learned relative Adam whose controller is non-zero (it changes the steps)."""
    torch.manual_seed(222)
    rule = LearnedRelativeAdamRule(init_alpha=0.05, hidden=4, schedule_free=schedule_free)
    with torch.no_grad():
        for p in rule.ctrl.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return rule


RELATIVE_RULE = _relative_rule()

FACTORIES: dict[str, Callable[..., LearnedOptimizer]] = {
    "lstm": lambda params, **kw: LSTMOptimizer(params, weights=copy.deepcopy(LSTM_RULE), **kw),
    "grad-norm-decay-sgd": lambda params, **kw: GradNormDecaySGD(
        params, **{"init_lr": 0.05, "threshold": 0.5, "momentum": 0.5, "relative": False, **kw}),
    "grad-norm-decay-adam": lambda params, **kw: GradNormDecayAdam(
        params, **{"init_lr": 0.01, "threshold": 0.7, "patience": 2, "cooldown": 3, **kw}),
    "hypergradient-sgd": lambda params, **kw: HypergradientSGD(params, **{"init_lr": 0.02, "momentum": 0.3, **kw}),
    "hypergradient-adam": lambda params, **kw: HypergradientAdam(
        params, **{"init_lr": 0.01, "hyper_lr": 1e-4, "normalized": False, **kw}),
    "learnable-adam": lambda params, **kw: LearnedOptimizer(params, LearnableAdamRule(), **{"init_lr": 0.01, **kw}),
    "learnable-sgd": lambda params, **kw: LearnedOptimizer(
        params, LearnableSGDRule(), **{"init_lr": 0.02, "momentum": 0.9, **kw}),
    "mlp": lambda params, **kw: MLPOptimizer(params, weights=copy.deepcopy(MLP_RULE), **kw),
    "relative-adam": lambda params, **kw: RelativeAdam(params, **{"alpha": 0.05, **kw}),
    "learned-relative-adam": lambda params, **kw: LearnedOptimizer(params, copy.deepcopy(RELATIVE_RULE),
                                                                   **{"total_steps": 40, **kw}),
    "relative-adam-sf": lambda params, **kw: RelativeAdam(params, **{"alpha": 0.1, "schedule_free": True, **kw}),
    "learned-relative-adam-sf": lambda params, **kw: LearnedOptimizer(
        params, _relative_rule(schedule_free=True), **kw),
}
NAMES = list(FACTORIES)


class Problem:
    """A small least-squares problem with a weight matrix and a bias."""

    def __init__(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(16, 4, generator=g, dtype=dtype)
        self.y = torch.randn(16, 3, generator=g, dtype=dtype)
        self.w = torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=dtype))
        self.b = torch.nn.Parameter(torch.zeros(3, dtype=dtype))

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.w, self.b]

    def loss(self) -> torch.Tensor:
        return ((self.x @ self.w + self.b - self.y) ** 2).mean()

    def backward(self) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        loss = self.loss()
        loss.backward()
        return loss


def _train(opt: torch.optim.Optimizer, prob: Problem, steps: int) -> None:
    for _ in range(steps):
        prob.backward()
        opt.step()


def _snapshot(prob: Problem) -> list[torch.Tensor]:
    return [p.detach().clone() for p in prob.params]


@pytest.fixture(params=NAMES)
def make(request: pytest.FixtureRequest) -> Callable[..., LearnedOptimizer]:
    return FACTORIES[request.param]


def test_is_torch_optimizer_and_reduces_loss(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    assert isinstance(opt, torch.optim.Optimizer)
    first = float(prob.loss().detach())
    _train(opt, prob, 30)
    last = float(prob.loss().detach())
    assert torch.isfinite(torch.tensor(last))
    if not isinstance(opt, LSTMOptimizer):  # the random LSTM is not trained to descend
        assert last < first


def test_step_equals_rule_functional_update(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    rule = copy.deepcopy(opt.rule)
    params = _snapshot(prob)
    state = rule.init_state(params)
    hparams = {k: opt.param_groups[0][k] for k in rule.hyperparameters}
    for _ in range(4):
        prob.backward()
        grads = [p.grad.clone() for p in prob.params]
        with torch.no_grad():
            updates, state = rule.update(grads, params, state, hparams)
        params = [p + u for p, u in zip(params, updates)]
        opt.step()
        for want, got in zip(params, prob.params):
            torch.testing.assert_close(got.detach(), want)


def test_per_group_lr_and_lr_zero_freezes(make) -> None:
    prob = Problem()
    opt = make([{"params": [prob.w]}, {"params": [prob.b], "lr": 0.0}])
    b0 = prob.b.detach().clone()
    w0 = prob.w.detach().clone()
    _train(opt, prob, 3)
    assert torch.equal(prob.b.detach(), b0)
    assert not torch.equal(prob.w.detach(), w0)
    assert opt.param_groups[1]["lr"] == 0.0


def test_lr_scales_first_update(make) -> None:
    """``lr`` multiplies the (first) update: twice the lr, twice the step."""
    steps = []
    for lr_scale in (1.0, 2.0):
        prob = Problem()
        opt = make(prob.params)
        for group in opt.param_groups:
            group["lr"] *= lr_scale
        before = _snapshot(prob)
        _train(opt, prob, 1)
        steps.append(prob.w.detach() - before[0])
    torch.testing.assert_close(steps[1], 2 * steps[0])


def test_add_param_group_and_validation(make) -> None:
    prob = Problem()
    opt = make([prob.w])
    opt.add_param_group({"params": [prob.b], "lr": 0.001})
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["lr"] == 0.001
    _train(opt, prob, 2)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -1.0})
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 2  # rejected groups are not left behind
    _train(opt, prob, 1)


def test_closure_returns_loss_with_grad_enabled(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    seen = {}

    def closure() -> torch.Tensor:
        seen["grad_enabled"] = torch.is_grad_enabled()
        return prob.backward()

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen["grad_enabled"] and isinstance(loss, torch.Tensor) and loss.ndim == 0


def test_no_autograd_graph_kept(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    _train(opt, prob, 2)
    for p in prob.params:
        assert p.grad_fn is None and p.is_leaf
        for value in opt.state[p].values():
            if isinstance(value, torch.Tensor):
                assert not value.requires_grad and value.grad_fn is None


def test_grad_none_params_skipped_without_state(make) -> None:
    prob = Problem()
    unused = torch.nn.Parameter(torch.ones(5))
    opt = make([*prob.params, unused])
    _train(opt, prob, 2)
    assert torch.equal(unused.detach(), torch.ones(5))
    assert unused not in opt.state or not opt.state[unused]


def test_all_zero_gradient_from_fresh_state_moves_nothing(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    before = _snapshot(prob)
    for _ in range(3):
        for p in prob.params:
            p.grad = torch.zeros_like(p)
        opt.step()
    for b, p in zip(before, prob.params):
        assert torch.equal(p.detach(), b)


def test_zero_grad(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    prob.backward()
    opt.zero_grad()
    assert all(p.grad is None for p in prob.params)
    prob.backward()
    opt.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in prob.params)


def test_state_not_aliased_to_grad(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    _train(opt, prob, 2)
    saved = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad(set_to_none=False)  # mutates p.grad in place
    for idx, p in enumerate(prob.params):
        for key, value in opt.state[p].items():
            torch.testing.assert_close(value, saved[idx][key])


def _save_load(sd: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_exact(make) -> None:
    prob_a, prob_b = Problem(), Problem()
    opt_a = make(prob_a.params)
    _train(opt_a, prob_a, 3)
    opt_b = make(prob_b.params)
    with torch.no_grad():
        for pa, pb in zip(prob_a.params, prob_b.params):
            pb.copy_(pa)
    opt_b.load_state_dict(_save_load(opt_a.state_dict()))
    _train(opt_a, prob_a, 3)
    _train(opt_b, prob_b, 3)
    for pa, pb in zip(prob_a.params, prob_b.params):
        assert torch.equal(pa, pb)


def test_load_state_dict_casts_and_rejects_mismatch(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    _train(opt, prob, 2)
    sd = opt.state_dict()
    prob64 = Problem(dtype=torch.float64)
    opt64 = make(prob64.params)
    opt64.load_state_dict(sd)
    for p in prob64.params:
        for key, value in opt64.state[p].items():
            if value.is_floating_point() and key != "step":  # torch never casts "step"
                assert value.dtype == torch.float64, key
    _train(opt64, prob64, 1)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        make([{"params": [prob.w]}, {"params": [prob.b]}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="doesn't match the size"):
        make([prob.w]).load_state_dict(sd)


def test_hooks(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd"))
    _train(opt, prob, 1)
    opt.state_dict()
    assert calls == ["pre", "post", "sd"]


def test_deepcopy_pickle_repr(make) -> None:
    prob = Problem()
    opt = make(prob.params)
    _train(opt, prob, 2)
    prob2, opt2 = copy.deepcopy((prob, opt))
    prob3, opt3 = pickle.loads(pickle.dumps((prob, opt)))
    for other in (opt2, opt3):
        assert type(other.rule) is type(opt.rule) and other.rule is not opt.rule
        for a, b in zip(opt.rule.state_dict().values(), other.rule.state_dict().values()):
            assert torch.equal(a, b)
    for p_, o_ in ((prob, opt), (prob2, opt2), (prob3, opt3)):
        _train(o_, p_, 2)
    for a, b, c in zip(prob.params, prob2.params, prob3.params):
        assert torch.equal(a, b) and torch.equal(a, c)
    text = repr(opt)
    assert type(opt).__name__ in text and opt.rule.name in text and "lr" in text


def test_float64_keeps_float64_state(make) -> None:
    prob = Problem(dtype=torch.float64)
    opt = make(prob.params)
    _train(opt, prob, 2)
    for p in prob.params:
        assert p.dtype == torch.float64
        for key, value in opt.state[p].items():
            if value.is_floating_point():
                assert value.dtype == torch.float64, key


def test_non_contiguous_params(make) -> None:
    prob_a, prob_b = Problem(), Problem()
    with torch.no_grad():
        prob_b.w = torch.nn.Parameter(prob_a.w.detach().t().contiguous().t())  # same values, transposed layout
    assert not prob_b.w.is_contiguous()
    opt_a, opt_b = make(prob_a.params), make(prob_b.params)
    _train(opt_a, prob_a, 3)
    _train(opt_b, prob_b, 3)
    torch.testing.assert_close(prob_a.w.detach(), prob_b.w.detach())


def test_maximize_equals_negated_gradient(make) -> None:
    prob_a, prob_b = Problem(), Problem()
    opt_a = make(prob_a.params, maximize=True)
    opt_b = make(prob_b.params)
    for _ in range(3):
        prob_a.backward()
        prob_b.backward()
        for p in prob_b.params:
            p.grad.neg_()
        opt_a.step()
        opt_b.step()
    for a, b in zip(prob_a.params, prob_b.params):
        assert torch.equal(a, b)


def test_weight_decay_is_coupled(make) -> None:
    prob_a, prob_b = Problem(), Problem()
    opt_a = make(prob_a.params, weight_decay=0.1)
    opt_b = make(prob_b.params)
    for _ in range(3):
        prob_a.backward()
        prob_b.backward()
        with torch.no_grad():
            for p in prob_b.params:
                p.grad.add_(p, alpha=0.1)
        opt_a.step()
        opt_b.step()
    for a, b in zip(prob_a.params, prob_b.params):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.25, total_iters=3),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 0.5**epoch),
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
    ],
    ids=["StepLR", "ExponentialLR", "LinearLR", "LambdaLR", "ReduceLROnPlateau"],
)
def test_lr_schedulers(make, make_scheduler) -> None:
    prob = Problem()
    opt = make(prob.params)
    lr0 = opt.param_groups[0]["lr"]
    sched = make_scheduler(opt)
    for _ in range(3):
        _train(opt, prob, 1)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # no improvement: reduce
        else:
            sched.step()
    assert opt.param_groups[0]["lr"] < lr0
    assert all(torch.isfinite(p).all() for p in prob.params)


def test_grad_scaler(make) -> None:
    prob_a, prob_b = Problem(), Problem()
    opt_a, opt_b = make(prob_a.params), make(prob_b.params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        opt_a.zero_grad()
        scaler.scale(prob_a.loss()).backward()
        scaler.step(opt_a)
        scaler.update()
        _train(opt_b, prob_b, 1)
    for a, b in zip(prob_a.params, prob_b.params):
        torch.testing.assert_close(a, b)


def test_nonfinite_gradient_skips_group_counts_and_warns_once(make) -> None:
    prob = Problem()
    other = torch.nn.Parameter(torch.ones(2))
    opt = make([{"params": prob.params}, {"params": [other]}])
    _train(opt, prob, 1)
    before = _snapshot(prob)
    state_before = copy.deepcopy(opt.state_dict()["state"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in (float("nan"), float("inf")):
            prob.backward()
            prob.b.grad[0] = bad
            other.grad = torch.ones(2)
            opt.step()
    assert sum("non-finite gradient" in str(w.message) for w in caught) == 1
    for b, p in zip(before, prob.params):
        assert torch.equal(p.detach(), b)
    assert not torch.equal(other.detach(), torch.ones(2)) or isinstance(opt, LSTMOptimizer)
    assert float(opt.state[prob.w]["nonfinite_skips"]) == 2
    for idx, p in enumerate(prob.params):
        for key, value in opt.state[p].items():
            assert torch.isfinite(value).all()
            if key != "nonfinite_skips":
                assert torch.equal(value, state_before[idx][key])


def test_sparse_gradients_rejected(make) -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    opt = make(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_params_clear_error(make) -> None:
    with pytest.raises(ValueError, match="does not support"):
        make([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_bad_params_like_torch(make) -> None:
    for bad in (torch.zeros(2), []):
        with pytest.raises((TypeError, ValueError)) as ours:
            make(bad)
        with pytest.raises((TypeError, ValueError)) as theirs:
            torch.optim.SGD(bad, lr=0.1)
        assert type(ours.value) is type(theirs.value)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_lr_and_weight_decay(make, value) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="invalid lr"):
        make([p], lr=value)
    with pytest.raises(ValueError, match="invalid weight_decay"):
        make([p], weight_decay=value)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (GradNormDecaySGD, {"decay": 1.5}, "invalid decay: 1.5"),
        (GradNormDecaySGD, {"decay": 0.0}, "invalid decay: 0.0"),
        (GradNormDecaySGD, {"threshold": -1e-3}, "invalid threshold"),
        (GradNormDecaySGD, {"momentum": 1.0}, "invalid momentum"),
        (GradNormDecaySGD, {"momentum": float("nan")}, "invalid momentum"),
        (HypergradientSGD, {"hyper_lr": -1.0}, "invalid hyper_lr"),
        (HypergradientSGD, {"hyper_lr": float("nan")}, "invalid hyper_lr"),
        (HypergradientAdam, {"betas": (0.9, 1.0)}, r"invalid betas\[1\]"),
        (HypergradientAdam, {"betas": (-0.1, 0.9)}, r"invalid betas\[0\]"),
        (HypergradientAdam, {"eps": -1e-8}, "invalid eps"),
        (LSTMOptimizer, {"weights": None, "lr": float("nan")}, "invalid lr"),
    ],
)
def test_bad_hyperparameters(cls, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_unknown_hyperparameter_for_rule() -> None:
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        LearnedOptimizer([torch.nn.Parameter(torch.zeros(2))], LSTMRule(), momentum=0.9)


def test_state_dict_of_another_rule_is_rejected() -> None:
    prob = Problem()
    opt = HypergradientSGD(prob.params)
    _train(opt, prob, 1)
    with pytest.raises(ValueError, match="state_dict is for rule 'hypergradient-sgd', this optimizer runs 'lstm'"):
        LSTMOptimizer(prob.params, weights=copy.deepcopy(LSTM_RULE)).load_state_dict(opt.state_dict())


def test_sha256_mismatch_warns_on_load() -> None:
    prob = Problem()
    opt = LSTMOptimizer(prob.params, weights=copy.deepcopy(LSTM_RULE))
    opt.weights_sha256 = "a" * 64
    _train(opt, prob, 1)
    other = LSTMOptimizer(prob.params, weights=copy.deepcopy(LSTM_RULE))
    other.weights_sha256 = "b" * 64
    with pytest.warns(UserWarning, match="sha256"):
        other.load_state_dict(opt.state_dict())
    other.weights_sha256 = "a" * 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(opt.state_dict())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(make) -> None:
    """Params on the GPU (the rule module stays on the CPU): same trajectory as on the CPU."""
    prob_cpu, prob_gpu = Problem(dtype=torch.float64), Problem(dtype=torch.float64)
    for name in ("x", "y"):
        setattr(prob_gpu, name, getattr(prob_gpu, name).cuda())
    prob_gpu.w = torch.nn.Parameter(prob_gpu.w.detach().cuda())
    prob_gpu.b = torch.nn.Parameter(prob_gpu.b.detach().cuda())
    opt_cpu, opt_gpu = make(prob_cpu.params), make(prob_gpu.params)
    _train(opt_cpu, prob_cpu, 5)
    _train(opt_gpu, prob_gpu, 5)
    for a, b in zip(prob_cpu.params, prob_gpu.params):
        torch.testing.assert_close(a.detach(), b.detach().cpu())
    for value in opt_gpu.state[prob_gpu.w].values():
        assert value.device.type == "cuda"


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda ps: LSTMOptimizer(ps, weights=None), 320),
        (lambda ps: GradNormDecaySGD(ps), 0),
        (lambda ps: GradNormDecaySGD(ps, momentum=0.9), 4),
        (lambda ps: GradNormDecayAdam(ps), 8),
        (lambda ps: HypergradientSGD(ps), 4),
        (lambda ps: HypergradientSGD(ps, momentum=0.9), 8),
        (lambda ps: HypergradientAdam(ps), 12),
        (lambda ps: RelativeAdam(ps), 8),
        (lambda ps: RelativeAdam(ps, schedule_free=True), 8),
        (lambda ps: LearnedOptimizer(ps, LearnedRelativeAdamRule()), 12),
        (lambda ps: LearnedOptimizer(ps, LearnedRelativeAdamRule(schedule_free=True)), 12),
    ],
)
def test_state_bytes_per_parameter(factory, expected) -> None:
    """The table in docs/optimizers.md: state bytes per float32 parameter element."""
    p = torch.nn.Parameter(torch.randn(7, 11))
    opt = factory([p])
    p.grad = torch.randn_like(p)
    opt.step()
    per_param = [v for v in opt.state[p].values() if v.shape[: p.dim()] == p.shape]
    assert sum(v.numel() * v.element_size() for v in per_param) / p.numel() == expected


def test_late_joining_parameter_with_zero_gradient_does_not_move(make) -> None:
    """A parameter whose grad was None for a while (frozen, then unfrozen) and then gets an all-zero
    gradient must not move, though the group's state has advanced meanwhile."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(torch.randn(4))
    opt = make([a, b])
    for _ in range(5):
        a.grad = torch.randn(5)
        opt.step()
    before = b.detach().clone()
    for _ in range(3):
        a.grad = torch.randn(5)
        b.grad = torch.zeros(4)
        opt.step()
    assert torch.equal(b.detach(), before)
