"""Full-horizon population ES (learned_opt.meta.es) over the learned relative rule: references,
selection, warm starts, resumption, long draws and exports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import learned_opt
from learned_opt.bench.baselines import resolve_optimizer
from learned_opt.bench.runner import run
from learned_opt.meta.es import ESConfig, PopulationESTrainer, centered_ranks, log_ratio
from learned_opt.meta.population import adam_sweep
from learned_opt.optim import LearnedOptimizer
from learned_opt.rules.relative import LearnedRelativeAdamRule
from learned_opt.suites import parse_suite
from learned_opt.tasks import QuadraticFamily
from relative_toys import small_params, small_task


def test_adam_sweep_matches_torch_adam():
    task = small_task()
    lrs = [1e-3, 3e-2]
    swept = adam_sweep(task, 5, 20, lrs)
    for lr, final in zip(lrs, swept.final_losses.tolist()):
        ref = run(task, lambda ps: torch.optim.Adam(ps, lr=lr), 5, 20, 20)
        assert ref.losses[-1] == pytest.approx(final, rel=1e-4)


def test_es_reference_is_the_benchmarks_tuning():
    """tuned_adam_final tunes as the benchmark does (tune_lr), the grid batched in one population run."""
    from learned_opt.bench.tuning import tune_lr
    from learned_opt.meta.population import tuned_adam_final

    task = small_task()
    final, lr, initial = tuned_adam_final(task, 5, 15)
    one_by_one = tune_lr(lambda x: float(adam_sweep(task, 5, 15, [x]).final_losses[0]))
    assert lr == one_by_one.best_lr
    assert final == pytest.approx(one_by_one.scores[lr], rel=1e-5)
    assert initial == pytest.approx(float(task.eval_loss(task.init_params(torch.Generator().manual_seed(5)))))


def test_centered_ranks_and_log_ratio():
    r = centered_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0]))
    assert r.tolist() == [0.5, -0.5, 0.0, 0.0]
    cap = log_ratio(torch.tensor([1.0, math.nan, 0.5]), 1.0, 0.5, torch.tensor([False, True, False]), (-1.5, 3.0))
    assert 0 < float(cap[0]) < math.log(2.0) + 1e-6 and float(cap[1]) == 3.0 and abs(float(cap[2])) < 1e-6


def _tiny_suite():
    data = {"suite": {"steps": 20, "seeds": {"train": [0, 100], "validation": [100, 200], "test": [200, 300]},
                      "family": [{"label": "quad", "family": "quadratic", "settings": {"dim": {"int": [3, 6]}}}]}}
    return parse_suite(data, name="tiny")


def _cfg(**kw):
    base = dict(meta_steps=4, pairs=2, tasks_per_step=1, horizon=(10, 20), pool=3, val_tasks=2, eval_every=2,
                checkpoint_every=1)
    return ESConfig(**{**base, **kw})


def test_es_resumes_bitwise(tmp_path):
    suite = _tiny_suite()
    whole = PopulationESTrainer(_cfg(), tmp_path / "whole", suite=suite)
    whole.run(progress=False)
    PopulationESTrainer(_cfg(meta_steps=2), tmp_path / "split", suite=suite).run(progress=False)
    resumed = PopulationESTrainer(_cfg(), tmp_path / "split", suite=suite)
    resumed.run(progress=False)
    assert torch.equal(whole.theta.detach(), resumed.theta.detach())
    assert not torch.equal(whole.theta.detach(), PopulationESTrainer(_cfg(), tmp_path / "x", suite=suite).theta.detach())
    assert [r["step"] for r in resumed.history] == list(range(5))
    opt = learned_opt.load_optimizer(tmp_path / "whole" / "best.safetensors", small_params(), total_steps=10)
    assert isinstance(opt.rule, LearnedRelativeAdamRule)


def test_es_warm_starts_from_given_weights(tmp_path):
    """``init_weights`` starts θ at a weight file's values (a search continued from shipped
    weights); weights of another architecture or form are refused, naming init_weights."""
    suite = _tiny_suite()
    rule = {"hidden": 0, "init_floor_vec": 0.1}
    first = PopulationESTrainer(_cfg(meta_steps=2, rule=rule), tmp_path / "first", suite=suite)
    first.run(progress=False)
    start = tmp_path / "first" / "best.safetensors"
    warm = PopulationESTrainer(_cfg(meta_steps=2, rule=rule, init_weights=str(start)), tmp_path / "warm", suite=suite)
    assert torch.equal(warm.theta.detach(), first.best_theta)
    assert not torch.equal(warm.theta.detach(), PopulationESTrainer(_cfg(rule=rule), tmp_path / "cold",
                                                                    suite=suite).theta.detach())
    for other in ({"hidden": 2, "init_floor_vec": 0.1}, {**rule, "schedule_free": True}):
        with pytest.raises(ValueError, match="init_weights"):
            PopulationESTrainer(_cfg(rule=other, init_weights=str(start)), tmp_path / "bad", suite=suite)
    # an input added to trained weights: their entries are copied, the new row keeps its starting value
    added = PopulationESTrainer(_cfg(rule={**rule, "init_travel_gain": 2.0}, init_weights=str(start)),
                                tmp_path / "added", suite=suite)
    assert torch.equal(added.theta.detach()[:-2], first.best_theta)
    assert torch.equal(added.theta.detach()[-2:], torch.tensor([2.0, 0.0]))
    # a form option (how runs use θ, not its tensors) may change: told_free starts from untold-form weights
    told_free = PopulationESTrainer(_cfg(rule={**rule, "told_free": True}, init_weights=str(start)),
                                    tmp_path / "told_free", suite=suite)
    assert torch.equal(told_free.theta.detach(), first.best_theta)
    added.run(progress=False)
    with pytest.raises(ValueError, match="init_weights"):  # only an input row may be added, not e.g. an anchor
        PopulationESTrainer(_cfg(rule={**rule, "init_anchor": 0.5}, init_weights=str(start)), tmp_path / "anchor",
                            suite=suite)
    with pytest.raises(ValueError, match="init_weights"):  # and never the other way round
        PopulationESTrainer(_cfg(rule=rule, init_weights=str(tmp_path / "added" / "best.safetensors")),
                            tmp_path / "dropped", suite=suite)
    with pytest.raises(ValueError, match="init_weights"):
        ESConfig.from_table({"init_weights": 3})


def test_es_train_rows_moves_only_the_named_entries(tmp_path):
    """train_rows: ES perturbs and moves only those θ entries (an input's row learned over shipped
    weights that stay as they are); a name the rule lacks is refused, naming train_rows."""
    suite = _tiny_suite()
    rule = {"hidden": 0, "init_floor_vec": 0.1, "init_travel_gain": 0.0}
    trainer = PopulationESTrainer(_cfg(meta_steps=2, rule=rule, train_rows=("ctrl.ws_travel",)), tmp_path / "row",
                                  suite=suite)
    start = trainer.theta.detach().clone()
    trainer.run(progress=False)
    moved = trainer.theta.detach() != start
    assert bool(moved[-2:].any()) and not bool(moved[:-2].any())  # the travel row is θ's last entry
    with pytest.raises(ValueError, match="train_rows"):
        PopulationESTrainer(_cfg(rule=rule, train_rows=("ctrl.nope",)), tmp_path / "bad", suite=suite)
    with pytest.raises(ValueError, match="train_rows"):
        ESConfig.from_table({"train_rows": "ctrl.ws"})


def test_es_that_never_or_always_tells_the_horizon_selects_on_those_figures(tmp_path):
    suite = _tiny_suite()
    best = {"val_wins_told": 5, "val_wins_free": 1, "val_ratio_told": 0.5, "val_ratio_free": 2.0}
    free_better = {"val_wins_told": 0, "val_wins_free": 2, "val_ratio_told": 9.0, "val_ratio_free": 1.0}
    told_better = {"val_wins_told": 6, "val_wins_free": 0, "val_ratio_told": 9.0, "val_ratio_free": 2.0}
    for known, free, told in ((0.0, True, False), (0.5, False, False), (1.0, False, True)):
        trainer = PopulationESTrainer(_cfg(horizon_known=known), tmp_path / str(known), suite=suite)
        trainer.best = best
        assert (trainer._better(free_better), trainer._better(told_better)) == (free, told)


def test_es_that_never_or_always_tells_the_horizon_is_validated_in_that_mode_alone(tmp_path):
    """horizon_known 0 (1): validation runs untold (told) only, with the same figures as a run of
    both modes; other recipes report both."""
    suite = _tiny_suite()
    both = PopulationESTrainer(_cfg(), tmp_path / "both", suite=suite).evaluate()
    assert {k for k in both if k.startswith("val_wins")} == {"val_wins_told", "val_wins_free"}
    for known, mode in ((0.0, "free"), (1.0, "told")):
        row = PopulationESTrainer(_cfg(horizon_known=known), tmp_path / mode, suite=suite).evaluate()
        assert set(row) == {f"val_wins_{mode}", f"val_ratio_{mode}"}
        assert row[f"val_wins_{mode}"] == both[f"val_wins_{mode}"]
        assert row[f"val_ratio_{mode}"] == pytest.approx(both[f"val_ratio_{mode}"], rel=1e-5)


def test_es_entry_weights_draw_as_a_suite_file_with_those_weights(tmp_path):
    """entry_weights reweights a shared suite: the trainer's draws equal those of a suite whose file
    gives the entries those weights; an unknown label or a bad weight is refused, naming the key."""
    def suite(weight=None):
        fams = [{"label": "quad", "family": "quadratic", "settings": {"dim": 3}},
                {"label": "quad2", "family": "quadratic", "settings": {"dim": 5}}]
        if weight is not None:
            fams[1]["weight"] = weight
        return parse_suite({"suite": {"steps": 20, "seeds": {"train": [0, 100], "validation": [100, 200],
                                                        "test": [200, 300]},
                                      "family": fams}}, name="two")
    cfg = dict(pool=40, val_tasks=12)
    reweighted = PopulationESTrainer(_cfg(entry_weights={"quad2": 6.0}, **cfg), tmp_path / "a", suite=suite())
    in_file = PopulationESTrainer(_cfg(**cfg), tmp_path / "b", suite=suite(6.0))
    plain = PopulationESTrainer(_cfg(**cfg), tmp_path / "c", suite=suite())
    assert reweighted.pool == in_file.pool and reweighted.val == in_file.val
    assert reweighted.pool != plain.pool
    assert sum(d.label == "quad2" for d in reweighted.pool) > sum(d.label == "quad2" for d in plain.pool)
    with pytest.raises(ValueError, match="entry_weights.*nope"):
        PopulationESTrainer(_cfg(entry_weights={"nope": 2.0}), tmp_path / "d", suite=suite())
    for bad in ({"quad": 0.0}, {"quad": float("nan")}, ["quad"], {"quad": True}):
        with pytest.raises(ValueError, match="entry_weights"):
            ESConfig.from_table({"entry_weights": bad})


def test_es_refuses_changed_settings_on_resume(tmp_path):
    suite = _tiny_suite()
    PopulationESTrainer(_cfg(meta_steps=1), tmp_path, suite=suite).run(progress=False)
    with pytest.raises(ValueError, match="sigma"):
        PopulationESTrainer(_cfg(sigma=0.2), tmp_path, suite=suite).run(progress=False)


def test_es_config_from_table_names_bad_keys():
    with pytest.raises(ValueError, match="bogus"):
        ESConfig.from_table({"bogus": 1})
    with pytest.raises(ValueError, match="pairs"):
        ESConfig.from_table({"pairs": 0})
    assert ESConfig.from_table({"horizon": [5, 9]}).horizon == (5, 9)


def test_es_long_draws_come_from_their_labels_and_horizons(tmp_path, monkeypatch):
    data = {"suite": {"steps": 20, "seeds": {"train": [0, 100], "validation": [100, 200], "test": [200, 300]},
                      "family": [{"label": "quad", "family": "quadratic", "settings": {"dim": 3}},
                                 {"label": "deep", "family": "quadratic", "settings": {"dim": 5}}]}}
    suite = parse_suite(data, name="two")
    cfg = _cfg(meta_steps=4, long_labels=("deep",), long_horizon=(30, 40), long_pool=2, long_every=2, long_val=3)
    trainer = PopulationESTrainer(cfg, tmp_path, suite=suite)
    long_val = trainer.val[cfg.val_tasks:]
    assert len(trainer.val) == cfg.val_tasks + 3 and len(trainer.long_pool) == 2
    assert all(d.label == "deep" and 30 <= d.steps <= 40 and d.seed in range(100, 200) for d in long_val)
    assert all(d.label == "deep" and 30 <= d.steps <= 40 and d.seed in range(0, 100) for d in trainer.long_pool)
    assert all(d.steps <= 20 for d in trainer.pool)
    seen = []
    score = trainer.score
    monkeypatch.setattr(trainer, "score", lambda draw, *a: (seen.append((trainer.step, draw)), score(draw, *a))[1])
    row = trainer.run(progress=False)
    long_steps = sorted({step for step, d in seen if d in trainer.long_pool})
    assert long_steps == [1, 3]  # a long training draw on every second meta-step, none in between
    assert "val_long_ratio_told" in row and "val_long_ratio_free" in row
    again = trainer.evaluate()
    thetas = trainer.theta.detach().unsqueeze(0).repeat(2, 1)
    logs = [r for _, r, _ in trainer.validation_runs(thetas, [True, False])][cfg.val_tasks:]
    for j, mode in enumerate(("told", "free")):  # the long draws alone: the last long_val of the validation
        assert again[f"val_long_ratio_{mode}"] == pytest.approx(math.exp(sum(float(r[j]) for r in logs) / 3))


def test_es_scores_runs_with_the_recipes_weight_decay(tmp_path):
    """weight_decay reaches every member's steps as the optimizer's coupled decay does: a strong decay
    pulls the quadratics' parameters towards 0, away from their minimum, so every score worsens."""
    suite = _tiny_suite()
    thetas = PopulationESTrainer(_cfg(), tmp_path / "a", suite=suite).theta.detach().unsqueeze(0).repeat(2, 1)

    def logs(wd):
        trainer = PopulationESTrainer(_cfg(weight_decay=wd), tmp_path / str(wd), suite=suite)
        return torch.stack([r for _, r, _ in trainer.validation_runs(thetas, [True, False])])

    plain, decayed = logs(0.0), logs(5.0)
    assert bool((decayed > plain).all())
    with pytest.raises(ValueError, match="weight_decay"):
        ESConfig.from_table({"weight_decay": -1e-3})


def test_es_long_settings_are_checked():
    with pytest.raises(ValueError, match="long_labels"):
        ESConfig.from_table({"long_val": 2})
    with pytest.raises(ValueError, match="long_every and long_pool"):
        ESConfig.from_table({"long_labels": ["a"], "long_every": 3})
    for bad in ([50, 10], 5):
        with pytest.raises(ValueError, match="long_horizon"):
            ESConfig.from_table({"long_horizon": bad})
    with pytest.raises(ValueError, match="long_labels"):
        ESConfig.from_table({"long_labels": "deep", "long_val": 1})
    with pytest.raises(ValueError, match="no entry"):
        PopulationESTrainer(_cfg(long_labels=("nope",), long_val=1), "unused", suite=_tiny_suite())


def test_quadratic_family_for_es_reference_is_deterministic():
    task = QuadraticFamily(dim=4).sample(0)
    a, b = adam_sweep(task, 0, 5, [0.1]), adam_sweep(task, 0, 5, [0.1])
    assert torch.equal(a.final_losses, b.final_losses) and np.isfinite(a.initial_loss)


def test_es_run_holds_the_out_lock(tmp_path):
    from learned_opt.lockfile import DirectoryLockError, lock_directory

    with lock_directory(tmp_path / "run"):
        with pytest.raises(DirectoryLockError):
            PopulationESTrainer(_cfg(meta_steps=1), tmp_path / "run", suite=_tiny_suite()).run(progress=False)


ES_HPARAM_TABLES = {
    "GradNormDecayAdam": {"name": "grad-norm-decay-adam", "relative": True, "patience": 2, "cooldown": 3,
                          "init_threshold": 0.5},
    "GradNormDecaySGD": {"name": "grad-norm-decay-sgd", "relative": True, "reference": "peak", "smoothing": 0.5,
                         "blowup": 1.5, "momentum": 0.9, "patience": 1, "cooldown": 3, "init_lr": 0.05,
                         "init_threshold": 0.7},
    "HypergradientSGD": {"name": "hypergradient-sgd", "normalized": True, "momentum": 0.9, "init_lr": 0.05,
                         "init_hyper_lr": 0.05, "blowup": 1.5, "smoothing": 0.9, "blowup_recovery": 1.1},
    "SGD": {"name": "learnable-sgd", "init_lr": 0.05},
}


@pytest.mark.parametrize("public", sorted(ES_HPARAM_TABLES))
def test_es_meta_trains_a_hyperparameter_rule(tmp_path, public):
    """The engine takes any rule with ``with_theta`` (the recipes' hyperparameter rules here, their
    triggers included), whose batched runs match the public optimizer's; it meta-trains, exports,
    and the weights load as the rule's public class."""
    from learned_opt.meta.es import es_rule

    table = ES_HPARAM_TABLES[public]
    trainer = PopulationESTrainer(_cfg(meta_steps=2, rule=table, horizon_known=0.0), tmp_path / "gnd",
                                  suite=_tiny_suite())
    assert not trainer.horizon_aware
    draw = trainer.val[0]
    n = trainer.theta.numel()
    thetas = trainer.theta.detach().unsqueeze(0) + torch.tensor([[0.0] * n, [0.5, -0.3, 0.2][:n]])
    result_r, _ = trainer.score(draw, thetas, torch.zeros(2))
    task = trainer.task(draw)
    ref, initial = trainer.reference(draw)
    for i in range(2):
        member = es_rule(table)
        torch.nn.utils.vector_to_parameters(thetas[i].clone(), member.parameters())
        single = run(task, lambda ps: LearnedOptimizer(ps, member), draw.seed, draw.steps, draw.steps)
        expect = log_ratio(torch.tensor(single.losses[-1]), initial, ref, torch.tensor(False), trainer.cfg.ratio_clip)
        assert float(result_r[i]) == pytest.approx(float(expect), rel=1e-3, abs=1e-4)
    trainer.run(progress=False)
    opt = learned_opt.load_optimizer(tmp_path / "gnd" / "best.safetensors", small_params())
    assert type(opt).__name__ == public
    with pytest.raises(ValueError, match="with_theta"):
        es_rule({"name": "lstm"})


def test_benchmark_cache_tells_apart_the_same_theta_with_other_rule_settings(tmp_path):
    """A weights file's cache identity holds its card's settings: the same θ exported with
    ``schedule_free`` switched on must not reuse the runs of the plain rule."""
    from learned_opt.weights import save_weights

    plain = LearnedRelativeAdamRule(hidden=0)
    free = LearnedRelativeAdamRule(hidden=0, schedule_free=True)
    free.load_state_dict(plain.state_dict())
    a = save_weights(plain, tmp_path / "a", name="a", meta_training={})
    b = save_weights(free, tmp_path / "b", name="b", meta_training={})
    key_a, key_b = resolve_optimizer(str(a)).key, resolve_optimizer(str(b)).key
    assert key_a["weights_sha256"] == key_b["weights_sha256"] and key_a != key_b


def test_a_finished_es_run_rerun_exports_without_evaluating_again(tmp_path, monkeypatch):
    """Rerunning a finished run (same meta_steps) only exports it; a longer run redoes the closing
    evaluation at its old last step, since training goes on from there."""
    suite = _tiny_suite()
    first = PopulationESTrainer(_cfg(meta_steps=2), tmp_path, suite=suite)
    first.run(progress=False)
    again = PopulationESTrainer(_cfg(meta_steps=2), tmp_path, suite=suite)
    calls = []
    monkeypatch.setattr(again, "evaluate", lambda: calls.append(1) or {})
    assert again.run(progress=False) == first.best and not calls and again.history == first.history
    longer = PopulationESTrainer(_cfg(meta_steps=4), tmp_path, suite=suite)
    longer.run(progress=False)
    assert [r["step"] for r in longer.history] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="past meta_steps = 3"):  # a shorter run than the one on disk: no loop
        PopulationESTrainer(_cfg(meta_steps=3), tmp_path, suite=suite).run(progress=False)


def test_a_resumed_es_run_refuses_a_start_that_has_changed(tmp_path):
    """A warm-started run keeps the sha256 of the weights it started from; if they changed since
    (regenerated), resuming would mix two starts, so it is refused, naming init_weights."""
    from learned_opt.weights import load_rule, save_weights

    suite = _tiny_suite()
    start = tmp_path / "start"
    rule = {"hidden": 0}
    save_weights(PopulationESTrainer(_cfg(rule=rule), tmp_path / "x", suite=suite).rule, start, name="start",
                 meta_training={})
    cfg = dict(meta_steps=1, rule=rule, init_weights=str(start) + ".safetensors")
    PopulationESTrainer(_cfg(**cfg), tmp_path / "run", suite=suite).run(progress=False)
    PopulationESTrainer(_cfg(**{**cfg, "meta_steps": 2}), tmp_path / "run", suite=suite).run(progress=False)
    other, _ = load_rule(str(start) + ".safetensors")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_weights(other, start, name="start", meta_training={})
    with pytest.raises(ValueError, match="init_weights"):
        PopulationESTrainer(_cfg(**{**cfg, "meta_steps": 3}), tmp_path / "run", suite=suite).run(progress=False)


def test_es_resumes_a_checkpoint_written_before_the_long_settings_existed(tmp_path):
    from learned_opt.meta.checkpoint import load_checkpoint, save_checkpoint
    from learned_opt.meta.es import CHECKPOINT

    suite = _tiny_suite()
    PopulationESTrainer(_cfg(meta_steps=1), tmp_path, suite=suite).run(progress=False)
    payload = load_checkpoint(tmp_path / CHECKPOINT)
    payload["config"] = {k: v for k, v in payload["config"].items() if not k.startswith("long_")}
    save_checkpoint(tmp_path / CHECKPOINT, payload)
    resumed = PopulationESTrainer(_cfg(meta_steps=2), tmp_path, suite=suite)
    resumed.run(progress=False)
    assert resumed.step == 2
    with pytest.raises(ValueError, match="long_val"):
        PopulationESTrainer(_cfg(meta_steps=3, long_labels=("quad",), long_val=1), tmp_path, suite=suite).run(progress=False)


def test_es_trains_the_travel_row(tmp_path):
    """ES runs a rule with the travel input (its sixth state scalar vmapped with the rest) and updates
    the row with the rest of θ (the engine's steps match the optimizer's: see the population tests)."""
    rule = {"hidden": 0, "schedule_free": True, "init_anchor": 0.5, "init_travel_gain": 1.0}
    trainer = PopulationESTrainer(_cfg(meta_steps=2, rule=rule), tmp_path, suite=_tiny_suite())
    trainer.run(progress=False)
    names = [n for n, _ in trainer.rule.named_parameters()]
    start = torch.nn.utils.parameters_to_vector(trainer.rule.parameters()).detach()
    row = slice(len(start) - 2, len(start))
    assert names[-1] == "ctrl.ws_travel" and torch.equal(start[row], torch.tensor([1.0, 0.0]))
    assert not torch.equal(trainer.theta.detach()[row], start[row])


def _filed_suite(tmp_path, text="tiny v1"):
    """The tiny suite as if read from a file with ``text`` in it (shared references key on the file)."""
    import dataclasses

    path = tmp_path / f"suite-{abs(hash(text))}.toml"
    path.write_text(text)
    return dataclasses.replace(_tiny_suite(), path=path)


def test_es_runs_share_references_through_a_file_without_changing_a_bit(tmp_path, monkeypatch):
    """A second run with the same suite file reads every reference the first computed (none
    recomputed) and trains bitwise as a run without the shared file; another suite file, another
    thread count, other code or an unreadable file shares nothing."""
    from learned_opt.meta import es as es_module

    calls = []
    real = es_module.tuned_adam_final
    monkeypatch.setattr(es_module, "tuned_adam_final", lambda *a: calls.append(a) or real(*a))
    shared = tmp_path / "refs.json"
    alone = PopulationESTrainer(_cfg(), tmp_path / "alone", suite=_filed_suite(tmp_path))
    alone.run(progress=False)
    computed = len(calls)
    first = PopulationESTrainer(_cfg(), tmp_path / "first", suite=_filed_suite(tmp_path), shared_refs=shared)
    first.run(progress=False)
    assert len(calls) == 2 * computed and torch.equal(first.theta.detach(), alone.theta.detach())
    second = PopulationESTrainer(_cfg(), tmp_path / "second", suite=_filed_suite(tmp_path), shared_refs=shared)
    second.run(progress=False)
    assert len(calls) == 2 * computed  # every reference came from the file
    assert torch.equal(second.theta.detach(), alone.theta.detach()) and second.refs == alone.refs
    PopulationESTrainer(_cfg(), tmp_path / "other", suite=_filed_suite(tmp_path, "tiny v2"),
                        shared_refs=shared).run(progress=False)
    assert len(calls) == 3 * computed  # another suite file: its own references
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert PopulationESTrainer(_cfg(), tmp_path / "t", suite=_filed_suite(tmp_path),
                                   shared_refs=shared).shared.get(next(iter(alone.refs))) is None
    finally:
        torch.set_num_threads(threads)
    from learned_opt.meta import references

    monkeypatch.setattr(references, "source_digest", lambda: "changed-code")
    assert PopulationESTrainer(_cfg(), tmp_path / "c", suite=_filed_suite(tmp_path),
                               shared_refs=shared).shared.get(next(iter(alone.refs))) is None  # other code
    monkeypatch.undo()
    monkeypatch.setattr(es_module, "tuned_adam_final", lambda *a: calls.append(a) or real(*a))
    shared.write_text("{not json")
    broken = PopulationESTrainer(_cfg(), tmp_path / "broken", suite=_filed_suite(tmp_path), shared_refs=shared)
    broken.run(progress=False)
    assert len(calls) == 4 * computed and torch.equal(broken.theta.detach(), alone.theta.detach())
    with pytest.raises(ValueError, match="no file"):
        PopulationESTrainer(_cfg(), tmp_path / "nofile", suite=_tiny_suite(), shared_refs=shared)
