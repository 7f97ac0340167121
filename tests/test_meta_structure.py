"""The meta-training layers: pure estimators with typed state, inputs resolved once, no import cycles."""

from __future__ import annotations

import ast
import pathlib
from pathlib import Path

import pytest
import torch

import learned_opt
from learned_opt.meta.checkpoint import decode, encode
from learned_opt.meta.config import ConfigFile, MetaTrainConfig, family_suite, resolve
from learned_opt.meta.estimators import PES, AntitheticES, PESState, TruncatedBPTT
from learned_opt.meta.losses import MetaLoss
from learned_opt.meta.slots import new_run, new_slot, restore_run, run_payload
from learned_opt.meta.unroll import InnerRun
from meta_toys import ToyFamily, ToyMomentum

ROOT = Path(__file__).resolve().parents[1]
QUAD = ROOT / "tasks" / "l2l_quadratic.toml"


def _run(rule: ToyMomentum) -> InnerRun:
    suite = family_suite(ToyFamily(noise=0.1))
    return new_run(new_slot(0, 0), rule, suite, MetaTrainConfig(horizon=30, random_start=False), torch.device("cpu"))


def _snapshot(run: InnerRun) -> tuple:
    return ([p.clone() for p in run.params], run.iteration, run.diverged, run.generator.get_state().clone(),
            run.estimator_state)


@pytest.mark.parametrize("estimator", [TruncatedBPTT(), AntitheticES(pairs=2), PES(pairs=2)], ids=["bptt", "es", "pes"])
def test_estimator_step_changes_neither_run_nor_state(estimator) -> None:  # type: ignore[no-untyped-def]
    rule, objective = ToyMomentum(), MetaLoss("mean")
    run = _run(rule)
    estimator.estimate(rule, run, 3, objective, torch.Generator().manual_seed(0))  # a state from a real truncation
    state = run.estimator_state
    if isinstance(estimator, PES):
        assert isinstance(state, PESState) and len(state.pairs) == 2
        held = [t.clone() for pair in state.pairs for t in (*pair.plus.params, *pair.minus.params, *pair.xi)]
    else:
        assert state is None
    before = _snapshot(run)
    data = run.draw_data(4)
    after_draw = run.generator.get_state().clone()
    est, end, new_state = estimator.step(rule, run, data, objective, torch.Generator().manual_seed(1), state)
    params, iteration, diverged, _, same_state = before
    assert all(torch.equal(a, b) for a, b in zip(params, run.params)) and run.iteration == iteration
    assert run.diverged == diverged and torch.equal(run.generator.get_state(), after_draw)
    assert run.estimator_state is same_state and est.steps == 4 and len(end.params) == len(run.params)
    if isinstance(estimator, PES):
        now = [t for pair in state.pairs for t in (*pair.plus.params, *pair.minus.params, *pair.xi)]
        assert all(torch.equal(a, b) for a, b in zip(held, now)) and new_state is not state


def test_pes_state_survives_a_checkpoint_bit_for_bit() -> None:
    rule, objective, estimator = ToyMomentum(), MetaLoss("mean"), PES(pairs=2)
    run = _run(rule)
    estimator.estimate(rule, run, 3, objective, torch.Generator().manual_seed(0))
    suite = family_suite(ToyFamily(noise=0.1))
    restored = restore_run(decode(encode(run_payload(run, estimator))), suite, torch.device("cpu"), estimator)
    assert isinstance(restored.estimator_state, PESState)
    a = estimator.estimate(rule, run, 4, objective, torch.Generator().manual_seed(2))
    b = estimator.estimate(rule, restored, 4, objective, torch.Generator().manual_seed(2))
    assert torch.equal(a.meta_loss, b.meta_loss) and all(torch.equal(x, y) for x, y in zip(a.grads, b.grads))


def test_resolve_keeps_the_objects_and_records_them_in_the_config() -> None:
    rule, estimator = ToyMomentum(), PES(sigma=0.05, pairs=3)
    inputs = resolve(rule, ToyFamily(), estimator=estimator, meta_steps=2)
    assert inputs.rule is rule and inputs.estimator is estimator
    cfg = inputs.config
    assert (cfg.rule, cfg.estimator, cfg.es_sigma, cfg.es_pairs, cfg.meta_steps) == (rule.name, "pes", 0.05, 3, 2)
    assert cfg.rule_config == rule.config() and cfg.suite == ToyFamily().name


def test_a_config_file_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    real = pathlib.Path.read_text

    def counting(self: pathlib.Path, *args: object, **kwargs: object) -> str:
        if self.resolve() == QUAD.resolve():
            reads.append(self)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pathlib.Path, "read_text", counting)
    result = learned_opt.meta_train(config=QUAD, progress=False, meta_steps=0, eval_tasks=0,
                                    rule_config={"hidden_size": 3, "num_layers": 1})
    assert result.step == 0 and result.config.unroll == 20 and len(reads) == 1, reads


def _meta_imports(path: Path) -> set[str]:
    """The ``learned_opt.meta.*`` modules ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("learned_opt.meta.") and (ROOT / (n.replace(".", "/") + ".py")).is_file()}
    return found


def test_meta_modules_import_each_other_without_cycles() -> None:
    graph = {f"learned_opt.meta.{p.stem}": _meta_imports(p) for p in (ROOT / "learned_opt" / "meta").glob("*.py")}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, " -> ".join((*path, module))
        if module not in done:
            for dep in graph.get(module, ()):
                visit(dep, (*path, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_a_population_es_recipe_is_pointed_to_its_runner(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[population_es]\nmeta_steps = 1\n")
    with pytest.raises(ValueError, match="ship_pretrained"):
        ConfigFile.read(recipe)
