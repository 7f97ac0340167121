"""The ship pipeline end to end on a tiny recipe: meta-train, export, benchmark, cards, README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from learned_opt.weights import file_sha256, load_rule
from tools.ship import TABLE_END, TABLE_START, bench, headline_table, load_recipe, main, sync_card, train

NAME = "tiny"
SUITE = """
[suite]
steps = 10
seeds = {{ train = [0, 100], validation = [100, 200], test = [200, 300] }}
[[suite.family]]
label = "quad"
family = "quadratic"
[suite.family.settings]
dim = 4
[benchmark]
optimizers = ["adam"]
"""

RECIPE = """
[ship]
suite = "{suite}"
benchmark_suite = "{suite}"
[meta_train]
rule = "learnable-sgd"
meta_lr = 0.01
meta_steps = 2
tasks_per_step = 2
unroll = 5
eval_every = 1
eval_tasks = 2
checkpoint_every = 1
"""


@pytest.fixture
def setup(tmp_path):
    suite = tmp_path / "tiny.toml"
    suite.write_text(SUITE.format())
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "learnable-sgd.toml").write_text(RECIPE.format(suite=suite))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{TABLE_START.format(suite=NAME)}\nold\n{TABLE_END.format(suite=NAME)}\nrest\n")
    return tmp_path, suite, recipes, readme


def test_train_then_bench_exports_card_with_figures_and_readme_table(setup):
    tmp, suite, recipes, readme = setup
    pre, work, results = tmp / "pretrained", tmp / "work", tmp / "results"
    weights = train("learnable-sgd", work, progress=False, recipe_dir=recipes, pretrained_dir=pre)
    rule, card = load_rule(weights)
    assert card["name"] == "learnable-sgd" and card["sha256"] == file_sha256(weights)
    assert "ship_pretrained.py learnable-sgd" in card["meta_training"]["command"]
    assert card["meta_training"]["steps"] >= 1
    dest = bench(str(suite), ["learnable-sgd"], work, seeds=1, progress=False,
                 results_dir=results, pretrained_dir=pre, readme=readme)
    card = json.loads((pre / "learnable-sgd.json").read_text())
    figures = card["metrics"]["tiny"]
    assert figures["wins_vs_tuned_adam"] in (0, 1) and "learnable-sgd" in figures["command"]
    assert (dest / "report.md").exists() and (dest / "results.json").exists()
    text = readme.read_text()
    assert "old" not in text and "| learnable-sgd |" in text and text.startswith("intro\n") and text.endswith("rest\n")


def test_a_candidate_recipe_exports_beside_the_package_and_never_into_it(setup, monkeypatch):
    """--recipe-dir/--export-dir meta-train a candidate into a folder of its own and stop there: the
    shipped weights, cards and README are untouched, and half the pair is refused."""
    import tools.ship as ship

    tmp, _, recipes, _ = setup
    shipped = tmp / "package"
    monkeypatch.setattr(ship, "PRETRAINED_DIR", shipped)
    out = tmp / "candidate"
    monkeypatch.chdir(tmp)  # the shipped runs' folder, runs/ship, is relative: it must stay empty
    assert main(["learnable-sgd", "--recipe-dir", str(recipes), "--export-dir", str(out), "--no-progress"]) == 0
    assert load_rule(out / "learnable-sgd.safetensors")[1]["name"] == "learnable-sgd"
    assert (out / "runs" / "learnable-sgd").is_dir() and not (tmp / "runs").exists()
    assert not shipped.exists()
    for argv in (["learnable-sgd", "--recipe-dir", str(recipes)], ["learnable-sgd", "--export-dir", str(out), "--skip-train"]):
        with pytest.raises(SystemExit):
            main(argv)


def test_bad_recipes_are_rejected_with_the_file_named(tmp_path):
    (tmp_path / "x.toml").write_text('[ship]\nsuite = "meta_train"\nbogus = 1\n[meta_train]\nrule = "lstm"\n')
    with pytest.raises(ValueError, match=r"x\.toml.*bogus"):
        load_recipe("x", tmp_path)
    (tmp_path / "y.toml").write_text('[ship]\nsuite = "meta_train"\n')
    with pytest.raises(ValueError, match=r"y\.toml.*\[meta_train\]"):
        load_recipe("y", tmp_path)
    with pytest.raises(ValueError, match="no recipe"):
        load_recipe("nope", tmp_path)
    (tmp_path / "w.toml").write_text('[ship]\nsuite = "meta_train"\n[population_es]\nweight_decay = 0.001\n')
    with pytest.raises(ValueError, match=r"w\.toml.*must ship it too"):
        load_recipe("w", tmp_path)
    assert main(["nope-such-recipe", "--skip-bench"]) == 2


def test_the_script_runs_from_anywhere(tmp_path: Path) -> None:
    """``scripts/ship_pretrained.py`` finds the checkout's tools/ (not an installed package) from any cwd."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "ship_pretrained.py"
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--all" in out.stdout


def test_the_recipes_card_keys_reach_the_card_and_bad_ones_leave_it_as_it_was(tmp_path):
    from learned_opt.rules.relative import LearnedRelativeAdamRule
    from learned_opt.weights import read_card, save_weights

    meta = {"command": "pytest"}
    main_w = save_weights(LearnedRelativeAdamRule(hidden=0), tmp_path / "main", name="main", meta_training=meta)
    save_weights(LearnedRelativeAdamRule(hidden=0, schedule_free=True), tmp_path / "free", name="free",
                 meta_training=meta)
    ship = {"defaults": {"weight_decay": 1e-4}, "untold_weights": "free"}
    sync_card(main_w, ship)
    card = read_card(main_w)
    assert card["defaults"] == {"weight_decay": 1e-4} and card["untold_weights"] == "free"
    for bad in ({"defaults": {}, "untold_weights": "gone"}, {"defaults": {"lr": 1.0}, "untold_weights": None},
                {"defaults": {}, "untold_weights": "../main"}):
        with pytest.raises(ValueError, match=r"\[ship\] of 'main'"):
            sync_card(main_w, bad)
        assert read_card(main_w) == card
    sync_card(main_w, {"defaults": {}, "untold_weights": None})  # keys the recipe dropped leave the card
    assert "defaults" not in read_card(main_w) and "untold_weights" not in read_card(main_w)
    with pytest.raises(ValueError, match="meta-train the recipe first"):
        sync_card(tmp_path / "absent.safetensors", ship)


def test_headline_keeps_the_chosen_summary_rows_and_the_flagships_pairs():
    report = ("## Summary\n\n| optimizer | wins |\n|---|---|\n| adam (tuned) | 3/3 |\n| sgd | 0/3 |\n"
              "| default | 2/3 |\n\n## Head to head: the suite's pairs\n\ntext\n\n| optimizer | against | wins |\n"
              "|---|---|---|\n| GradNormDecaySGD | sgd | 1/3 |\n| default | adam-cosine | 2/3 |\n\n"
              "| task | default vs adam-cosine |\n|---|---|\n| q | ✓ |\n\n## Final loss\n| x |\n")
    assert headline_table(report) == ("| optimizer | wins |\n|---|---|\n| adam (tuned) | 3/3 |\n| default | 2/3 |\n\n"
                                      "| optimizer | against | wins |\n|---|---|---|\n| default | adam-cosine | 2/3 |\n")
    assert headline_table("## Summary\n\n| optimizer |\n|---|\n| sgd |\n") == "\n"


ES_RECIPE = """
[ship]
suite = "{suite}"
benchmark_suite = "{suite}"
[population_es]
meta_steps = 1
pairs = 1
tasks_per_step = 1
pool = 1
val_tasks = 1
eval_every = 1
horizon = [5, 5]
rule = {{ hidden = 0 }}
{extra}
"""


def test_a_recipe_chain_trains_what_it_needs_first_and_a_candidate_chain_starts_from_the_candidate(setup, monkeypatch):
    """A recipe is trained after the recipes its weights need (init_weights, untold_weights), which
    are added unless told not to; exported beside the package, it starts from that export, not
    from the shipped weights."""
    import tools.ship as ship
    from tools.ship import training_order

    tmp, suite, _, _ = setup
    recipes = tmp / "chain"
    recipes.mkdir()
    (recipes / "a.toml").write_text(ES_RECIPE.format(suite=suite, extra=""))
    (recipes / "b.toml").write_text(ES_RECIPE.format(suite=suite, extra='init_weights = "a"\ntrain_rows = ["ctrl.b2"]'))
    assert training_order(["b", "a"], recipes) == ["a", "b"] and training_order(["b"], recipes) == ["a", "b"]
    assert training_order(["b"], recipes, with_needs=False) == ["b"]
    (recipes / "c.toml").write_text(ES_RECIPE.format(suite=suite, extra="").replace(
        "[population_es]", 'untold_weights = "b"\n[population_es]'))
    assert training_order(["c"], recipes) == ["a", "b", "c"]  # the weights it runs untold, and their start
    monkeypatch.setattr(ship, "PRETRAINED_DIR", tmp / "package")
    out = tmp / "candidate"
    assert main(["b", "a", "--recipe-dir", str(recipes), "--export-dir", str(out), "--no-progress"]) == 0
    card_b = load_rule(out / "b.safetensors")[1]
    assert card_b["meta_training"]["config"]["init_weights"] == "a"  # named as shipped: the run resumes there too
    a, b = (dict(load_rule(out / f"{n}.safetensors")[0].named_parameters()) for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a if k != "ctrl.b2")  # b moved only its row, from a's θ
    assert "ship_pretrained.py b (recipe" in card_b["meta_training"]["command"]
    assert main(["b", "--no-needs", "--recipe-dir", str(recipes), "--export-dir", str(out), "--no-progress"]) == 0
    assert "ship_pretrained.py b --no-needs" in load_rule(out / "b.safetensors")[1]["meta_training"]["command"]
    (recipes / "a.toml").write_text(ES_RECIPE.format(suite=suite, extra='init_weights = "b"'))
    with pytest.raises(ValueError, match="cycle: a -> b -> a"):
        training_order(["a", "b"], recipes)
