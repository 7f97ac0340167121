"""Suite files: every shipped suite parses and samples; bad files give errors naming file and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from learned_opt.suites import CHECKOUT_SUITES, check_table, list_suites, load_suite

SUITE_FILES = sorted(CHECKOUT_SUITES.glob("*.toml"))

GOOD = """
[suite]
steps = 20
seeds = { train = [0, 100], validation = [100, 110], test = [110, 120] }

[[suite.family]]
label = "quad"
family = "quadratic"
weight = 3
[suite.family.settings]
dim = { int = [2, 5] }

[[suite.family]]
label = "spirals-long"
family = "mlp_classification"
steps = 50
[suite.family.settings]
width = 8
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_required_suites_exist():
    assert {"meta_train", "heldout", "l2l_quadratic", "l2l_mnist"} <= set(list_suites())


@pytest.mark.parametrize("path", SUITE_FILES, ids=[p.stem for p in SUITE_FILES])
def test_every_suite_parses_and_samples_every_entry(path, need_data):
    suite = load_suite(path)
    assert suite.name == path.stem and suite.entries
    for entry in suite.entries:
        for split in ("train", "validation", "test"):
            seed = suite.seeds[split].start
            task = need_data(lambda: entry.task(seed))
            g = torch.Generator().manual_seed(seed)
            params = task.init_params(g)
            assert torch.isfinite(task.loss(params, task.sample_batch(g))), (entry.label, split)
            assert torch.isfinite(task.eval_loss(params)), entry.label


def test_paper_setups():
    quad = load_suite("l2l_quadratic")
    (entry,) = quad.entries
    assert entry.steps == 100 and entry.family.sample(0).W.shape == (10, 10)
    mnist = load_suite("l2l_mnist")
    (entry,) = mnist.entries
    s = entry.family.settings
    assert entry.steps == 100 and (s["dataset"], s["width"], s["depth"], s["activation"], s["batch_size"]) == (
        "mnist", 20, 1, "sigmoid", 128)


def test_heldout_is_out_of_distribution_for_meta_train():
    train, held = load_suite("meta_train"), load_suite("heldout")
    assert len(held.entries) >= 12

    def values(suite, key, family=None):
        out = set()
        for e in suite.entries:
            if family and e.family.name != family:
                continue
            spec = e.family.settings.get(key)
            if isinstance(spec, dict):
                ((kind, v),) = spec.items()
                out |= set(v) if kind == "choice" else set(range(int(v[0]), int(v[1]) + 1))
            elif spec is not None:
                out.add(spec)
        return out

    train_acts = values(train, "activation")
    assert train_acts.isdisjoint({"relu", "gelu"})
    train_width, train_depth = max(values(train, "width")), max(values(train, "depth"))
    deep = [e for e in held.entries if e.family.settings.get("activation") in ("relu", "gelu")
            and e.family.name == "mlp_classification"]
    assert {e.family.settings["activation"] for e in deep} == {"relu", "gelu"}
    assert any(e.family.settings["width"] > train_width and e.family.settings["depth"] > train_depth for e in deep)
    held_data = values(held, "dataset")
    assert {"breast_cancer", "wine", "mnist1d"} <= held_data and not {"breast_cancer", "wine", "mnist1d"} & values(train, "dataset")
    assert "cnn_classification" in {e.family.name for e in held.entries}
    assert 1000.0 in values(held, "condition", "quadratic") and values(train, "condition", "quadratic") <= {0.0}
    assert max(values(held, "noise", "linear_regression")) > 2 * max(
        v for e in train.entries if e.family.name == "linear_regression" for v in e.family.settings["noise"]["log_uniform"])
    assert sum(e.steps == 1000 for e in held.entries) >= 2


def test_seed_splits_are_disjoint_in_every_suite():
    for path in SUITE_FILES:
        seeds = load_suite(path).seeds
        assert set(seeds) == {"train", "validation", "test"}
        ranges = [set(r) for r in seeds.values()]
        assert not (ranges[0] & ranges[1] or ranges[0] & ranges[2] or ranges[1] & ranges[2])


def test_sample_uses_split_seeds_and_weights(tmp_path):
    suite = load_suite(write(tmp_path, GOOD))
    assert [e.steps for e in suite.entries] == [20, 50] and suite.steps == 20
    rng = np.random.default_rng(0)
    draws = [suite.sample("validation", rng) for _ in range(400)]
    assert all(100 <= seed < 110 for _, seed in draws)
    share = np.mean([e.label == "quad" for e, _ in draws])
    assert 0.68 < share < 0.82  # weight 3 : 1
    again = [suite.sample("validation", np.random.default_rng(0)) for _ in range(3)]
    assert [(e.label, s) for e, s in again] == [(draws[0][0].label, draws[0][1])] * 3
    with pytest.raises(ValueError, match="'holdout'"):
        suite.sample("holdout", rng)
    assert suite.entry("quad") is suite.entries[0]


def test_other_tables_are_kept_raw(tmp_path):
    suite = load_suite(write(tmp_path, GOOD + '\n[meta_train]\nrule = "lstm"\n'))
    assert suite.tables == {"meta_train": {"rule": "lstm"}}


@pytest.mark.parametrize(
    "edit,message",
    [
        (("steps = 20", "steps = 20\nstpes = 3"), r"unknown key\(s\) \['stpes'\] in \[suite\]; allowed keys: \['description', 'family', 'name', 'seeds', 'steps'\]"),
        (('weight = 3', 'weight = 3\nwieght = 1'), r"unknown key\(s\) \['wieght'\] in \[suite.family\[0\]\]; allowed keys: \["),
        (("width = 8", "width = 8\nwidht = 3"), r"\(spirals-long\): unknown setting\(s\) \['widht'\] for task family 'mlp_classification'; allowed: \["),
        (('family = "quadratic"', 'family = "quadratics"'), r"unknown task family 'quadratics'"),
        (("test = [110, 120]", "test = [105, 120]"), r"validation \[100, 110\] and test \[105, 120\] overlap"),
        ((", test = [110, 120]", ""), r"seeds.test must be a half-open range"),
        (("train = [0, 100]", "train = [0, 100], holdout = [7, 8]"), r"unknown key\(s\) \['holdout'\] in \[suite.seeds\]"),
        (('label = "spirals-long"', 'label = "quad"'), r"duplicate entry label\(s\) \['quad'\]"),
        (("dim = { int = [2, 5] }", "dim = { int = [5, 2] }"), r"quadratic.dim: int needs integers low <= high"),
        (("steps = 50", "steps = -1"), r"steps must be a positive int"),
        (("[suite.family.settings]\nwidth = 8", "settings = 3"), r"\[suite.family\[1\]\].settings must be a table"),
        (("weight = 3", "weight = 0"), r"weight must be a finite number > 0, got 0"),
        (("width = 8", 'width = 8\nactivation = "swish"'), r"\(spirals-long\): mlp_classification: activation \['swish'\] not supported"),
        # Types and ranges: caught when the file loads, never in the middle of a run.
        (("steps = 20", "steps = true"), r"\[suite\].steps must be a positive int, got True"),
        (("steps = 50", "steps = true"), r"\[suite.family\[1\]\] \(spirals-long\): steps must be a positive int, got True"),
        (("weight = 3", "weight = nan"), r"\[suite.family\[0\]\] \(quad\): weight must be a finite number > 0, got nan"),
        (("weight = 3", "weight = inf"), r"\(quad\): weight must be a finite number > 0, got inf"),
        (("weight = 3", "weight = true"), r"\(quad\): weight must be a finite number > 0, got True"),
        (("dim = { int = [2, 5] }", 'dim = "five"'), r"\[suite.family\[0\]\] \(quad\): quadratic.dim must be an integer, got 'five'"),
        (("dim = { int = [2, 5] }", 'dim = { choice = [2, "five"] }'), r"\(quad\): quadratic.dim must be an integer, got 'five'"),
        (("dim = { int = [2, 5] }", "dim = { uniform = [2, 5] }"), r"quadratic.dim takes integers, but uniform draws fractions"),
        (("dim = { int = [2, 5] }", "dim = { int = [0, 5] }"), r"\(quad\): quadratic.dim must be >= 1, got \{'int': \[0, 5\]\}"),
        (("width = 8", "width = 8.5"), r"mlp_classification.width must be an integer \(or a list of them\), got 8.5"),
        (("width = 8", "width = [8, 0]\ndepth = 2"), r"mlp_classification.width must be >= 1, got \[8, 0\]"),
        (("width = 8", "width = 8\nbatch_size = true"), r"mlp_classification.batch_size must be an integer, got True"),
        (("width = 8", "width = 8\ninit_scale = nan"), r"mlp_classification.init_scale must be a finite number, got nan"),
        (("width = 8", "width = 8\nnoise = { uniform = [0, inf] }"), r"mlp_classification.noise: uniform needs finite bounds"),
        (("width = 8", 'width = 8\nactivation = 3'), r"mlp_classification.activation must be a string, got 3"),
    ],
)
def test_bad_suite_files_name_file_and_key(tmp_path, edit, message):
    old, new = edit
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1), "bad.toml")
    with pytest.raises(ValueError, match=message) as err:
        load_suite(path)
    assert str(path) in str(err.value)


def test_per_layer_widths_and_int_bounds_for_number_settings_load(tmp_path):
    text = GOOD.replace("width = 8", "width = { choice = [[8, 4], [16, 16]] }\ndepth = 2\nnoise = { int = [0, 1] }")
    entry = load_suite(write(tmp_path, text)).entries[1]
    assert len(entry.task(0).init_params(torch.Generator().manual_seed(0))) == 6


def test_invalid_toml_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="invalid TOML"):
        load_suite(write(tmp_path, "[suite\n"))
    with pytest.raises(ValueError, match=r"no \[suite\] table"):
        load_suite(write(tmp_path, "[benchmark]\nx = 1\n"))
    with pytest.raises(ValueError, match=r"unknown top-level table\(s\) \['benchmrk'\]; allowed: \['suite', 'meta_train', 'benchmark'\]"):
        load_suite(write(tmp_path, GOOD + "\n[benchmrk]\nseeds = 3\n"))
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        load_suite(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match=r"unknown suite 'helout'; known suites: \[.*'heldout'"):
        load_suite("helout")


def test_user_family_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_families.py").write_text(textwrap.dedent("""
        from learned_opt.tasks import QuadraticFamily

        class Tiny(QuadraticFamily):
            name = "tiny"
            defaults = {**QuadraticFamily.defaults, "dim": 3}

        NotAFamily = int
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = load_suite(write(tmp_path, GOOD.replace('"quadratic"', '"my_families:Tiny"').replace("dim = { int = [2, 5] }", "")))
    assert suite.entries[0].task(0).W.shape == (3, 3)
    with pytest.raises(ValueError, match="not a TaskFamily"):
        load_suite(write(tmp_path, GOOD.replace('"quadratic"', '"my_families:NotAFamily"')))
    with pytest.raises(ValueError, match="cannot import task family 'no_such_module:X'"):
        load_suite(write(tmp_path, GOOD.replace('"quadratic"', '"no_such_module:X"')))


def test_check_table_merges_defaults_and_rejects_unknown_keys():
    allowed = {"rule": "lstm", "unroll": 20}
    assert check_table({"unroll": 5}, allowed, file="f.toml", table_name="meta_train") == {"rule": "lstm", "unroll": 5}
    with pytest.raises(ValueError, match=r"f.toml: unknown key\(s\) \['unrol'\] in \[meta_train\]; allowed keys: \['rule', 'unroll'\]"):
        check_table({"unrol": 5}, allowed, file="f.toml", table_name="meta_train")
