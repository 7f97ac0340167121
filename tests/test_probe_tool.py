"""The θ probe tool (tools/probe.py): member parsing and edits; its scoring is the ES trainer's own."""

import pytest
import torch

import argparse

from tools.probe import apply_edits, parse_member, probe_config, rule_table


def test_member_edits_set_and_shift_entries_and_elements():
    label, edits = parse_member("faster: log_alpha+=0.5; ctrl.ws[0,1]=2; logit_final=-1")
    assert label == "faster"
    theta = {"log_alpha": torch.tensor(-3.0), "ctrl.ws": torch.zeros(2, 2), "logit_final": torch.tensor(0.0)}
    out = apply_edits(theta, edits)
    assert float(out["log_alpha"]) == pytest.approx(-2.5) and float(out["logit_final"]) == -1.0
    assert out["ctrl.ws"].tolist() == [[0.0, 2.0], [0.0, 0.0]]
    assert float(theta["log_alpha"]) == -3.0  # the given θ is not mutated
    assert parse_member("unchanged:") == ("unchanged", [])


def test_bad_member_edits_are_named():
    with pytest.raises(ValueError, match="log_alpha=fast"):
        parse_member("x: log_alpha=fast")
    with pytest.raises(ValueError, match="unknown θ entry 'nope'"):
        apply_edits({"log_alpha": torch.tensor(0.0)}, parse_member("x: nope=1")[1])


def test_the_probed_rule_defaults_to_the_weights_card():
    table = rule_table(None, "learned_opt/pretrained/default.safetensors")
    assert table["name"] == "learned-relative-adam" and "init_final" in table
    assert rule_table('{"hidden": 0}', "learned_opt/pretrained/default.safetensors") == {"hidden": 0}
    assert rule_table(None, None) == {}


def test_a_probe_takes_its_draws_and_weight_decay_from_a_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[ship]\nsuite = "quickstart"\ndefaults = { weight_decay = 0.01 }\n[population_es]\n'
                      'val_tasks = 5\nhorizon = [20, 30]\npool = 64\nweight_decay = 0.01\nrule = { hidden = 0 }\n')
    args = argparse.Namespace(recipe=str(recipe), rule=None, weights=None, weight_decay=None)
    cfg = probe_config(args)
    assert (cfg.val_tasks, cfg.horizon, cfg.pool, cfg.weight_decay, cfg.rule) == (5, (20, 30), 1, 0.01, {"hidden": 0})
    assert cfg.suite == "quickstart"
    args.weight_decay = 0.0
    assert probe_config(args).weight_decay == 0.0
    args.weight_decay = -1.0
    with pytest.raises(ValueError, match="weight_decay"):
        probe_config(args)


def test_a_probe_runs_shipped_weights_with_their_cards_weight_decay():
    args = argparse.Namespace(recipe=None, rule=None, weights="learned_opt/pretrained/default-free.safetensors",
                              weight_decay=None, suite="meta_train_general", val_tasks=4, seed=0, horizon=(50, 60))
    assert probe_config(args).weight_decay == 1e-4
    args.weight_decay = 0.0
    assert probe_config(args).weight_decay == 0.0


def test_a_probe_loads_weights_as_a_warm_start_does(tmp_path, capsys, monkeypatch):
    """Weights are verified and fitted by copy_weights: a rule of another form is refused (exit 2,
    the error names the mismatch); the rule's added travel row keeps its start, the rest is theirs."""
    import json

    import tools.probe as P
    from learned_opt.weights import load_rule

    weights = "learned_opt/pretrained/default-free.safetensors"
    common = ["--weights", weights, "--member", "a:", "--suite", "quickstart", "--val-tasks", "1",
              "--horizon", "5", "5", "--out", str(tmp_path / "p")]
    assert P.main([*common, "--rule", '{"hidden": 4}']) == 2
    assert "do not fit rule" in capsys.readouterr().err
    rows = []
    monkeypatch.setattr(P, "probe", lambda trainer, members, **kw: rows.append(
        {n: p.detach().clone() for n, p in trainer.rule.named_parameters()}) or [])
    table = {**rule_table(None, weights), "init_travel_gain": 0.5}
    table.pop("name")
    assert P.main([*common, "--rule", json.dumps(table)]) == 0
    shipped = dict(load_rule(weights)[0].named_parameters())
    assert all(torch.equal(rows[0][n], p) for n, p in shipped.items())
    assert rows[0]["ctrl.ws_travel"].tolist() == [[0.5, 0.0]]
