"""Shipped weights: every file under learned_opt/pretrained/ is honest and consistent.

Each shipped name has a recipe (the command that regenerates it), a card whose sha256 matches its
file, benchmark figures pointing at committed results, and the README shows the generated table.
"""

from __future__ import annotations

import pytest

import torch

from learned_opt import load_optimizer
from learned_opt.weights import PRETRAINED_DIR, file_sha256, list_pretrained, load_rule
from tools.ship import (HEADLINE_END, HEADLINE_START, README, REPO, TABLE_END, TABLE_START, generated_table,
                        headline_table, list_recipes, load_recipe)

SHIPPED = list_pretrained()


def test_pretrained_dir_holds_only_complete_pairs():
    stems = {p.stem for p in PRETRAINED_DIR.glob("*.safetensors")} | {p.stem for p in PRETRAINED_DIR.glob("*.json")}
    assert stems == set(SHIPPED), "every .safetensors needs its .json card and the other way round"
    assert set(SHIPPED) <= set(list_recipes()), "every shipped name is regenerated from a recipe"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_card_matches_file_and_cites_its_figures(name):
    import json

    card = json.loads((PRETRAINED_DIR / f"{name}.json").read_text())
    assert card["name"] == name
    assert card["sha256"] == file_sha256(PRETRAINED_DIR / f"{name}.safetensors")
    assert f"ship_pretrained.py {name}" in card["meta_training"]["command"]
    assert card["meta_training"]["wall_time_s"] > 0
    load_rule(name)  # verifies sha256, tensor names and shapes
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    load_optimizer(name, [p]).step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.ones(3))
    suite = load_recipe(name)[0]["benchmark_suite"]
    figures = card["metrics"][suite]
    for key in ("results", "report"):
        assert (REPO / figures[key]).exists(), f"{name}: {figures[key]} is not committed"
    assert name in figures["command"]


@pytest.mark.parametrize("suite", sorted({load_recipe(n)[0]["benchmark_suite"] for n in SHIPPED}))
def test_readme_table_is_the_generated_report(suite):
    report = (REPO / "docs" / "results" / suite / "report.md").read_text()
    readme = README.read_text()
    start, end = TABLE_START.format(suite=suite), TABLE_END.format(suite=suite)
    assert start in readme and end in readme
    shown = readme.split(start, 1)[1].split(end, 1)[0].strip()
    assert shown == generated_table(report).strip()
    start, end = HEADLINE_START.format(suite=suite), HEADLINE_END.format(suite=suite)
    if start in readme:  # the first screen's rows, as generated
        shown = readme.split(start, 1)[1].split(end, 1)[0].strip()
        assert shown == headline_table(report).strip() and "| default |" in shown


@pytest.mark.parametrize("name", [n for n in SHIPPED if "population_es" in load_recipe(n)[1]])
def test_an_es_card_was_made_by_its_recipe(name):
    """The settings an ES-trained card records are its recipe's (keys added to ESConfig since the
    card was made must be at their defaults): a recipe edited without regenerating its weights fails."""
    import dataclasses
    import json

    from learned_opt.meta.es import ESConfig

    ship, tables, path = load_recipe(name)
    recipe = json.loads(json.dumps(dataclasses.asdict(
        ESConfig.from_table({"suite": ship["suite"], **tables["population_es"]}, str(path)))))
    card = json.loads((PRETRAINED_DIR / f"{name}.json").read_text())["meta_training"]["config"]
    defaults = json.loads(json.dumps(dataclasses.asdict(ESConfig())))
    assert {k: card.get(k, defaults[k]) for k in recipe} == recipe
