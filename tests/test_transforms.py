"""The per-step transforms (learned_opt.rules.transforms): one update path for the optimizer and
meta-training, weight decay of both kinds, the gradient bound, the non-finite guard on the host
and on the device, and float32 stepping of low-precision parameters."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import learned_opt
from learned_opt import adapter, optim
from learned_opt.meta.unroll import InnerRun, unroll
from learned_opt.optim import (
    GradNormDecaySGD,
    HypergradientAdam,
    HypergradientSGD,
    LearnedOptimizer,
    LSTMOptimizer,
    MLPOptimizer,
)
from learned_opt.rules import (
    GradNormDecayRule,
    HypergradientAdamRule,
    HypergradientSGDRule,
    LearnableAdamRule,
    LearnableSGDRule,
    Rule,
)
from learned_opt.rules import transforms
from learned_opt.rules.transforms import absolute_rate
from learned_opt.rules.hparam_base import HyperparameterRule
from meta_toys import ToyQuadratic
from test_optimizers import FACTORIES, LSTM_RULE, MLP_RULE, Problem


@pytest.fixture(params=["host", "device"])
def guard_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with the guard read on the host (the CPU's path) and masked on the device (a
    GPU's path, emulated on the CPU)."""
    if request.param == "device":
        monkeypatch.setattr(transforms, "host_read_is_free", lambda grads: False)
    return request.param


def _all_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


# --- one update path ---------------------------------------------------------------------------
def _rules() -> dict[str, Callable[[], Rule]]:
    return {
        "lstm": lambda: copy.deepcopy(LSTM_RULE),
        "mlp": lambda: copy.deepcopy(MLP_RULE),
        "grad-norm-decay-sgd": lambda: GradNormDecayRule(init_lr=0.05, init_threshold=0.5, momentum=0.5),
        "hypergradient-sgd": lambda: HypergradientSGDRule(init_lr=0.02, momentum=0.3),
        "hypergradient-adam": lambda: HypergradientAdamRule(init_lr=0.01, init_hyper_lr=1e-4),
        "learnable-adam": lambda: LearnableAdamRule(init_lr=0.01),
        "learnable-sgd": lambda: LearnableSGDRule(init_lr=0.02),
    }


def _float_hparams(rule: Rule) -> dict[str, Any]:
    """The rule's meta-training hyperparameters as the plain values an optimizer's group holds."""
    if isinstance(rule, HyperparameterRule):
        return rule.optimizer_defaults()
    return {k: float(v) if isinstance(v, torch.Tensor) else v for k, v in rule.meta_hparams().items()}


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("name", list(_rules()))
def test_optimizer_step_equals_meta_training_unroll(name: str, decoupled: bool, guard_path: str) -> None:
    """The same rule, state and gradients give the same update through the optimizer and through
    meta-training's unroll, weight decay on (each kind)."""
    rule = _rules()[name]()
    task = ToyQuadratic(seed=1, dim=5, noise=0.3, dtype=torch.float32)
    run = InnerRun.start(rule, task, label="toy", seed=2, horizon=10)
    data = run.draw_data(6, final=False)
    step = {**_float_hparams(rule), "weight_decay": 0.05, "decoupled_weight_decay": decoupled}
    out = unroll(rule, task, run.params, run.state, data, mode="none", hparams=step)

    params = [torch.nn.Parameter(p.clone()) for p in run.params]
    opt = LearnedOptimizer(params, copy.deepcopy(rule), **step)
    for batch in data.batches:
        opt.zero_grad()
        task.loss(params, batch).backward()
        opt.step()
    assert torch.equal(params[0].detach(), out.params[0].detach())
    group_state, (per_param,) = out.state
    for key, value in {**group_state, **per_param}.items():
        assert torch.equal(opt.state[params[0]][key], value), key


def test_meta_gradient_flows_through_weight_decay() -> None:
    """Meta-training differentiates through the transforms: a tensor weight decay gets a gradient."""
    rule = LearnableAdamRule(init_lr=0.05)
    task = ToyQuadratic(seed=1, dim=4, dtype=torch.float32)
    run = InnerRun.start(rule, task, label="toy", seed=2, horizon=10)
    for decoupled in (False, True):
        wd = torch.tensor(0.1, requires_grad=True)
        hparams = {"weight_decay": wd, "decoupled_weight_decay": decoupled}
        out = unroll(rule, task, run.params, run.state, run.draw_data(4), mode="first", hparams=hparams)
        (wd_grad, lr_grad) = torch.autograd.grad(out.losses[-1], [wd, rule.log_lr])
        assert torch.isfinite(wd_grad) and wd_grad != 0
        assert torch.isfinite(lr_grad) and lr_grad != 0


# --- weight decay --------------------------------------------------------------------------------
def test_decoupled_weight_decay_adds_minus_lr_wd_p(make) -> None:
    """With decoupled decay a step is the rule's step plus ``-lr·init_lr·wd·p`` (``-lr·wd·p`` for rules
    without an ``init_lr``), for every optimizer."""
    prob_a, prob_b = Problem(), Problem()
    opt_a, opt_b = make(prob_a.params), make(prob_b.params)
    for opt, prob in ((opt_a, prob_a), (opt_b, prob_b)):
        for _ in range(2):
            prob.backward()
            opt.step()
    before = [p.detach().clone() for p in prob_a.params]
    opt_a.param_groups[0].update(weight_decay=0.1, decoupled_weight_decay=True)
    for opt, prob in ((opt_a, prob_a), (opt_b, prob_b)):
        prob.backward()
        opt.step()
    rate = absolute_rate(opt_a.param_groups[0])  # lr, times init_lr for the hyperparameter rules
    for a, b, p0 in zip(prob_a.params, prob_b.params, before):
        torch.testing.assert_close(a.detach() - b.detach(), -rate * 0.1 * p0)


@pytest.fixture(params=list(FACTORIES))
def make(request: pytest.FixtureRequest) -> Callable[..., LearnedOptimizer]:
    return FACTORIES[request.param]


def test_decoupled_hypergradient_adam_is_adamw() -> None:
    """Adam-HD without adaptation (hyper_lr=0) and decoupled decay is torch's AdamW."""
    prob_a, prob_b = Problem(), Problem()
    ours = HypergradientAdam(prob_a.params, init_lr=0.01, hyper_lr=0.0, weight_decay=0.2, decoupled_weight_decay=True)
    theirs = torch.optim.AdamW(prob_b.params, lr=0.01, weight_decay=0.2)
    for _ in range(5):
        for opt, prob in ((ours, prob_a), (theirs, prob_b)):
            prob.backward()
            opt.step()
    for a, b in zip(prob_a.params, prob_b.params):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "cls", [LSTMOptimizer, MLPOptimizer, GradNormDecaySGD, HypergradientSGD, HypergradientAdam]
)
def test_decoupled_weight_decay_must_be_bool(cls: type) -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    kwargs = {"weights": None} if cls in (LSTMOptimizer, MLPOptimizer) else {}
    with pytest.raises(ValueError, match="invalid decoupled_weight_decay"):
        cls([p], decoupled_weight_decay=1, **kwargs)
    opt = cls([p], **kwargs)
    with pytest.raises(ValueError, match="invalid decoupled_weight_decay"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "decoupled_weight_decay": "yes"})


def test_group_saved_before_decoupled_weight_decay_existed_loads_and_steps() -> None:
    prob = Problem()
    opt = HypergradientAdam(prob.params, weight_decay=0.1)
    prob.backward()
    opt.step()
    sd = opt.state_dict()
    del sd["param_groups"][0]["decoupled_weight_decay"]
    other = HypergradientAdam(prob.params, weight_decay=0.1)
    other.load_state_dict(sd)
    prob.backward()
    other.step()
    assert all(torch.isfinite(p).all() for p in prob.params)


# --- large finite gradients ------------------------------------------------------------------------
def _shipped(name: str) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    return lambda ps: learned_opt.load_optimizer(name, ps)


SHIPPED_AND_PUBLIC: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    **{name: _shipped(name) for name in learned_opt.list_pretrained()},
    "LSTMOptimizer": lambda ps: LSTMOptimizer(ps),
    "MLPOptimizer": lambda ps: MLPOptimizer(ps, weights=None),
    "HypergradientSGD": lambda ps: HypergradientSGD(ps),
    "HypergradientSGD-momentum": lambda ps: HypergradientSGD(ps, momentum=0.9),
    "HypergradientAdam": lambda ps: HypergradientAdam(ps),
    "GradNormDecaySGD": lambda ps: GradNormDecaySGD(ps, momentum=0.9),
}


@pytest.mark.parametrize("magnitude", [1e15, 1e19, 1e20, 3e38])
@pytest.mark.parametrize("name", list(SHIPPED_AND_PUBLIC))
def test_any_finite_gradient_gives_finite_params_and_state(name: str, magnitude: float, guard_path: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = SHIPPED_AND_PUBLIC[name]([w, b])
    for t in range(9):
        w.grad, b.grad = torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)
        if 2 <= t < 5:  # three huge steps in a row, then ordinary ones again
            w.grad = torch.where(w.grad < 0, -magnitude, magnitude)
        opt.step()
        assert torch.isfinite(w).all() and torch.isfinite(b).all(), t
        assert all(torch.isfinite(v).all() for v in _all_state(opt)), t
    if isinstance(opt, LearnedOptimizer):
        assert float(opt.state[w][optim.NONFINITE_KEY]) == 0  # bounded, not skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [1e3, 1e15, 1e20, 3e38])
def test_bound_rescales_only_norms_above_it(dtype: torch.dtype, value: float, guard_path: str) -> None:
    grads = [torch.full((50,), value, dtype=dtype), torch.ones(3, dtype=dtype)]
    check = transforms.check_gradients(grads, on_host=guard_path == "host")
    bounded = transforms.bound_gradients(grads, check)
    bound = transforms.norm_bound([dtype])
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(g.double())) ** 2 for g in grads))
    got = math.sqrt(sum(float(torch.linalg.vector_norm(g.double())) ** 2 for g in bounded))
    if norm <= bound:
        assert all(torch.equal(a, b) for a, b in zip(grads, bounded))
    else:
        assert 0 < got <= bound * (1 + 1e-6)
        assert bound / got < 100  # not rescaled further than needed (by at most sqrt(numel))


# --- the non-finite guard ----------------------------------------------------------------------------
def _trajectory_with_bad_steps(make: Callable[..., LearnedOptimizer]) -> tuple[list[torch.Tensor], Any]:
    prob = Problem()
    other = torch.nn.Parameter(torch.ones(2))
    opt = make([{"params": prob.params}, {"params": [other]}])
    gen = torch.Generator().manual_seed(1)
    for t in range(6):
        prob.backward()
        other.grad = torch.randn(2, generator=gen)
        if t in (2, 4):
            prob.b.grad[1] = float("nan") if t == 2 else -float("inf")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    return [p.detach().clone() for p in [*prob.params, other]], copy.deepcopy(opt.state_dict()["state"])


def test_device_guard_gives_the_host_guards_steps(make, monkeypatch: pytest.MonkeyPatch) -> None:
    """Masking on the device skips exactly the steps the host branch skips: same params, same
    state (the skip counters included)."""
    host_params, host_state = _trajectory_with_bad_steps(make)
    monkeypatch.setattr(transforms, "host_read_is_free", lambda grads: False)
    dev_params, dev_state = _trajectory_with_bad_steps(make)
    for a, b in zip(host_params, dev_params):
        assert torch.equal(a, b)
    assert host_state.keys() == dev_state.keys()
    for idx in host_state:
        assert host_state[idx].keys() == dev_state[idx].keys()
        for key, value in host_state[idx].items():
            assert torch.equal(value, dev_state[idx][key]), (idx, key)
    assert float(host_state[0][optim.NONFINITE_KEY]) == 2
    assert float(host_state[2][optim.NONFINITE_KEY]) == 0


def test_device_guard_warns_once_within_the_check_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transforms, "host_read_is_free", lambda grads: False)
    monkeypatch.setattr(adapter, "NONFINITE_CHECK_EVERY", 4)  # read where the adapter steps
    prob = Problem()
    opt = HypergradientAdam(prob.params)
    caught_at = []
    for t in range(12):
        prob.backward()
        if t in (1, 6):
            prob.w.grad[0, 0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        caught_at += [t] * sum("non-finite gradient" in str(w.message) for w in caught)
    assert caught_at == [3]  # the 4th step reads the counters; the warning is not repeated


def test_gradients_pass_guard_only_when_the_guard_would_leave_them_alone() -> None:
    """True when all are finite and their joint norm is within the bound (then every subset's is)."""
    bound = transforms.norm_bound({torch.float32})
    small = [torch.ones(3), torch.full((2,), 0.5)]
    assert transforms.gradients_pass_guard(small) and transforms.gradients_pass_guard([])
    assert not transforms.gradients_pass_guard([torch.ones(3), torch.tensor([float("nan")])])
    assert not transforms.gradients_pass_guard([torch.tensor([float("-inf"), 1.0])])
    assert not transforms.gradients_pass_guard([torch.full((4,), bound / 1.5)])  # each entry within, the norm not
    check = transforms.check_gradients([torch.full((4,), bound / 1.5)], on_host=True)
    assert check.scale is not None and float(check.scale) < 1


def test_checked_gradients_that_a_transform_changes_are_checked_anyway() -> None:
    """``checked`` vouches for the gradients as given: coupled weight decay on a huge parameter makes a
    gradient beyond the bound, which is still rescaled, exactly as without ``checked``."""
    from learned_opt.rules.grad_norm_decay import GradNormDecayRule

    rule = GradNormDecayRule()
    x = torch.tensor([1e20, -2e20, 0.5])
    grads = [torch.tensor([0.1, 0.2, 0.3])]
    assert transforms.gradients_pass_guard(grads)
    hparams = {**rule.hyperparameters, "weight_decay": 1e15}
    plain = transforms.apply_update(rule, grads, [x], rule.init_state([x]), hparams)
    vouched = transforms.apply_update(rule, grads, [x], rule.init_state([x]), hparams, checked=True)
    assert torch.equal(plain.updates[0], vouched.updates[0])
    unbounded = (grads[0] + 1e15 * x) * -0.1
    assert vouched.updates[0].abs().max() < unbounded.abs().max() / 1e3  # rescaled to the bound


def test_guard_keeps_the_meta_gradient_finite(guard_path: str) -> None:
    """A skipped step under autograd: zero updates, the old state, and finite meta-gradients."""
    rule = HypergradientAdamRule(init_lr=0.05, init_hyper_lr=1e-3)
    x = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    state = rule.init_state([x])
    hparams = {**rule.meta_hparams(), "weight_decay": 0.1, "decoupled_weight_decay": True}
    first = transforms.apply_update(rule, [torch.tensor([0.3, 0.2, -0.1])], [x], state, hparams)
    bad = transforms.apply_update(rule, [torch.tensor([1.0, float("inf"), 0.0])], [x], first.state, hparams)
    assert not bool(bad.finite) and bad.skipped in (True, None)
    assert torch.equal(bad.updates[0], torch.zeros(3))
    for key, value in bad.state[1][0].items():
        assert torch.equal(value, first.state[1][0][key])
    total = (x + first.updates[0] + bad.updates[0]).sum() + sum(v.sum() for v in bad.state[1][0].values())
    grads = torch.autograd.grad(total, list(rule.parameters()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# --- low-precision parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_step_in_float32(make, dtype: torch.dtype) -> None:
    """A bf16/f16 parameter's state is float32 and its step is the float32 step of the same
    values, rounded once into the parameter."""
    gen = torch.Generator().manual_seed(3)
    low = torch.nn.Parameter(torch.randn(4, 3, generator=gen).to(dtype))
    twin = torch.nn.Parameter(low.detach().float())
    opt_low, opt_twin = make([low]), make([twin])
    for _ in range(4):
        grad = torch.randn(4, 3, generator=gen).to(dtype)
        low.grad, twin.grad = grad, grad.float()
        with torch.no_grad():
            twin.copy_(low.float())
        opt_low.step()
        opt_twin.step()
        assert low.dtype == dtype
        assert torch.equal(low.detach(), twin.detach().to(dtype))
        for key, value in opt_twin.state[twin].items():
            assert opt_low.state[low][key].dtype == value.dtype
            assert torch.equal(opt_low.state[low][key], value), key


def test_low_precision_state_cast_down_by_loading_is_stepped_in_float32() -> None:
    """torch's load_state_dict casts state to the parameter's dtype; the next step restores float32."""
    p = torch.nn.Parameter(torch.randn(5).to(torch.bfloat16))
    opt = HypergradientAdam([p], lr=0.01)
    p.grad = torch.randn(5).to(torch.bfloat16)
    opt.step()
    other = HypergradientAdam([p], lr=0.01)
    other.load_state_dict(opt.state_dict())
    assert other.state[p]["exp_avg"].dtype == torch.bfloat16
    other.step()
    assert all(v.dtype == torch.float32 for v in other.state[p].values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_never_waits_for_the_device() -> None:
    """On a GPU the guard masks on the device: a step (good or bad gradient) makes no host sync."""
    p = torch.nn.Parameter(torch.randn(64, device="cuda"))
    opt = HypergradientAdam([p], lr=0.01)
    try:
        for t in range(3):
            p.grad = torch.randn(64, device="cuda")
            if t == 1:
                p.grad[0] = float("nan")
            torch.cuda.set_sync_debug_mode("error")
            opt.step()
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(opt.state[p][optim.NONFINITE_KEY]) == 1
