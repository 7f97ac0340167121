"""Parameter-relative Adam (hand-set and learned) and the batched population engine (full-horizon ES: test_es.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import learned_opt
from learned_opt.bench.baselines import resolve_optimizer, with_cosine_decay
from learned_opt.bench.runner import run
from learned_opt.meta.es import stack_members
from learned_opt.meta.population import run_population
from learned_opt.optim import LearnedOptimizer
from learned_opt.rules.relative import LearnedRelativeAdamRule, RelativeAdamRule, schedule
from learned_opt.rules.transforms import apply_update, gradients_pass_guard
from relative_toys import small_params, small_task


def _first_update(make, grads):
    params = small_params()
    before = [p.detach().clone() for p in params]
    opt = make(params)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [p.detach() - b for p, b in zip(params, before)]


def _learned(params, **kw):
    return LearnedOptimizer(params, LearnedRelativeAdamRule(), **kw)


@pytest.mark.parametrize("rule", [RelativeAdamRule(), LearnedRelativeAdamRule()], ids=["hand", "learned"])
@pytest.mark.parametrize("total_steps", [None, 50])
def test_lr_is_a_multiplier_of_the_rules_own_rate(rule, total_steps):
    params = [p.detach() for p in small_params()]
    grads = [torch.randn(4, 3), torch.randn(3)]

    def first_update(lr):
        hparams = {**rule.hyperparameters, "lr": lr, "total_steps": total_steps}
        return rule.update(grads, params, rule.init_state(params), hparams)[0]

    for full, half in zip(first_update(1.0), first_update(0.5)):
        assert full.abs().sum() > 0
        assert torch.equal(half, 0.5 * full)


@pytest.mark.parametrize("make", [learned_opt.RelativeAdam, _learned], ids=["hand", "learned"])
def test_zero_gradient_from_fresh_state_does_not_move(make):
    updates = _first_update(lambda p: make(p, total_steps=10), [torch.zeros(4, 3), torch.zeros(3)])
    assert all(torch.equal(u, torch.zeros_like(u)) for u in updates)


def test_step_moves_a_tensor_by_alpha_of_its_rms():
    params = small_params()
    rms = float(params[0].detach().pow(2).mean().sqrt())
    opt = learned_opt.RelativeAdam(params, alpha=0.03, warmup=0.0, total_steps=None)
    before = params[0].detach().clone()
    params[0].grad, params[1].grad = torch.randn(4, 3), torch.randn(3)
    opt.step()
    moved = float((params[0].detach() - before).pow(2).mean().sqrt())
    assert moved == pytest.approx(0.03 * (rms + 1e-3), rel=1e-5)


def test_untrained_learned_rule_is_the_hand_rule():
    """Same trajectory up to the rounding of θ's exp(log α) and exp(log floor)."""
    torch.manual_seed(0)
    grads = [[torch.randn(4, 3), torch.randn(3)] for _ in range(6)]
    for total in (None, 6):
        a, b = small_params(), small_params()
        oa = learned_opt.RelativeAdam(a, total_steps=total)
        ob = _learned(b, total_steps=total)
        for gs in grads:
            for p, q, g in zip(a, b, gs):
                p.grad, q.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-9)


def test_schedule_warms_up_then_decays_to_zero_or_holds():
    steps = torch.arange(1, 101, dtype=torch.float32)
    told = schedule(steps, torch.tensor(100.0), 0.1)
    assert float(told[0]) == pytest.approx(0.1) and float(told[9]) == pytest.approx(1.0)
    assert float(told[-1]) == pytest.approx(0.0, abs=1e-6)
    assert torch.all(told[10:].diff() <= 1e-7)
    free = schedule(steps, torch.tensor(0.0), 0.05)  # warm-up over 0.05 x 200 = 10 steps, then 1
    assert float(free[4]) == pytest.approx(0.5) and torch.all(free[9:] == 1.0)


def test_told_schedule_ends_at_its_final_fraction():
    steps = torch.arange(1, 101, dtype=torch.float32)
    told = schedule(steps, torch.tensor(100.0), 0.1, 0.25)
    assert float(told[9]) == pytest.approx(1.0) and float(told[-1]) == pytest.approx(0.25)
    assert torch.all(told[10:].diff() <= 1e-7) and torch.all(told[10:] >= 0.25 - 1e-6)
    torch.testing.assert_close(schedule(steps, torch.tensor(0.0), 0.05, 0.25), schedule(steps, torch.tensor(0.0), 0.05))


def test_learned_final_is_a_meta_parameter_and_matches_the_hand_rule():
    rule = LearnedRelativeAdamRule(hidden=0, init_final=0.3)
    assert rule.config()["init_final"] == pytest.approx(0.3)
    assert "logit_final" not in LearnedRelativeAdamRule(hidden=0).theta()  # older weights still load
    params = [p.detach() for p in small_params()]
    hand = RelativeAdamRule()
    for final, learned in ((0.3, rule), (0.0, LearnedRelativeAdamRule(hidden=0))):
        hp = {**hand.hyperparameters, "final": final, "total_steps": 4}
        st_h, st_l = hand.init_state(params), learned.init_state(params)
        for _ in range(4):  # the last step is where a cosine to 0 and one to 0.3 differ most
            grads = [torch.randn(4, 3), torch.randn(3)]
            want, st_h = hand.update(grads, params, st_h, hp)
            got, st_l = learned.update(grads, params, st_l, {**learned.hyperparameters, "total_steps": 4})
        for w, u in zip(want, got):
            torch.testing.assert_close(u, w, rtol=1e-5, atol=1e-9)
        assert all(float(w.abs().max()) > 0 for w in want) == (final > 0)
    with pytest.raises(ValueError, match="final"):
        learned_opt.RelativeAdam(small_params(), final=1.5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_total_steps_is_validated(bad):
    with pytest.raises(ValueError, match="total_steps"):
        learned_opt.RelativeAdam(small_params(), total_steps=bad)


def test_relative_adam_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="alpha"):
        learned_opt.RelativeAdam(small_params(), alpha=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        learned_opt.RelativeAdam(small_params(), warmup=1.5)


@pytest.mark.parametrize("extra", [{}, {"init_travel_gain": 4.0}, {"init_decay_start": 0.4},
                                   {"schedule_free": True, "init_anchor": 0.5, "told_free": True}])
def test_population_run_matches_the_optimizer_path(extra):
    """The batched engine and the torch.optim adapter run the same update (one home for the math),
    with the travel input too (its path is a vmapped state scalar)."""
    task = small_task()
    rule = LearnedRelativeAdamRule(**extra)
    thetas = torch.nn.utils.parameters_to_vector(rule.parameters()).detach()
    g = torch.Generator().manual_seed(1)
    thetas = torch.stack([thetas, thetas + 0.3 * torch.randn(thetas.shape, generator=g)])
    names = [(n, p.shape, p.numel()) for n, p in rule.named_parameters()]

    def as_dict(vec):
        out, i = {}, 0
        for n, shape, k in names:
            out[n] = vec[..., i:i + k].reshape(*vec.shape[:-1], *shape)
            i += k
        return out

    horizons = torch.tensor([30.0, 0.0])
    def update(member, grads, params, state, *, checked=False):  # as meta.es does: through the shipped step path
        result = apply_update(rule.with_theta(member[0]), grads, params, state, {"lr": 1.0, "total_steps": member[1]},
                              checked=checked)
        return result.updates, result.state

    result = run_population(task, 7, 30, (as_dict(thetas), horizons), 2, update, rule.init_state,
                            eval_point=lambda m, p, st: rule.eval_point(p, st, {"total_steps": m[1]}))
    for i, total in enumerate((30, None)):
        member = LearnedRelativeAdamRule(**extra)
        torch.nn.utils.vector_to_parameters(thetas[i].clone(), member.parameters())
        single = run(task, lambda ps: LearnedOptimizer(ps, member, total_steps=total), 7, 30, 30)
        assert single.losses[0] == pytest.approx(result.initial_loss, rel=1e-6)
        assert single.losses[-1] == pytest.approx(float(result.final_losses[i]), rel=1e-4)


def test_population_checks_the_guard_once_per_step_bitwise_as_each_member_would():
    """run_population checks the whole population's gradients on the host once per step and tells the
    update (``checked``); the unmasked branch it lets each member take gives the masked branch's
    results bitwise, and a population with one non-finite gradient is not ``checked``."""
    task = small_task()
    rule = LearnedRelativeAdamRule(hidden=0)
    thetas = torch.nn.utils.parameters_to_vector(rule.parameters()).detach()
    thetas = torch.stack([thetas, thetas + 0.2])
    seen: list[bool] = []

    def update(theta, grads, params, state, *, checked=False, force=None):
        if force is None:
            seen.append(checked)
        result = apply_update(rule.with_theta(theta), grads, params, state, {"lr": 1.0, "total_steps": 20},
                              checked=checked if force is None else force)
        return result.updates, result.state

    run_population(task, 3, 5, stack_members(rule, thetas), 2, update, rule.init_state)
    assert seen == [True] * 5
    init = task.init_params(torch.Generator().manual_seed(3))
    params = [p.unsqueeze(0).expand(2, *p.shape).clone() for p in init]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    state = rule.init_state(init)
    state = ({k: v.expand(2) for k, v in state[0].items()},
             [{k: v.unsqueeze(0).expand(2, *v.shape).clone() for k, v in st.items()} for st in state[1]])
    fast = torch.func.vmap(lambda *a: update(*a, force=True))(stack_members(rule, thetas), grads, params, state)
    masked = torch.func.vmap(lambda *a: update(*a, force=False))(stack_members(rule, thetas), grads, params, state)
    for a, b in zip(torch.utils._pytree.tree_leaves(fast), torch.utils._pytree.tree_leaves(masked)):
        assert torch.equal(a, b)
    grads[0][1].view(-1)[0] = float("inf")
    assert gradients_pass_guard([g[0] for g in grads]) and not gradients_pass_guard(grads)


def test_cosine_baseline_decays_to_zero_over_the_horizon():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = with_cosine_decay(torch.optim.SGD([p], lr=1.0), 10)
    lrs = []
    for _ in range(10):
        p.grad = torch.ones(2)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[4] == pytest.approx(0.5) and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_horizon_spec_passes_total_steps():
    spec = resolve_optimizer("RelativeAdam[horizon=true]")
    opt = spec.factory(None, 123)(small_params())
    assert opt.param_groups[0]["total_steps"] == 123 and spec.key["horizon"] is True
    assert resolve_optimizer("adam-cosine").horizon
    assert resolve_optimizer("RelativeAdam").factory(None, 5)(small_params()).param_groups[0]["total_steps"] is None
    with pytest.raises(ValueError, match="horizon"):
        resolve_optimizer("RelativeAdam[horizon=3]")


def test_horizon_aware_specs_pass_the_pre_run_check():
    from learned_opt.bench.baselines import check_spec_builds

    for text in ("adam-cosine", "RelativeAdam[horizon=true]", "RelativeAdam"):
        check_spec_builds(resolve_optimizer(text), None)


def test_linear_controller_is_small_and_validated():
    rule = LearnedRelativeAdamRule(hidden=0)
    assert sum(p.numel() for p in rule.parameters()) == 23
    assert type(rule)(**rule.config()).config() == rule.config()
    with pytest.raises(ValueError, match="hidden"):
        LearnedRelativeAdamRule(hidden=-1)


@pytest.mark.parametrize("make", [learned_opt.RelativeAdam, _learned], ids=["hand", "learned"])
def test_stepping_past_total_steps_warns_once(make):
    params = small_params()
    opt = make(params, total_steps=3)
    with pytest.warns(RuntimeWarning, match="past total_steps=3") as record:
        for _ in range(6):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
    assert len([w for w in record if "past total_steps" in str(w.message)]) == 1


@pytest.mark.parametrize("final", [0.0, 0.2])
def test_past_total_steps_the_step_stays_at_final_and_the_warning_says_so(final):
    params = small_params()
    opt = learned_opt.RelativeAdam(params, total_steps=3, final=final)
    moves = []
    with pytest.warns(RuntimeWarning, match="stays at 20% of its peak" if final else "leave the parameters unchanged"):
        for _ in range(5):
            before = [p.detach().clone() for p in params]
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            moves.append(max(float((p.detach() - b).abs().max()) for p, b in zip(params, before)))
    assert (moves[-1] > 0) == (final > 0)
    from learned_opt.weights import load_rule

    end = float(torch.sigmoid(load_rule("default")[0].logit_final.detach()))  # the shipped default's learned end
    with pytest.warns(RuntimeWarning, match=f"stays at {end:.0%} of its peak"):
        shipped = learned_opt.load_optimizer("default", params, total_steps=1)
        for _ in range(2):
            for p in params:
                p.grad = torch.ones_like(p)
            shipped.step()


def test_final_without_total_steps_warns_that_it_does_nothing():
    with pytest.warns(UserWarning, match="final only shapes the schedule told total_steps"):
        learned_opt.RelativeAdam(small_params(), final=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learned_opt.RelativeAdam(small_params(), final=0.1, total_steps=10)
        learned_opt.RelativeAdam(small_params())


def test_an_absolute_looking_lr_multiplier_warns():
    with pytest.warns(UserWarning, match="lr=0.001 is a multiplier of the rule's own rate"):
        learned_opt.RelativeAdam(small_params(), lr=1e-3)
    with pytest.warns(UserWarning, match="init_lr="):
        learned_opt.load_optimizer("default", small_params(), lr=3e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learned_opt.load_optimizer("default", small_params(), lr=0.5)
        learned_opt.RelativeAdam(small_params(), lr=0.0)


def test_floor_vec_sets_the_step_of_zero_vectors_only():
    """A zero-initialised bias moves by α · floor_vec per step (RMS), matrices keep the matrix floor."""
    params = small_params()
    rms = float(params[0].detach().pow(2).mean().sqrt())
    opt = learned_opt.RelativeAdam(params, alpha=0.03, warmup=0.0, floor_vec=0.1)
    before = [p.detach().clone() for p in params]
    params[0].grad, params[1].grad = torch.randn(4, 3), torch.randn(3)
    opt.step()
    moved = [float((p.detach() - b).pow(2).mean().sqrt()) for p, b in zip(params, before)]
    assert moved[0] == pytest.approx(0.03 * (rms + 1e-3), rel=1e-5)
    assert moved[1] == pytest.approx(0.03 * 0.1, rel=1e-5)
    with pytest.raises(ValueError, match="floor_vec"):
        learned_opt.RelativeAdam(small_params(), floor_vec=-1.0)


def test_learned_floor_vec_is_a_meta_parameter():
    rule = LearnedRelativeAdamRule(hidden=0, init_floor_vec=0.2)
    assert "log_floor_vec" in rule.theta()
    assert rule.config()["init_floor_vec"] == pytest.approx(0.2)
    assert "log_floor_vec" not in LearnedRelativeAdamRule(hidden=0).theta()  # older weights still load
    params = [p.detach() for p in small_params()]
    grads = [torch.randn(4, 3), torch.randn(3)]
    hparams = {**rule.hyperparameters, "total_steps": 10}
    hand = RelativeAdamRule()
    want = hand.update(grads, params, hand.init_state(params), {**hand.hyperparameters, "floor_vec": 0.2,
                                                                 "total_steps": 10})[0]
    got = rule.update(grads, params, rule.init_state(params), hparams)[0]
    for w, u in zip(want, got):
        torch.testing.assert_close(u, w, rtol=1e-5, atol=1e-9)


def _fused_rule(kind: str):
    """A relative rule of each kind, a learned one with a controller that does something."""
    if kind.startswith("hand"):
        return RelativeAdamRule(schedule_free=kind == "hand-sf")
    rule = LearnedRelativeAdamRule(hidden=4, init_floor_vec=0.05 if kind == "floor_vec" else None,
                                   schedule_free=kind.startswith("sf"), init_anchor=0.5 if "anchor" in kind else None,
                                   init_travel_gain=1.0 if "travel" in kind else None, told_free="told-free" in kind,
                                   init_decay_start=0.4 if "decay" in kind else None)
    with torch.no_grad():
        for p in rule.ctrl.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return rule


FUSED_TRANSFORMS = {"plain": {}, "coupled": {"weight_decay": 0.05}, "maximize": {"maximize": True},
                    "decoupled": {"weight_decay": 0.05, "decoupled_weight_decay": True, "lr": 0.7}}


def _like(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random values laid out as ``p`` (a channels-last parameter's gradient is channels-last)."""
    return torch.empty_like(p).copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("transform", sorted(FUSED_TRANSFORMS))
@pytest.mark.parametrize("kind", ["hand", "learned", "floor_vec", "hand-sf", "sf", "sf-anchor", "travel",
                                  "sf-anchor-travel", "sf-anchor-travel-told-free", "decay-start"])
@pytest.mark.parametrize("total_steps", [None, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_step_matches_the_pure_update(monkeypatch, kind, total_steps, transform, dtype):
    """The optimizer's fused step (parameters and state moved in place, large tensors in slices,
    small ones batched) follows the pure (vmappable, differentiable) path that meta-training runs,
    to rounding, under every step transform; channels-last, empty and 0-dim tensors included."""
    from learned_opt.rules import relative_fused

    monkeypatch.setattr(relative_fused, "SLAB", 8)  # the 5×4 matrix is large: three slices, the last short
    monkeypatch.setattr(relative_fused, "SLICED_FROM", 8)
    monkeypatch.setattr(relative_fused, "SMALL_BATCH", 5)  # the small tensors in two batches
    rule = _fused_rule(kind).to(dtype)
    hparams = {**rule.hyperparameters, "total_steps": total_steps, **FUSED_TRANSFORMS[transform]}
    g = torch.Generator().manual_seed(4)
    params = [torch.randn(5, 4, generator=g), torch.zeros(4), torch.randn(3, generator=g), torch.randn(2, generator=g),
              torch.randn(3, 2, 2, 2, generator=g).to(memory_format=torch.channels_last), torch.zeros(0),
              torch.tensor(0.5)]
    params = [p.to(dtype) for p in params]
    pure_p, fast_p = [p.clone() for p in params], [p.clone() for p in params]
    pure_s, fast_s = rule.init_state(pure_p), rule.init_state(fast_p)
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for _ in range(12):
        grads = [_like(p, g) for p in params]
        pure = apply_update(rule, grads, pure_p, pure_s, hparams)
        fast = apply_update(rule, [x.clone() for x in grads], fast_p, fast_s, hparams, inplace=True, move=True)
        assert fast.updates is None and not fast.skipped  # the fused path was taken
        pure_p, pure_s, fast_s = [p + u for p, u in zip(pure_p, pure.updates)], pure.state, fast.state
        for want, got in zip(pure_p, fast_p):
            torch.testing.assert_close(got, want, **tol)
    assert torch.equal(fast_s[0]["step"], pure_s[0]["step"])
    for want, got in zip(pure_s[1], fast_s[1]):
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], **tol)


def test_fused_scratch_follows_the_slice_size(monkeypatch):
    """The scratch kept between steps is rebuilt when the slice size is not the one it was made
    for (a test that shrank it ran first in this thread), so large tensors still step correctly."""
    from learned_opt.rules import relative_fused

    rule = _fused_rule("sf")
    with monkeypatch.context() as patch:
        patch.setattr(relative_fused, "SLAB", 8)
        patch.setattr(relative_fused, "SLICED_FROM", 8)
        small = [torch.randn(5, 4)]
        apply_update(rule, [torch.randn(5, 4)], small, rule.init_state(small), {**rule.hyperparameters},
                     inplace=True, move=True)
    params = [torch.randn(relative_fused.SLICED_FROM + 3)]
    grads = [torch.randn(params[0].shape)]
    pure = apply_update(rule, grads, params, rule.init_state(params), {**rule.hyperparameters})
    fast_p = [params[0].clone()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an out= buffer too small is resized with a warning
        fast = apply_update(rule, grads, fast_p, rule.init_state(fast_p), {**rule.hyperparameters}, inplace=True,
                            move=True)
    assert fast.updates is None
    torch.testing.assert_close(fast_p[0], params[0] + pure.updates[0], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), 1e12])
def test_fused_step_declines_gradients_the_guard_must_handle(bad):
    """A non-finite gradient, or one above the guard's norm bound, leaves the fused path having
    changed nothing: the guarded path then skips or rescales the step as for any rule."""
    rule = _fused_rule("sf")
    params = [torch.randn(6, 3), torch.randn(3)]
    state = rule.init_state(params)
    good = [torch.randn(p.shape) for p in params]
    state = apply_update(rule, good, params, state, {**rule.hyperparameters}, inplace=True, move=True).state
    before = ([p.clone() for p in params], [{k: v.clone() for k, v in st.items()} for st in state[1]])
    grads = [g.clone() for g in good]
    grads[0][1, 2] = bad
    settings = {"sign": 1.0, "coupled": 0.0, "decoupled": 0.0, "bound": 2.0**30}
    assert rule.move_inplace(grads, params, state, {**rule.hyperparameters}, settings) is None
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    for st, old in zip(state[1], before[1]):
        assert all(torch.equal(st[k], old[k]) for k in old)
    moved = apply_update(rule, grads, params, state, {**rule.hyperparameters}, inplace=True, move=True)
    pure = apply_update(rule, grads, before[0], state, {**rule.hyperparameters})
    assert moved.skipped == pure.skipped == (bad != bad)
    for u, w in zip(moved.updates, pure.updates):
        torch.testing.assert_close(u, w)


def test_fused_step_falls_back_for_tensors_it_cannot_slice():
    """A parameter that is neither contiguous nor channels-last (a transposed view), or a gradient
    laid out unlike its parameter, takes the ordinary path, with the pure path's result."""
    rule = _fused_rule("learned")
    settings = {"sign": 1.0, "coupled": 0.0, "decoupled": 0.0, "bound": 2.0**30}
    for params, grads in (([torch.randn(4, 6).t(), torch.randn(3)], [torch.randn(6, 4), torch.randn(3)]),
                          ([torch.randn(6, 4), torch.randn(3)], [torch.randn(4, 6).t(), torch.randn(3)])):
        state = rule.init_state(params)
        assert rule.move_inplace(grads, params, state, {**rule.hyperparameters}, settings) is None
        result = apply_update(rule, grads, params, state, {**rule.hyperparameters}, inplace=True, move=True)
        pure = apply_update(rule, grads, params, rule.init_state(params), {**rule.hyperparameters})
        assert result.updates is not None
        for u, w in zip(result.updates, pure.updates):
            torch.testing.assert_close(u, w)


def _run_updates(rule, total_steps, steps=8):
    g = torch.Generator().manual_seed(11)
    params = [torch.randn(4, 3, generator=g), torch.randn(3, generator=g)]
    state, out = rule.init_state(params), []
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        updates, state = rule.update(grads, params, state, {**rule.hyperparameters, "total_steps": total_steps})
        params = [p + u for p, u in zip(params, updates)]
        out += updates
    return out


def test_told_time_feature_acts_on_told_runs_only():
    """told_time adds one controller row, read only when the horizon is known: at zero the rule is the
    nine-feature rule; set, untold runs are unchanged and told runs differ. Older weights (nine rows)
    keep loading as they were."""
    base = LearnedRelativeAdamRule(hidden=0)
    with torch.no_grad():
        base.ctrl.ws.copy_(0.3 * torch.randn(base.ctrl.ws.shape, generator=torch.Generator().manual_seed(2)))
    split = LearnedRelativeAdamRule(hidden=0, told_time=True)
    assert split.ctrl.ws.shape == (base.ctrl.ws.shape[0] + 1, 2) and split.config()["told_time"] is True
    assert "told_time" not in base.config()
    with torch.no_grad():
        split.ctrl.ws[:-1].copy_(base.ctrl.ws)
    for total in (None, 8):
        assert all(torch.equal(a, b) for a, b in zip(_run_updates(base, total), _run_updates(split, total)))
    with torch.no_grad():
        split.ctrl.ws[-1, 0] = 0.5
    assert all(torch.equal(a, b) for a, b in zip(_run_updates(base, None), _run_updates(split, None)))
    assert not all(torch.equal(a, b) for a, b in zip(_run_updates(base, 8), _run_updates(split, 8)))
    with pytest.raises(ValueError, match="told_time"):
        LearnedRelativeAdamRule(told_time=1)


@pytest.mark.parametrize("schedule_free", [False, True])
def test_anchor_moves_the_relative_scale_towards_the_initial_one(schedule_free):
    """With ``init_anchor`` a, each tensor's step in an untold run is the anchor-free step times
    ((RMS(p0) + floor) / (RMS(p) + floor))^a; told runs and weights without the anchor step as before."""
    plain = LearnedRelativeAdamRule(hidden=0, schedule_free=schedule_free)
    anchored = LearnedRelativeAdamRule(hidden=0, schedule_free=schedule_free, init_anchor=0.25)
    assert "logit_anchor" not in plain.theta() and "init_anchor" not in plain.config()
    assert anchored.config()["init_anchor"] == pytest.approx(0.25)
    params = [p.detach() for p in small_params()]
    state_a, state_p = anchored.init_state(params), plain.init_state(params)
    grown = [p * 8.0 for p in params]  # the tensors grew 8x since their start (z too, schedule-free)
    for st in (state_a, state_p):
        for s, g in zip(st[1], grown):
            if "z" in s:
                s["z"] = g.clone()
    grads = [torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), torch.ones(3)]
    hparams = {"lr": 1.0, "total_steps": None}
    ua, _ = anchored.update(grads, grown, state_a, hparams)
    up, _ = plain.update(grads, grown, state_p, hparams)
    floor = 1e-3
    for a, p, p0, g in zip(ua, up, params, grown):
        rms = lambda t: float(t.pow(2).mean().sqrt())  # noqa: E731
        want = ((rms(p0) + floor) / (rms(g) + floor)) ** 0.25
        torch.testing.assert_close(a, p * want, rtol=1e-5, atol=1e-12)
    assert float(ua[0].detach().norm()) < float(up[0].detach().norm())
    told = {"lr": 1.0, "total_steps": 50}  # a told run keeps the plain scale: the cosine ends its growth
    for a, p in zip(anchored.update(grads, grown, state_a, told)[0], plain.update(grads, grown, state_p, told)[0]):
        assert torch.equal(a, p)


def _ctrl_after(rule, steps=30):
    """The accumulated log multiplier after ``steps`` steps along a constant gradient."""
    params = [torch.full((4, 3), 0.5)]
    state = rule.init_state(params)
    for _ in range(steps):
        updates, state = rule.update([torch.ones(4, 3)], params, state, dict(rule.hyperparameters))
        params = [p + u for p, u in zip(params, updates)]
    return float(state[1][0]["controller"][0].detach())


def test_cos_gain_starts_a_controller_that_grows_steps_along_a_steady_gradient():
    """init_cos_gain sets only the increment's weights on the two cosine features; along a constant
    gradient (successive steps agree) the multiplier then grows each step, where the untrained
    controller keeps the hand-set step. It is a starting point, not a setting: weights overwrite it."""
    plain, primed = LearnedRelativeAdamRule(hidden=0), LearnedRelativeAdamRule(hidden=0, init_cos_gain=1.0)
    ws = primed.ctrl.ws.detach()
    assert torch.equal(ws[:2, 0], torch.ones(2)) and not ws[2:].any() and not ws[:, 1].any()
    assert "init_cos_gain" not in primed.config()

    assert _ctrl_after(plain) == 0.0
    assert _ctrl_after(primed, 10) > 0.2 and _ctrl_after(primed, 30) > _ctrl_after(primed, 10)
    for bad in (float("nan"), "1", True):
        with pytest.raises(ValueError, match="init_cos_gain"):
            LearnedRelativeAdamRule(init_cos_gain=bad)


def test_travel_feature_marks_a_steady_path_not_a_random_walk():
    """The travel input is positive while a tensor keeps moving one way (its distance from the start
    is its path length) and 0 for a random walk of the same path, and before any step."""
    from learned_opt.rules.controller import travel_feature

    steps = torch.randn(400, 50, generator=torch.Generator().manual_seed(0))
    for t in (20, 100, 400):
        path = steps[:t].norm(dim=1).sum()
        straight = travel_feature(path, path, torch.tensor(t + 1.0))
        assert float(straight) == pytest.approx(min(0.5 * math.log(t) - 0.4, 2.0), rel=1e-5)
        assert float(travel_feature(steps[:t].sum(0).norm(), path, torch.tensor(t + 1.0))) == 0.0
    assert float(travel_feature(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0))) == 0.0


@pytest.mark.parametrize("schedule_free", [False, True])
def test_travel_row_keeps_a_path_and_is_absent_from_old_weights(schedule_free):
    """init_travel_gain adds θ ``ctrl.ws_travel`` and a sixth state scalar per tensor (the path
    length, the sum of the lengths of the tensor's steps: of ``p``, or of ``z`` in the schedule-free
    form); at gain 0 the steps are the plain rule's bitwise, told or not; set, a tensor moving along
    a steady gradient grows its multiplier faster."""
    form = {"schedule_free": True, "init_anchor": 0.5} if schedule_free else {}
    base = LearnedRelativeAdamRule(hidden=0, **form)
    travel = LearnedRelativeAdamRule(hidden=0, **form, init_travel_gain=0.0)
    assert "ctrl.ws_travel" in travel.theta() and "ctrl.ws_travel" not in base.theta()
    assert "init_travel_gain" not in base.config() and travel.config()["init_travel_gain"] == 0.0
    for total in (None, 8):
        assert all(torch.equal(a, b) for a, b in zip(_run_updates(base, total), _run_updates(travel, total)))
    params = [torch.full((4, 3), 0.5)]
    state = travel.init_state(params)
    assert state[1][0]["controller"].shape == (6,) and base.init_state(params)[1][0]["controller"].shape == (5,)
    with torch.no_grad():
        for _ in range(5):  # a constant gradient: the moving point keeps one line, so its path is its distance
            updates, state = travel.update([torch.ones(4, 3)], params, state, dict(travel.hyperparameters))
            params = [p + u for p, u in zip(params, updates)]
    moved = state[1][0]["z"] if schedule_free else params[0]
    assert float(state[1][0]["controller"][5]) == pytest.approx(float(moved.sub(0.5).norm()), rel=1e-5)
    grown = LearnedRelativeAdamRule(hidden=0, **form, init_travel_gain=4.0)
    assert _ctrl_after(grown) > _ctrl_after(travel) + 0.5
    rebuilt = type(grown)(**grown.config())
    assert rebuilt.config() == grown.config() and float(rebuilt.ctrl.ws_travel[0, 0].detach()) == 4.0
    with pytest.raises(ValueError, match="init_travel_gain"):
        LearnedRelativeAdamRule(init_travel_gain=float("nan"))
    with pytest.raises(ValueError, match="travel"):  # a state kept without the path cannot feed the row
        grown.update([torch.ones(4, 3)], params, base.init_state(params), dict(grown.hyperparameters))


def test_steady_feature_is_an_extra_row_that_old_weights_do_not_have():
    """init_steady_gain adds θ ``ctrl.ws_steady`` (cosine EMA × gradient-norm trend): at 0 the rule is
    the plain one bitwise, told or not; set, it changes the steps; the config rebuilds it, so weights
    saved with it load into a rule that has it, and rules without it are unchanged."""
    base = LearnedRelativeAdamRule(hidden=0)
    with torch.no_grad():
        base.ctrl.ws.copy_(0.3 * torch.randn(base.ctrl.ws.shape, generator=torch.Generator().manual_seed(3)))
    steady = LearnedRelativeAdamRule(hidden=0, init_steady_gain=0.0)
    assert "ctrl.ws_steady" in steady.theta() and "ctrl.ws_steady" not in base.theta()
    assert "init_steady_gain" not in base.config()
    with torch.no_grad():
        steady.ctrl.ws.copy_(base.ctrl.ws)
    for total in (None, 8):
        assert all(torch.equal(a, b) for a, b in zip(_run_updates(base, total), _run_updates(steady, total)))
    with torch.no_grad():
        steady.ctrl.ws_steady[0, 0] = -2.0
    assert not all(torch.equal(a, b) for a, b in zip(_run_updates(base, None), _run_updates(steady, None)))
    rebuilt = type(steady)(**steady.config())
    assert rebuilt.config() == steady.config() and float(rebuilt.ctrl.ws_steady[0, 0].detach()) == -2.0
    with pytest.raises(ValueError, match="init_steady_gain"):
        LearnedRelativeAdamRule(init_steady_gain=float("inf"))
