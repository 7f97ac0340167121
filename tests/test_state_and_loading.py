"""Optimizer state that cannot be stepped is refused at load time; hyperparameters are numbers; the
weights' card survives copies."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import learned_opt
from learned_opt.optim import (
    GradNormDecaySGD,
    HypergradientAdam,
    HypergradientSGD,
    LearnedOptimizer,
    LSTMOptimizer,
    MLPOptimizer,
)
from learned_opt.rules import LearnableAdamRule, LSTMRule
from learned_opt.weights import save_weights

OPTIMIZERS: dict[str, Callable[..., LearnedOptimizer]] = {
    "LSTMOptimizer": lambda params, **kw: LSTMOptimizer(params, weights=None, **kw),
    "MLPOptimizer": lambda params, **kw: MLPOptimizer(params, weights=None, **kw),
    "HypergradientAdam": lambda params, **kw: HypergradientAdam(params, **kw),
    "HypergradientSGD": lambda params, **kw: HypergradientSGD(params, **{"momentum": 0.5, **kw}),
    "GradNormDecaySGD": lambda params, **kw: GradNormDecaySGD(params, **{"momentum": 0.5, **kw}),
    "learnable-adam": lambda params, **kw: LearnedOptimizer(params, LearnableAdamRule(), **kw),
}


@pytest.fixture(params=list(OPTIMIZERS))
def make(request: pytest.FixtureRequest) -> Callable[..., LearnedOptimizer]:
    return OPTIMIZERS[request.param]


def _stepped(opt: torch.optim.Optimizer, steps: int = 2) -> torch.optim.Optimizer:
    for _ in range(steps):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
    return opt


def _params(*shapes: tuple[int, ...]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]


def _state_of(opt: torch.optim.Optimizer) -> dict:
    return {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}


def _assert_same_state(opt: torch.optim.Optimizer, before: dict) -> None:
    after = _state_of(opt)
    assert after.keys() == before.keys()
    for key, st in before.items():
        assert st.keys() == after[key].keys() and all(torch.equal(v, after[key][k]) for k, v in st.items())


@pytest.mark.parametrize("foreign", [torch.optim.Adam, torch.optim.SGD], ids=["Adam", "SGD"])
def test_another_optimizers_state_is_refused_at_load(make, foreign) -> None:
    """torch's Adam/SGD state used to load, then step() died with KeyError."""
    theirs = _stepped(foreign(_params((3, 4), (4,)), lr=0.1, momentum=0.9) if foreign is torch.optim.SGD
                      else foreign(_params((3, 4), (4,)), lr=0.1))
    ours = _stepped(make(_params((3, 4), (4,))), 1)
    before = _state_of(ours)
    with pytest.raises(ValueError, match=r"state_dict param group 0.*(lacks hyperparameters|not a state of rule)"):
        ours.load_state_dict(theirs.state_dict())
    _assert_same_state(ours, before)  # nothing was loaded
    _stepped(ours, 1)


def test_fresh_state_of_another_class_lacking_hyperparameters_is_refused() -> None:
    adam = torch.optim.Adam(_params((3,)), lr=0.1)  # no per-parameter state yet
    with pytest.raises(ValueError, match=r"param group 0 lacks hyperparameters \['hyper_lr', 'init_lr', 'normalized'\]"):
        HypergradientAdam(_params((3,))).load_state_dict(adam.state_dict())


def test_another_rules_state_without_its_label_is_refused() -> None:
    """The rule label can be stripped (or absent in hand-made states): the state itself is checked.
    The MLP and LSTM optimizers share their hyperparameter keys, so only the state tells them apart."""
    sd = _stepped(MLPOptimizer(_params((3,)), weights=None)).state_dict()
    del sd["learned_opt"]
    with pytest.raises(ValueError, match=r"not a state of rule 'lstm'.*missing keys \['c', 'h', 'ref_c', 'ref_h'\]"):
        LSTMOptimizer(_params((3,)), weights=None).load_state_dict(sd)
    sd = _stepped(HypergradientSGD(_params((3,)), momentum=0.5)).state_dict()
    del sd["learned_opt"]
    with pytest.raises(ValueError, match=r"lacks hyperparameters \['cooldown', 'decay', 'patience', 'relative', 'threshold'\]"):
        GradNormDecaySGD(_params((3,)), momentum=0.5).load_state_dict(sd)


def test_state_for_other_shapes_is_refused(make) -> None:
    """LSTM state of a (3, 4) parameter used to load into a (4, 3) one."""
    sd = _stepped(make(_params((3, 4)))).state_dict()
    target = make(_params((4, 3)))
    with pytest.raises(ValueError, match=r"parameter 0: not a state of rule .* shape \(4, 3\)"):
        target.load_state_dict(sd)
    assert not target.state


def test_momentum_buffer_of_another_shape_is_refused() -> None:
    """Keys beyond init_state's (a momentum buffer) are per-coordinate: shaped like the parameter."""
    sd = _stepped(GradNormDecaySGD(_params((3, 4)), momentum=0.5)).state_dict()
    sd["state"][0]["momentum_buffer"] = torch.zeros(12)
    with pytest.raises(ValueError, match=r"momentum_buffer: \(12,\) vs \(3, 4\)"):
        GradNormDecaySGD(_params((3, 4)), momentum=0.5).load_state_dict(sd)


def test_invalid_hyperparameter_in_loaded_group_is_refused() -> None:
    sd = _stepped(HypergradientAdam(_params((3,)))).state_dict()
    sd["param_groups"][0]["lr"] = "0.1"
    with pytest.raises(ValueError, match=r"state_dict param group 0: invalid lr: '0\.1'"):
        HypergradientAdam(_params((3,))).load_state_dict(sd)


def test_own_states_still_load_with_scheduler_keys_and_late_params(make) -> None:
    """A scheduler's ``initial_lr`` and parameters that never had a gradient (no state) are fine."""
    params = _params((3, 4), (2,))
    opt = make(params)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    params[0].grad = torch.ones(3, 4)
    opt.step()
    sd = opt.state_dict()
    assert "initial_lr" in sd["param_groups"][0] and 1 not in sd["state"]
    other = make(_params((3, 4), (2,)))
    other.load_state_dict(sd)
    _stepped(other, 1)


@pytest.mark.parametrize("value", ["0.1", True, None, [0.1]])
def test_lr_must_be_a_number(make, value) -> None:
    """torch refuses lr="0.1" at once; it used to be accepted here and fail cryptically at step()."""
    with pytest.raises(ValueError, match=rf"invalid lr: {value!r}".replace("[", r"\[").replace(".", r"\.")):
        make(_params((2,)), lr=value)


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (GradNormDecaySGD, {"decay": "0.9"}, "invalid decay: '0.9'"),
        (GradNormDecaySGD, {"threshold": True}, "invalid threshold: True"),
        (GradNormDecaySGD, {"momentum": "0"}, "invalid momentum: '0'"),
        (HypergradientSGD, {"hyper_lr": "1e-3"}, "invalid hyper_lr: '1e-3'"),
        (HypergradientSGD, {"normalized": 1}, "invalid normalized: 1"),
        (HypergradientAdam, {"betas": ("0.9", 0.999)}, r"invalid betas\[0\]: '0.9'"),
        (HypergradientAdam, {"betas": 0.9}, "invalid betas: 0.9"),
        (HypergradientAdam, {"eps": None}, "invalid eps: None"),
        (HypergradientAdam, {"weight_decay": "0"}, "invalid weight_decay: '0'"),
        (HypergradientAdam, {"maximize": 1}, "invalid maximize: 1"),
    ],
)
def test_numeric_hyperparameters_must_be_numbers(cls, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        cls(_params((2,)), **kwargs)


def test_numbers_of_other_types_are_still_numbers() -> None:
    import numpy as np

    opt = HypergradientAdam(_params((2,)), lr=1, hyper_lr=np.float32(1e-7), betas=[0.9, np.float64(0.99)], eps=0)
    _stepped(opt, 1)
    LSTMOptimizer(_params((2,)), lr=torch.tensor(0.5), weights=None)


def _lstm_weights(tmp_path: Path) -> Path:
    return save_weights(LSTMRule(hidden_size=4), tmp_path / "l", name="l", meta_training={})


@pytest.mark.parametrize("via", ["LSTMOptimizer", "load_optimizer"])
def test_card_survives_deepcopy_and_pickle(tmp_path: Path, via: str) -> None:
    path = _lstm_weights(tmp_path)
    params = _params((3,))
    opt = LSTMOptimizer(params, weights=path) if via == "LSTMOptimizer" else learned_opt.load_optimizer(path, params)
    assert opt.card is not None and opt.card["name"] == "l"
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.card == opt.card and other.weights_sha256 == opt.weights_sha256
        _stepped(other, 1)


def test_a_hypergradient_state_saved_before_the_guard_loads_and_steps_as_then():
    """A HypergradientSGD state saved before the blow-up guard's settings and ``norm_avg`` existed
    loads with the guard off (the earlier rule) and continues exactly as the optimizer that saved it."""
    params = _params((3,), (2,))
    opt = HypergradientSGD(params, momentum=0.5, blowup=0.0)  # as the class stepped before the guard
    _stepped(opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in ("blowup", "smoothing", "blowup_decay", "blowup_recovery", "max_factor"):
            del group[key]
    for st in sd["state"].values():
        del st["norm_avg"], st["guard_debt"]
    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = HypergradientSGD(resumed_params, momentum=0.5)  # the saved groups' settings win
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["blowup"] == 0.0
    _stepped(opt, 3)
    _stepped(resumed, 3)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


def test_a_decay_state_saved_before_the_trigger_settings_loads_and_steps_as_then():
    """A GradNormDecaySGD state saved before ``reference``/``smoothing``/``blowup``/``plateau`` and
    the ``norm_avg``/``norm_best`` state existed loads (those take the defaults, the earlier rule) and continues
    exactly as the optimizer that saved it."""
    def run(opt, params, steps, start):
        for t in range(start, start + steps):
            for p in params:
                p.grad = torch.full_like(p, 0.5 ** t)
            opt.step()

    params = _params((3,), (2,))
    opt = GradNormDecaySGD(params, threshold=0.5, patience=1, cooldown=0, momentum=0.5, plateau=False)
    run(opt, params, 3, 0)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        for key in ("reference", "smoothing", "blowup", "plateau"):
            del group[key]
    for st in sd["state"].values():
        del st["norm_avg"], st["norm_best"]
    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    resumed = GradNormDecaySGD(resumed_params, threshold=0.5, patience=1, cooldown=0, momentum=0.5)
    assert resumed.param_groups[0]["plateau"] is True  # today's default; the saved state predates it
    resumed.load_state_dict(sd)
    group = resumed.param_groups[0]
    assert group["reference"] == "first" and group["blowup"] == 0.0 and group["plateau"] is False
    run(opt, params, 4, 3)
    run(resumed, resumed_params, 4, 3)
    assert float(opt.group_state(0)["decay_count"]) > 1
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    assert float(resumed.group_state(0)["decay_count"]) == float(opt.group_state(0)["decay_count"])
