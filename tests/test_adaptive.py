"""The adaptive-rate rules (issue 13): one meaning of ``lr``, scale-free hypergradient defaults and
their interplay with a schedule, and the scale-free gradient-norm decay."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import learned_opt
from learned_opt.optim import (
    GradNormDecayAdam,
    GradNormDecaySGD,
    HypergradientAdam,
    HypergradientSGD,
    LSTMOptimizer,
    RelativeAdam,
)
from test_optimizers import Problem

Factory = Callable[..., torch.optim.Optimizer]


# --- one meaning of lr -----------------------------------------------------------------------------
def _shipped(name: str) -> Factory:
    return lambda params, **kw: learned_opt.load_optimizer(name, params, **kw)


LR_MULTIPLIED: dict[str, Factory] = {
    **{name: _shipped(name) for name in learned_opt.list_pretrained()},
    "LSTMOptimizer": lambda params, **kw: LSTMOptimizer(params, weights=None, **kw),
    "RelativeAdam": RelativeAdam,
    "GradNormDecaySGD": GradNormDecaySGD,
    "GradNormDecayAdam": GradNormDecayAdam,
    "HypergradientSGD": HypergradientSGD,
    "HypergradientAdam": HypergradientAdam,
}


def _first_update(make: Factory, **kwargs: float) -> torch.Tensor:
    """The first step from zero (so the parameter after it is the update, with no rounding)."""
    torch.manual_seed(0)  # the same untrained LSTM every time
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = make([p], **kwargs)
    p.grad = torch.linspace(-2.0, 3.0, 12).reshape(4, 3)
    opt.step()
    return p.detach().clone()


def test_every_shipped_name_is_covered() -> None:
    assert set(learned_opt.list_pretrained()) <= set(LR_MULTIPLIED)


@pytest.mark.parametrize("name", list(LR_MULTIPLIED))
def test_lr_multiplies_the_optimizers_own_rate(name: str) -> None:
    """``lr=0.5`` is exactly half the first update of ``lr=1.0``, which is the default."""
    make = LR_MULTIPLIED[name]
    full, half, default = _first_update(make, lr=1.0), _first_update(make, lr=0.5), _first_update(make)
    assert full.abs().sum() > 0
    assert torch.equal(half * 2, full)
    assert torch.equal(default, full)


def test_shipped_lr_no_longer_replaces_the_learned_rate() -> None:
    """``load_optimizer("learnable-adam", lr=0.5)`` used to run Adam at 0.5, not half its rate."""
    rule, _ = learned_opt.weights.load_rule("learnable-adam")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = learned_opt.load_optimizer("learnable-adam", [p], lr=0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * float(rule.log_lr.detach().exp()), rel=1e-6)


# --- scale-free hypergradient defaults -------------------------------------------------------------
def _least_squares(seed: int = 0) -> tuple[torch.nn.Parameter, Callable[[], torch.Tensor]]:
    """The issue's example: a 10×5 least-squares problem with loss ~150 at x = 0."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(10, 5, generator=g), 5.5 * torch.randn(10, generator=g)
    x = torch.nn.Parameter(torch.zeros(5))
    return x, lambda: 0.5 * ((a @ x - b) ** 2).sum()


def _least_squares_run(make: Factory, steps: int = 30) -> tuple[float, float]:
    x, loss = _least_squares()
    opt = make([x])
    first = float(loss().detach())
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return first, float(loss().detach())


def test_least_squares_example_converges_at_the_defaults() -> None:
    """At lr 0.05 torch's SGD converges; so does normalized SGD-HD/Adam-HD; the paper's β diverges."""
    first, sgd = _least_squares_run(lambda ps: torch.optim.SGD(ps, lr=0.05))
    assert 100 < first < 200 and sgd < 0.6 * first
    for make in (lambda ps: HypergradientSGD(ps, init_lr=0.05), lambda ps: HypergradientAdam(ps, init_lr=0.05),
                 HypergradientSGD, HypergradientAdam):
        _, last = _least_squares_run(make)
        assert math.isfinite(last) and last < first
    _, ours = _least_squares_run(lambda ps: HypergradientSGD(ps, init_lr=0.05))
    assert ours <= sgd * 1.01
    _, paper = _least_squares_run(lambda ps: HypergradientSGD(ps, init_lr=0.05, normalized=False))
    assert not paper < first  # diverged (inf or nan)


@pytest.mark.parametrize("cls", [HypergradientSGD, HypergradientAdam])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hypergradient_defaults_converge_on_the_contract_problem(cls: type, seed: int) -> None:
    prob = Problem(seed)
    opt = cls(prob.params)
    first = float(prob.loss().detach())
    for _ in range(100):
        prob.backward()
        opt.step()
    assert float(prob.loss().detach()) < 0.4 * first


@pytest.mark.parametrize("cls", [HypergradientSGD, HypergradientAdam])
def test_cosine_schedule_sets_the_rate_at_the_end(cls: type) -> None:
    """Under a cosine decay to 0 the factor adapts mid-run but fades with the decay: over the last
    steps the effective rate is within 2× of the schedule's (it was 144× with the factor unfaded)."""
    steps = 200
    prob = Problem(0)
    opt = cls(prob.params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    factors = []
    for _ in range(steps):
        prob.backward()
        opt.step()
        sched.step()
        factors.append(float(opt.group_state(0)["lr_factor"]))
    assert max(factors) > 4  # it did adapt
    assert all(0.5 <= f <= 2 for f in factors[-5:])


# --- scale-free gradient-norm decay ----------------------------------------------------------------
def _norm_run(make: Factory, norms: list[float]) -> torch.optim.Optimizer:
    """Steps whose group gradient norm is each of ``norms`` (a fixed direction)."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = make([p])
    direction = torch.tensor([0.5, -0.5, 0.5, 0.5])
    for n in norms:
        p.grad = direction * n
        opt.step()
    return opt


def test_relative_decay_fires_on_the_runs_own_scale() -> None:
    """ρ = 0.5, patience 2, cool-down 1: fires at step 4 (norms 0.4, 0.3 below 0.5 × 1), the
    reference becomes 0.3, and the next firing needs two steps below 0.15 after the cool-down."""
    norms = [1.0, 0.8, 0.4, 0.3, 0.14, 0.1, 0.1, 0.2]
    for scale in (1.0, 1e-4, 1e4):
        opt = _norm_run(lambda ps: GradNormDecaySGD(ps, threshold=0.5, decay=0.5, patience=2, cooldown=1,
                                                         plateau=False),
                        [n * scale for n in norms])
        st = opt.group_state(0)
        assert float(st["decay_count"]) == 2 and float(st["lr_factor"]) == 0.25
        assert float(st["first_decay_step"]) == 4
        assert float(st["ref_norm"]) == pytest.approx(0.1 * scale)


def test_cooldown_holds_off_a_second_firing() -> None:
    opt = _norm_run(lambda ps: GradNormDecaySGD(ps, threshold=0.9, patience=1, cooldown=3, plateau=False),
                    [1.0, 0.5, 0.2, 0.1, 0.05, 0.01])
    assert float(opt.group_state(0)["decay_count"]) == 2  # steps 2 and 6 (3, 4, 5 cool down)


def test_absolute_rule_is_the_seeds_literal_rule() -> None:
    """relative=False: fires at every step below the threshold, in gradient units (not at 1e4 scale)."""
    opt = _norm_run(lambda ps: GradNormDecaySGD(ps, relative=False), [1.0, 5e-4, 5e-4, 2e-3])
    st = opt.group_state(0)
    assert float(st["decay_count"]) == 2 and float(st["lr_factor"]) == pytest.approx(0.81)
    assert float(st["first_decay_step"]) == 2


def test_never_fired_reports_first_decay_step_zero() -> None:
    opt = _norm_run(GradNormDecayAdam, [1.0, 0.9, 0.95])
    assert float(opt.group_state(0)["first_decay_step"]) == 0


def test_grad_norm_decay_adam_is_adam_until_it_fires() -> None:
    prob_a, prob_b = Problem(), Problem()
    ours = GradNormDecayAdam(prob_a.params, init_lr=0.01, threshold=0.0)
    theirs = torch.optim.Adam(prob_b.params, lr=0.01)
    for _ in range(10):
        for opt, prob in ((ours, prob_a), (theirs, prob_b)):
            prob.backward()
            opt.step()
    for a, b in zip(prob_a.params, prob_b.params):
        torch.testing.assert_close(a, b)


def test_peak_reference_fires_when_the_norm_falls_from_its_peak() -> None:
    """reference="peak": the norm rises to 4 and falls; ρ = 0.5 fires at the first step below 2
    (step 5), never against the first norm (1), and the reference is then that step's norm."""
    norms = [1.0, 2.0, 4.0, 3.0, 1.9, 1.5]
    for scale in (1.0, 1e-3, 1e3):
        scaled = [n * scale for n in norms]
        opt = _norm_run(lambda ps: GradNormDecaySGD(ps, threshold=0.5, decay=0.5, patience=1, cooldown=0,
                                                    reference="peak"), scaled)
        st = opt.group_state(0)
        assert float(st["decay_count"]) == 1 and float(st["first_decay_step"]) == 5
        assert float(st["ref_norm"]) == pytest.approx(1.9 * scale)
        first = _norm_run(lambda ps: GradNormDecaySGD(ps, threshold=0.5, decay=0.5, patience=1, cooldown=0), scaled)
        assert float(first.group_state(0)["decay_count"]) == 0


def test_smoothing_tests_the_running_average_of_the_norm() -> None:
    """smoothing 0.5: one low norm (0.1 after 1, 1) averages to 0.55, above ρ = 0.5, so it does not
    fire; a second low one (average 0.325) does."""
    make = lambda ps: GradNormDecaySGD(ps, threshold=0.5, patience=1, cooldown=0, smoothing=0.5,  # noqa: E731
                                       plateau=False)
    assert float(_norm_run(make, [1.0, 1.0, 0.1]).group_state(0)["decay_count"]) == 0
    st = _norm_run(make, [1.0, 1.0, 0.1, 0.1]).group_state(0)
    assert float(st["decay_count"]) == 1 and float(st["norm_avg"]) == pytest.approx(0.325)


@pytest.mark.parametrize("cls", [GradNormDecaySGD, GradNormDecayAdam])
def test_plateau_counts_only_steps_without_a_new_low(cls: type) -> None:
    """plateau, ρ 1, patience 2, cool-down 0: a norm falling step after step never fires; one that
    stops making new lows fires at its second step without one (step 5 of 1, .8, .6, .7, .65), and
    the lowest norm is then that step's, so the next firing needs two more steps without a new low
    (and, the reference now being that step's norm, below it)."""
    make = lambda ps: cls(ps, threshold=1.0, decay=0.5, patience=2, cooldown=0, plateau=True)  # noqa: E731
    falling = [0.9**k for k in range(40)]
    assert float(_norm_run(make, falling).group_state(0)["decay_count"]) == 0
    without = lambda ps: cls(ps, threshold=1.0, decay=0.5, patience=2, cooldown=0, plateau=False)  # noqa: E731
    assert float(_norm_run(without, falling).group_state(0)["decay_count"]) == 19
    st = _norm_run(make, [1.0, 0.8, 0.6, 0.7, 0.65]).group_state(0)
    assert float(st["decay_count"]) == 1 and float(st["first_decay_step"]) == 5
    assert float(st["norm_best"]) == pytest.approx(0.65)
    st = _norm_run(make, [1.0, 0.8, 0.6, 0.7, 0.65, 0.5, 0.55, 0.6]).group_state(0)
    assert float(st["decay_count"]) == 2 and float(st["lr_factor"]) == 0.25


def test_plateau_first_step_is_a_new_low_and_switching_it_on_mid_run_is_exact() -> None:
    """The first step is a new low (the seeds' rule with patience 1 fires there without the plateau
    test, not with it); the lowest norm is tracked with the test off, so switching it on mid-run on
    a falling norm fires nothing; a state saved without ``norm_best`` starts its lowest afresh."""
    literal = dict(relative=False, threshold=1e-3, patience=1, cooldown=0)
    assert float(_norm_run(lambda ps: GradNormDecaySGD(ps, plateau=False, **literal), [1e-4])
                 .group_state(0)["decay_count"]) == 1
    assert float(_norm_run(lambda ps: GradNormDecaySGD(ps, plateau=True, **literal), [1e-4])
                 .group_state(0)["decay_count"]) == 0
    opt = _norm_run(lambda ps: GradNormDecaySGD(ps, threshold=2.0, patience=1, cooldown=0, plateau=False),
                    [1.0, 0.9, 0.8])  # fires at steps 2 and 3 (below 2 × the reference, no plateau test)
    fired = float(opt.group_state(0)["decay_count"])
    opt.param_groups[0]["plateau"] = True
    p = opt.param_groups[0]["params"][0]
    for n in (0.7, 0.6, 0.5):
        p.grad = torch.tensor([0.5, -0.5, 0.5, 0.5]) * n
        opt.step()
    assert float(opt.group_state(0)["decay_count"]) == fired
    sd = opt.state_dict()
    for st in sd["state"].values():
        del st["norm_best"]
    opt.load_state_dict(sd)
    p.grad = torch.tensor([0.5, -0.5, 0.5, 0.5]) * 0.45
    opt.step()  # a new low against a fresh lowest: no firing
    assert float(opt.group_state(0)["decay_count"]) == fired


def test_plateau_gate_is_exact_in_soft_mode_and_a_blowup_restarts_the_lowest() -> None:
    """Soft mode: a step with a new low passes weight 0 (factor unchanged, no meta-gradient); a
    stalled step passes the relaxed test with a gradient to the threshold. A blow-up firing sets
    the lowest norm to that step's average."""
    from learned_opt.rules.grad_norm_decay import GradNormDecayRule

    rule = GradNormDecayRule(init_threshold=2.0, relative=True, patience=1, cooldown=0, plateau=True, soft=True,
                             temperature=0.5)
    p = torch.zeros(4)
    state = rule.init_state([p])
    factors = []
    for n in (1.0, 0.8, 0.9):
        _, state = rule.update([torch.full((4,), n / 2)], [p], state, rule.meta_hparams())
        factors.append(state[0]["lr_factor"])
    def threshold_grad(factor: torch.Tensor) -> float:
        (grad,) = torch.autograd.grad(factor, rule.log_threshold, retain_graph=True, allow_unused=True)
        return 0.0 if grad is None else float(grad)

    assert float(factors[1].detach()) == 1.0 and threshold_grad(factors[1]) == 0.0
    assert float(factors[2].detach()) < 1.0 and threshold_grad(factors[2]) != 0.0
    make = lambda ps: GradNormDecaySGD(ps, threshold=0.01, patience=5, cooldown=0, smoothing=0.5,  # noqa: E731
                                       blowup=3.0, plateau=True)
    st = _norm_run(make, [1.0, 1.0, 0.9, 10.0]).group_state(0)
    assert float(st["decay_count"]) == 1 and float(st["norm_best"]) == pytest.approx(float(st["norm_avg"]))


def test_plateau_keeps_the_rate_of_a_deterministic_descent() -> None:
    """Plain gradient descent on an ill-conditioned quadratic: the norm falls at every step, the
    plateau form never decays and ends where constant SGD does, while the plain relative rule decays
    and ends far higher; with noisy gradients the plateau form still fires (as it does under
    heavy-ball momentum, whose norm oscillates: not what this test covers)."""
    scales = torch.logspace(0, 2, 20)
    def run(noise: float, **kw: object) -> tuple[float, float]:
        torch.manual_seed(0)
        x = torch.nn.Parameter(torch.ones(20))
        opt = GradNormDecaySGD([x], init_lr=0.009, **kw)
        for _ in range(300):
            x.grad = scales * x.detach() + noise * torch.randn(20)
            opt.step()
        return float((0.5 * scales * x.detach() ** 2).sum()), float(opt.group_state(0)["decay_count"])

    loss_plateau, fired_plateau = run(0.0, plateau=True)
    loss_plain, fired_plain = run(0.0, plateau=False)
    assert fired_plateau == 0 and fired_plain >= 2 and loss_plateau < 0.1 * loss_plain
    assert run(1.0, plateau=True, threshold=1.0)[1] >= 2


def test_blowup_fires_at_once_while_the_norm_outgrows_its_average() -> None:
    """blowup 3, smoothing 0.5: a norm above 3 × the previous average fires whatever the patience and
    cool-down, at each step a divergence outgrows the average (1, 1, 2.9, 10, 100: steps 4 and 5),
    but once for a jump to a level that then holds (1, 1, 5, 5, 5), as the average follows it."""
    make = lambda ps: GradNormDecaySGD(ps, threshold=0.3, decay=0.5, patience=5, cooldown=10,  # noqa: E731
                                       smoothing=0.5, blowup=3.0)
    st = _norm_run(make, [1.0, 1.0, 2.9, 10.0, 100.0]).group_state(0)
    assert float(st["decay_count"]) == 2 and float(st["first_decay_step"]) == 4
    assert float(st["lr_factor"]) == 0.25 and float(st["ref_norm"]) == 1.0
    assert float(st["norm_avg"]) == pytest.approx(0.5 * (0.5 * 1.95 + 5.0) + 50.0)
    st = _norm_run(make, [1.0, 1.0, 5.0, 5.0, 5.0, 5.0]).group_state(0)
    assert float(st["decay_count"]) == 1 and float(st["first_decay_step"]) == 3
    # under heavy smoothing (κ(1-β) < 1) a jump fires until the average catches up: 10× at β 0.9, κ 3
    heavy = lambda ps: GradNormDecaySGD(ps, threshold=0.3, patience=5, cooldown=10,  # noqa: E731
                                        smoothing=0.9, blowup=3.0)
    assert float(_norm_run(heavy, [1.0] * 4 + [10.0] * 10).group_state(0)["decay_count"]) == 3


def test_decay_blowup_cuts_are_given_back_but_plateau_decays_kept() -> None:
    """blowup 3, smoothing 0.5, recovery 1.1, decay 0.5: the spike at step 4 (1, 1, 2.9, 10) halves
    the factor and five quiet steps give back 1.1^5 of it; with recovery 1 the cut stays. A plateau
    firing (ρ 0.5, patience 1) is not given back."""
    norms = [1.0, 1.0, 2.9, 10.0] + [8.0] * 5
    def factor(**kw: float) -> float:
        make = lambda ps: GradNormDecaySGD(ps, threshold=0.01, decay=0.5, patience=5, cooldown=10,  # noqa: E731
                                           smoothing=0.5, blowup=3.0, **kw)
        return float(_norm_run(make, norms).group_state(0)["lr_factor"])

    assert factor() == 0.5 and factor(blowup_recovery=1.1) == pytest.approx(0.5 * 1.1**5)
    plateau = lambda ps: GradNormDecaySGD(ps, threshold=0.5, decay=0.5, patience=1, cooldown=0,  # noqa: E731
                                          blowup=3.0, blowup_recovery=1.1)
    assert float(_norm_run(plateau, [1.0, 0.4, 0.4, 0.4]).group_state(0)["lr_factor"]) == 0.5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"patience": 0}, "invalid patience"), ({"patience": 1.5}, "invalid patience"),
    ({"cooldown": -1}, "invalid cooldown"), ({"relative": 1}, "invalid relative"),
    ({"init_lr": -1.0}, "invalid init_lr"), ({"reference": "max"}, "invalid reference"),
    ({"smoothing": 1.0}, "invalid smoothing"), ({"smoothing": -0.1}, "invalid smoothing"),
    ({"blowup": 0.5}, "invalid blowup"), ({"blowup": float("inf")}, "invalid blowup"),
    ({"blowup": -2.0}, "invalid blowup"), ({"blowup": float("nan")}, "invalid blowup"),
    ({"blowup_recovery": 0.5}, "invalid blowup_recovery"),
    ({"reference": 1}, "invalid reference"), ({"reference": "peak", "relative": False}, "invalid reference"),
    ({"plateau": 1}, "invalid plateau"),
])
def test_bad_decay_settings(kwargs: dict, message: str) -> None:
    for cls in (GradNormDecaySGD, GradNormDecayAdam):
        with pytest.raises(ValueError, match=message):
            cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


# --- the hypergradient rules' blow-up guard ------------------------------------------------------
@pytest.mark.parametrize("cls", [HypergradientSGD, HypergradientAdam])
def test_hypergradient_guard_cuts_the_factor_at_each_blowup(cls: type) -> None:
    """blowup 3, smoothing 0.5, as the decay rule's trigger: norms 1, 1, 2.9, 10, 100 spike at steps
    4 and 5, so the factor ends at a quarter of the unguarded one's; a jump to a level that holds
    (1, 1, 5, 5, 5, 5) spikes once."""
    def factor(norms: list[float], **guard: float) -> float:
        return float(_norm_run(lambda ps: cls(ps, **{"blowup": 0.0, **guard}), norms).group_state(0)["lr_factor"])

    for norms, spikes in (([1.0, 1.0, 2.9, 10.0, 100.0], 2), ([1.0, 1.0, 5.0, 5.0, 5.0, 5.0], 1)):
        guarded = factor(norms, blowup=3.0, smoothing=0.5, blowup_recovery=1.0)
        assert guarded == pytest.approx(factor(norms) * 0.5**spikes, rel=1e-6)
    st = _norm_run(lambda ps: cls(ps, blowup=3.0, smoothing=0.5, blowup_decay=0.25, blowup_recovery=1.0),
                   [1.0, 1.0, 2.9, 10.0])
    assert float(st.group_state(0)["norm_avg"]) == pytest.approx(0.5 * (0.5 * 1.0 + 0.5 * 2.9) + 5.0)
    assert float(st.group_state(0)["lr_factor"]) == pytest.approx(factor([1.0, 1.0, 2.9, 10.0]) * 0.25, rel=1e-6)


@pytest.mark.parametrize("cls", [HypergradientSGD, HypergradientAdam])
def test_hypergradient_guard_gives_cuts_back_after_an_isolated_spike(cls: type) -> None:
    """recovery 1.1: one spike (norms 1, 1, 10, then 1s) halves the factor, each spike-free step gives
    back 1.1x of it until the cut is repaid, never more; recovery 1 keeps the cut."""
    def ratio(tail: int, **guard: float) -> float:
        norms = [1.0, 1.0, 10.0] + [1.0] * tail
        run = lambda **kw: float(_norm_run(lambda ps: cls(ps, **kw), norms).group_state(0)["lr_factor"])  # noqa: E731
        return run(blowup=3.0, smoothing=0.5, **{"blowup_recovery": 1.0, **guard}) / run(blowup=0.0)

    assert ratio(3, blowup_recovery=1.1) == pytest.approx(0.5 * 1.1**3, rel=1e-5)
    assert ratio(10, blowup_recovery=1.1) == pytest.approx(1.0, rel=1e-5)
    assert ratio(10) == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("cls", [HypergradientSGD, HypergradientAdam])
def test_max_factor_caps_the_adapted_factor(cls: type) -> None:
    """Aligned gradients grow the normalized factor by e^β per step without bound; a cap holds it."""
    def factor(**kw: float) -> float:
        return float(_norm_run(lambda ps: cls(ps, hyper_lr=0.5, blowup=0.0, **kw), [1.0] * 12).group_state(0)["lr_factor"])

    assert factor() > 50 and factor(max_factor=3.0) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="max_factor"):
        cls([torch.nn.Parameter(torch.zeros(2))], max_factor=-1.0)


def test_a_schedule_fades_the_guards_debt_with_the_factor() -> None:
    """StepLR lowers lr 10× after two cut spikes: the cuts fade with the factor, so giving them back
    never lifts the factor above the unguarded run's (it reached 2.27 when the debt was not faded)."""
    def factors(**guard: float) -> list[float]:
        p = torch.nn.Parameter(torch.zeros(4))
        opt = HypergradientSGD([p], init_lr=0.01, hyper_lr=1e-12, **guard)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
        out = []
        for t in range(40):
            p.grad = torch.tensor([0.5, -0.5, 0.5, 0.5]) * (10.0 if t in (3, 6) else 1.0)
            opt.step()
            sched.step()
            out.append(float(opt.group_state(0)["lr_factor"]))
        return out

    plain, guarded = factors(blowup=0.0), factors(blowup=3.0, smoothing=0.5, blowup_recovery=1.1)
    assert min(guarded[3:10]) < 0.5 and all(g <= u * (1 + 1e-6) for g, u in zip(guarded, plain))
    assert guarded[-1] == pytest.approx(plain[-1], rel=1e-5)  # repaid in full


def test_hypergradient_guard_stops_a_divergence() -> None:
    """SGD at rate 2.5 on ||x||²/2 multiplies x by -1.5 per step; the hypergradient (β 1e-6) is too slow
    to save it, the guard halves the rate at the first growing step and the run converges."""
    def final(**guard: float) -> float:
        x = torch.nn.Parameter(torch.ones(3))
        opt = HypergradientSGD([x], init_lr=2.5, hyper_lr=1e-6, **{"blowup": 0.0, **guard})
        for _ in range(60):
            opt.zero_grad()
            (0.5 * (x * x).sum()).backward()
            opt.step()
        return float(x.detach().norm())

    assert final() > 1e6
    assert final(blowup=1.2) < 1e-6


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"blowup": 0.5}, "invalid blowup"), ({"blowup": float("nan")}, "invalid blowup"),
    ({"smoothing": 1.0}, "invalid smoothing"), ({"blowup_decay": 0.0}, "invalid blowup_decay"),
    ({"blowup_decay": 1.5}, "invalid blowup_decay"), ({"blowup_recovery": 0.9}, "invalid blowup_recovery"),
    ({"blowup_recovery": float("inf")}, "invalid blowup_recovery"),
])
def test_bad_guard_settings(kwargs: dict, message: str) -> None:
    for cls in (HypergradientSGD, HypergradientAdam):
        with pytest.raises(ValueError, match=message):
            cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)
