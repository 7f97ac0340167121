"""Weights files: .safetensors + JSON card, verified on load; shipped names; load_optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import learned_opt
from learned_opt.optim import GradNormDecaySGD, HypergradientAdam, HypergradientSGD, LearnedOptimizer, LSTMOptimizer
from learned_opt.rules import (
    GradNormDecayRule,
    HypergradientAdamRule,
    HypergradientSGDRule,
    LearnableAdamRule,
    LearnableSGDRule,
    LSTMRule,
)
from learned_opt.weights import file_sha256, load_rule, save_weights

META = {"config": {"suite": "test"}, "seed": 0, "steps": 0, "wall_time_s": 0.0, "machine": "test", "command": "pytest"}


def _perturbed_lstm(seed: int = 0, **config) -> LSTMRule:
    torch.manual_seed(seed)
    rule = LSTMRule(**config)
    with torch.no_grad():
        for p in rule.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return rule


def test_round_trip_and_card_fields(tmp_path: Path) -> None:
    rule = _perturbed_lstm(hidden_size=8)
    path = save_weights(rule, tmp_path / "mine", name="mine", meta_training=META, metrics={"x": 1})
    assert path == tmp_path / "mine.safetensors" and (tmp_path / "mine.json").exists()
    card = json.loads((tmp_path / "mine.json").read_text())
    for key in ("format_version", "name", "rule", "rule_config", "sha256", "created", "meta_training", "metrics"):
        assert key in card
    assert card["sha256"] == file_sha256(path) and card["rule"] == "lstm" and card["rule_config"]["hidden_size"] == 8
    loaded, card2 = load_rule(path)
    assert card2 == card
    for (k, a), (k2, b) in zip(rule.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    loaded_by_str, _ = load_rule(str(path))
    assert torch.equal(loaded_by_str.head.weight, rule.head.weight)


def test_lstm_optimizer_defaults_to_lstm_general_and_none_is_untrained() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    assert LSTMOptimizer([p]).card["name"] == "lstm-general"
    opt = LSTMOptimizer([p], weights=None)
    assert isinstance(opt.rule, LSTMRule) and opt.card is None and opt.weights_sha256 is None


def test_unknown_name_lists_shipped() -> None:
    with pytest.raises(ValueError, match="unknown pretrained weights 'nope'"):
        load_rule("nope")


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_rule(tmp_path / "absent.safetensors")
    path = save_weights(_perturbed_lstm(), tmp_path / "w", name="w", meta_training=META)
    (tmp_path / "w.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"w\.json is missing"):
        load_rule(path)


def test_corrupt_card(tmp_path: Path) -> None:
    path = save_weights(_perturbed_lstm(), tmp_path / "w", name="w", meta_training=META)
    (tmp_path / "w.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"w\.json is not valid JSON"):
        load_rule(path)
    (tmp_path / "w.json").write_text(json.dumps({"name": "w"}))
    with pytest.raises(ValueError, match="lacks fields"):
        load_rule(path)


def test_tampered_weights_fail_sha256(tmp_path: Path) -> None:
    path = save_weights(_perturbed_lstm(), tmp_path / "w", name="w", meta_training=META)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"w\.safetensors has sha256 .* card says"):
        load_rule(path)


def test_corrupt_safetensors_with_matching_card(tmp_path: Path) -> None:
    path = save_weights(_perturbed_lstm(), tmp_path / "w", name="w", meta_training=META)
    path.write_bytes(b"\x00" * 16)
    card = json.loads((tmp_path / "w.json").read_text())
    card["sha256"] = file_sha256(path)
    (tmp_path / "w.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"w\.safetensors is not a valid safetensors"):
        load_rule(path)


def test_config_mismatch_names_tensor_and_shapes(tmp_path: Path) -> None:
    path = save_weights(_perturbed_lstm(hidden_size=8), tmp_path / "w", name="w", meta_training=META)
    card = json.loads((tmp_path / "w.json").read_text())
    card["rule_config"]["hidden_size"] = 9
    (tmp_path / "w.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"w\.safetensors does not match rule 'lstm'.*lstm\.weight_hh_l0"):
        load_rule(path)
    card["rule_config"]["hidden_size"] = 8
    card["rule_config"]["num_layers"] = 3
    (tmp_path / "w.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"missing \['lstm\.bias_hh_l2'"):
        load_rule(path)
    card["rule"] = "no-such-rule"
    (tmp_path / "w.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="unknown rule 'no-such-rule'"):
        load_rule(path)


def test_lstm_optimizer_from_path_records_sha(tmp_path: Path) -> None:
    path = save_weights(_perturbed_lstm(), tmp_path / "w", name="w", meta_training=META)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = LSTMOptimizer([p], weights=path)
    assert opt.weights_sha256 == file_sha256(path) and opt.card["name"] == "w"
    assert opt.state_dict()["learned_opt"]["weights_sha256"] == file_sha256(path)
    other = save_weights(GradNormDecayRule(), tmp_path / "g", name="g", meta_training=META)
    with pytest.raises(ValueError, match="holds rule 'grad-norm-decay-sgd'"):
        LSTMOptimizer([p], weights=other)


@pytest.mark.parametrize(
    ("rule", "cls", "expected"),
    [
        (GradNormDecayRule(init_lr=0.05, init_decay=0.8, init_threshold=1e-2), GradNormDecaySGD,
         {"init_lr": 0.05, "decay": 0.8, "threshold": 1e-2, "relative": False}),
        (HypergradientSGDRule(init_lr=0.02, init_hyper_lr=1e-4), HypergradientSGD,
         {"init_lr": 0.02, "hyper_lr": 1e-4, "normalized": False}),
        (HypergradientAdamRule(init_lr=3e-3, init_betas=(0.8, 0.99)), HypergradientAdam,
         {"init_lr": 3e-3, "betas": (0.8, 0.99)}),
        (LearnableAdamRule(init_lr=2e-3, init_betas=(0.85, 0.995), init_eps=1e-6), torch.optim.Adam,
         {"lr": 2e-3, "betas": (0.85, 0.995), "eps": 1e-6}),
        (LearnableSGDRule(init_lr=0.03, init_momentum=0.7), torch.optim.SGD, {"lr": 0.03, "momentum": 0.7}),
    ],
)
def test_load_optimizer_gives_public_class_with_learned_values(tmp_path: Path, rule, cls, expected) -> None:
    """The card's values are the defaults (a card without ``normalized``/``relative`` runs the form
    it was trained in); ``lr`` multiplies the learned rate (a torch optimizer's lr is their product)."""
    path = save_weights(rule, tmp_path / "h", name="h", meta_training=META)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = learned_opt.load_optimizer(path, [p])
    assert type(opt) is cls
    for key, value in expected.items():
        assert opt.defaults[key] == pytest.approx(value, rel=1e-5)
    over = learned_opt.load_optimizer(path, [p], lr=0.5)
    if isinstance(opt, LearnedOptimizer):
        assert opt.param_groups[0]["lr"] == 1.0 and over.param_groups[0]["lr"] == 0.5
        assert opt.weights_sha256 == file_sha256(path)
    else:
        assert over.param_groups[0]["lr"] == 0.5 * opt.param_groups[0]["lr"]


def test_load_optimizer_lstm(tmp_path: Path) -> None:
    rule = _perturbed_lstm(hidden_size=5)
    path = save_weights(rule, tmp_path / "l", name="l", meta_training=META)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = learned_opt.load_optimizer(path, [p], lr=0.5)
    assert isinstance(opt, LSTMOptimizer) and opt.param_groups[0]["lr"] == 0.5
    assert opt.rule.hidden_size == 5 and torch.equal(opt.rule.head.weight, rule.head.weight)
    assert opt.weights_sha256 == file_sha256(path)


def test_canonical_safetensors_is_independent_of_header_key_order() -> None:
    """Equal tensors and metadata give byte-equal files whatever order the header was written in."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from learned_opt.weights import canonical_safetensors

    data = st_save({"b": torch.arange(3.0), "a": torch.ones(2, 2)}, metadata={"x": "1", "rule": "lstm"})
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    reordered = json.dumps(dict(reversed(list(header.items()))), indent=1).encode()
    reordered += b" " * (-len(reordered) % 8)
    shuffled = len(reordered).to_bytes(8, "little") + reordered + data[8 + n :]
    assert shuffled != data
    assert canonical_safetensors(shuffled) == canonical_safetensors(data)
    loaded = st_load(canonical_safetensors(shuffled))
    assert torch.equal(loaded["a"], torch.ones(2, 2)) and torch.equal(loaded["b"], torch.arange(3.0))


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the file's JSON header in place and re-hash its card (a consistent forgery)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["sha256"] = file_sha256(path)
    card_path.write_text(json.dumps(card))


def test_retyped_tensor_is_refused(tmp_path: Path) -> None:
    """F32 bytes relabelled I32 (same shape, same size, card re-hashed) would load as ~1e9 values."""
    path = save_weights(_perturbed_lstm(), tmp_path / "w", name="w", meta_training=META)
    _rewrite_header(path, lambda h: h["head.weight"].update(dtype="I32"))
    with pytest.raises(ValueError, match=r"w\.safetensors does not match rule 'lstm'.*dtype mismatches \['head\.weight: file I32 vs rule float32'\]"):
        load_rule(path)


def test_other_float_widths_still_load_as_values(tmp_path: Path) -> None:
    """A float64 file loads into the float32 rule (cast by value, as load_state_dict does)."""
    rule = _perturbed_lstm().double()
    path = save_weights(rule, tmp_path / "w", name="w", meta_training=META)
    loaded, _ = load_rule(path)
    assert loaded.head.weight.dtype == torch.float32
    assert torch.equal(loaded.head.weight, rule.head.weight.float())


def test_card_architecture_is_checked_before_anything_is_allocated(tmp_path: Path, monkeypatch) -> None:
    """A card asking for hidden_size 30000 (14 GB of θ) fails on the file's header, naming the file;
    the rule it describes is only ever built on the meta device."""
    path = save_weights(_perturbed_lstm(hidden_size=8), tmp_path / "w", name="w", meta_training=META)
    card = json.loads((tmp_path / "w.json").read_text())
    card["rule_config"]["hidden_size"] = 30000
    (tmp_path / "w.json").write_text(json.dumps(card))
    real_init = LSTMRule.__init__

    def spy_init(self, *args, **kwargs):
        if kwargs.get("hidden_size") == 30000 and torch.empty(()).device.type != "meta":
            raise AssertionError("the card's architecture was allocated before checking the file")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(LSTMRule, "__init__", spy_init)
    with pytest.raises(ValueError, match=r"w\.safetensors does not match rule 'lstm'.*lstm\.weight_hh_l0: file \(32, 8\) vs rule \(120000, 30000\)"):
        load_rule(path)


def test_malformed_header_names_the_file(tmp_path: Path) -> None:
    path = save_weights(_perturbed_lstm(), tmp_path / "w", name="w", meta_training=META)
    _rewrite_header(path, lambda h: h["head.weight"].pop("shape"))
    with pytest.raises(ValueError, match=r"w\.safetensors is not a valid safetensors file"):
        load_rule(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format_version", True, r"format_version \(True is bool, must be int\)"),
        ("format_version", 1.0, r"format_version \(1\.0 is float, must be int\)"),
        ("rule_config", [], r"rule_config \(\[\] is list, must be dict\)"),
        ("rule", 3, r"rule \(3 is int, must be str\)"),
    ],
)
def test_card_fields_of_the_wrong_type_are_refused(tmp_path: Path, field: str, value, message: str) -> None:
    path = save_weights(_perturbed_lstm(), tmp_path / "w", name="w", meta_training=META)
    card = json.loads((tmp_path / "w.json").read_text())
    card[field] = value
    (tmp_path / "w.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"w\.json has fields of the wrong type: " + message):
        load_rule(path)


@pytest.mark.parametrize("weights", ["", ".", Path("")])
def test_empty_weights_path_is_a_clear_error(weights) -> None:
    with pytest.raises(ValueError, match=r"weights path '\.?' names no file; give a shipped name or a path"):
        load_rule(weights)
    with pytest.raises(ValueError, match="names no file"):
        LSTMOptimizer([torch.nn.Parameter(torch.zeros(2))], weights=weights)


def test_cards_cite_repo_suites_relative_to_the_repo(tmp_path: Path) -> None:
    """A card used to record the build machine's absolute suite path (/.../tasks/meta_train.toml)."""
    from learned_opt.meta.train import meta_train
    from learned_opt.weights import REPO, repo_relative

    suite = REPO / "tasks" / "l2l_quadratic.toml"
    meta_train(config=suite, out=tmp_path / "run", progress=False, rule_config={"hidden_size": 2, "num_layers": 1},
               meta_steps=1, tasks_per_step=1, unroll=2, horizon=2, eval_tasks=0)
    meta = json.loads((tmp_path / "run" / "final.json").read_text())["meta_training"]
    assert meta["suite"] == meta["config"]["suite"] == "tasks/l2l_quadratic.toml"
    elsewhere = tmp_path / "mine.toml"
    assert repo_relative(elsewhere) == str(elsewhere) and repo_relative("tasks/x.toml") == "tasks/x.toml"


def test_no_text_says_shipped_weights_are_yet_to_ship() -> None:
    """docs/speed.md and tasks/quickstart.toml said the `default` weights did not ship yet after they did."""
    import re

    from learned_opt.weights import REPO

    texts = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "tasks").rglob("*.toml")]
    for name in learned_opt.list_pretrained():
        stale = re.compile(rf"(\bno|\bonce the)\s+(trained\s+)?`{re.escape(name)}`\s+weights\s+ship\b", re.IGNORECASE)
        for path in texts:
            match = stale.search(" ".join(path.read_text(encoding="utf-8").split()))
            assert match is None, f"{path.relative_to(REPO)} says {match.group(0)!r} but {name!r} ships"


def _relative_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A told and an untold weights file of the learned relative rule (the second schedule-free),
    the first naming the second as its untold weights, with a weight-decay default."""
    from learned_opt.rules.relative import LearnedRelativeAdamRule

    told = save_weights(LearnedRelativeAdamRule(hidden=0), tmp_path / "main", name="main", meta_training=META)
    untold = save_weights(LearnedRelativeAdamRule(hidden=0, schedule_free=True, init_alpha=0.1), tmp_path / "free",
                          name="free", meta_training=META)
    for path, extra in ((told, {"untold_weights": "free"}), (untold, {"defaults": {"weight_decay": 0.25}})):
        card = json.loads(path.with_suffix(".json").read_text())
        path.with_suffix(".json").write_text(json.dumps({**card, **extra}))
    return told, untold


def test_a_cards_guard_defaults_reach_the_hypergradient_optimizer(tmp_path: Path) -> None:
    """A card's ``defaults`` may set a hypergradient rule's blow-up guard (chosen after training, as
    the shipped ``hypergradient-sgd``'s); a keyword replaces them."""
    path = save_weights(HypergradientSGDRule(init_lr=0.05, momentum=0.9, normalized=True), tmp_path / "g", name="g",
                        meta_training=META)
    card = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**card, "defaults": {"blowup": 3.0, "smoothing": 0.5}}))
    p = torch.nn.Parameter(torch.zeros(3))
    opt = learned_opt.load_optimizer(path, [p])
    assert opt.defaults["blowup"] == 3.0 and opt.defaults["smoothing"] == 0.5
    assert learned_opt.load_optimizer(path, [p], blowup=0.0).defaults["blowup"] == 0.0
    shipped = learned_opt.load_optimizer("hypergradient-sgd", [p])
    assert shipped.defaults["blowup"] > 1 and shipped.card["defaults"]["blowup"] == shipped.defaults["blowup"]
    # a card whose defaults its rule does not take: the error names the card
    other = save_weights(LearnableSGDRule(init_lr=0.03), tmp_path / "s", name="s", meta_training=META)
    card = json.loads(other.with_suffix(".json").read_text())
    other.with_suffix(".json").write_text(json.dumps({**card, "defaults": {"blowup": 3.0}}))
    with pytest.raises(ValueError, match=r"weights card of 's' sets defaults \{'blowup': 3.0\}"):
        learned_opt.load_optimizer(other, [p])
    with pytest.raises(ValueError, match=r"invalid lr") as caught:  # the caller's own mistake is not blamed on it
        learned_opt.load_optimizer(path, [p], lr=-1.0)
    assert "weights card" not in str(caught.value)


def test_untold_runs_take_the_cards_untold_weights_and_their_defaults(tmp_path: Path) -> None:
    told, untold = _relative_pair(tmp_path)
    free = learned_opt.load_optimizer(told, [torch.nn.Parameter(torch.ones(3))])
    assert free.rule.schedule_free and free.card["name"] == "free" and free.defaults["weight_decay"] == 0.25
    given = learned_opt.load_optimizer(told, [torch.nn.Parameter(torch.ones(3))], weight_decay=0.0)
    assert given.rule.schedule_free and given.defaults["weight_decay"] == 0.0  # a keyword replaces the card's
    told_opt = learned_opt.load_optimizer(told, [torch.nn.Parameter(torch.ones(3))], total_steps=10)
    assert not told_opt.rule.schedule_free and told_opt.card["name"] == "main"
    assert told_opt.defaults["weight_decay"] == 0.0


def test_the_benchmark_cache_key_holds_the_untold_weights(tmp_path: Path) -> None:
    from learned_opt.bench.baselines import resolve_optimizer

    told, untold = _relative_pair(tmp_path)
    before, told_before = resolve_optimizer(str(told)).key, resolve_optimizer(f"{told}[horizon=true]").key
    card = json.loads(untold.with_suffix(".json").read_text())
    untold.with_suffix(".json").write_text(json.dumps({**card, "defaults": {"weight_decay": 0.5}}))
    after = resolve_optimizer(str(told)).key
    assert before != after and after["untold"]["defaults"] == {"weight_decay": 0.5}
    # runs told their horizon never load the untold weights: those stay out of their key
    assert resolve_optimizer(f"{told}[horizon=true]").key == told_before and "untold" not in told_before
    assert set(resolve_optimizer(str(untold)).key) >= {"defaults"}
    plain = save_weights(_perturbed_lstm(hidden_size=8), tmp_path / "plain", name="plain", meta_training=META)
    assert "defaults" not in resolve_optimizer(str(plain)).key and "untold" not in resolve_optimizer(str(plain)).key


@pytest.mark.parametrize(("extra", "message"), [
    ({"defaults": {"lr": 2.0}}, "defaults may set"),
    ({"defaults": {"weight_decay": -1.0}}, "weight_decay must be a number"),
    ({"defaults": [1]}, "defaults must be a JSON dict"),
    ({"untold_weights": "../elsewhere"}, "untold_weights must name"),
    ({"untold_weights": "free.safetensors"}, "untold_weights must name"),
    ({"untold_weights": "missing"}, "missing"),
])
def test_bad_optional_card_fields_are_refused(tmp_path: Path, extra, message: str) -> None:
    told, _ = _relative_pair(tmp_path)
    card = json.loads(told.with_suffix(".json").read_text())
    told.with_suffix(".json").write_text(json.dumps({**card, **extra}))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        learned_opt.load_optimizer(told, [torch.nn.Parameter(torch.ones(3))])


def test_untold_weights_may_not_chain(tmp_path: Path) -> None:
    told, untold = _relative_pair(tmp_path)
    card = json.loads(untold.with_suffix(".json").read_text())
    untold.with_suffix(".json").write_text(json.dumps({**card, "untold_weights": "main"}))
    with pytest.raises(ValueError, match="may not name untold weights"):
        learned_opt.load_optimizer(told, [torch.nn.Parameter(torch.ones(3))])


def test_a_param_group_told_its_horizon_runs_the_told_weights(tmp_path: Path) -> None:
    told, _ = _relative_pair(tmp_path)
    opt = learned_opt.load_optimizer(told, [{"params": [torch.nn.Parameter(torch.ones(3))], "total_steps": 20}])
    assert not opt.rule.schedule_free and opt.card["name"] == "main"
    gen = (p for p in [torch.nn.Parameter(torch.ones(3))])  # a generator, as model.parameters() gives
    assert learned_opt.load_optimizer(told, gen).rule.schedule_free


def test_a_state_saved_in_the_other_mode_is_refused_with_the_reason(tmp_path: Path) -> None:
    told, _ = _relative_pair(tmp_path)
    p = torch.nn.Parameter(torch.ones(3))
    opt = learned_opt.load_optimizer(told, [p], total_steps=10)
    p.grad = torch.ones(3)
    opt.step()
    untold = learned_opt.load_optimizer(told, [p])
    with pytest.raises(ValueError, match="runs other weights told and untold"):
        untold.load_state_dict(opt.state_dict())
    with pytest.raises(TypeError, match="LearnedOptimizer"):
        learned_opt.load_optimizer(untold.rule, [p])


def test_told_runs_keep_the_untold_weights_out_of_their_cache_key(tmp_path: Path) -> None:
    from learned_opt.bench.baselines import resolve_optimizer

    told, _ = _relative_pair(tmp_path)
    assert "untold" in resolve_optimizer(str(told)).key
    assert "untold" not in resolve_optimizer(f"{told}[horizon=true]").key
