"""Task slots: the inner runs a meta-step advances, their RNG streams, and their checkpoint form.

Every slot has its own RNG streams seeded by ``(seed, slot index)`` (task and truncation draws, and
the estimator's noise), so what a slot trains does not depend on how slots are split across ranks.
A slot's run is replaced by a fresh one when it finishes. :func:`slot_payload` and
:func:`restore_slot` turn a slot into checkpoint data and back, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learned_opt.meta.config import MetaTrainConfig
from learned_opt.meta.estimators import GradientEstimator
from learned_opt.meta.unroll import InnerRun
from learned_opt.rules.base import Rule
from learned_opt.suites import Suite
from learned_opt.tasks.base import draw

MAX_DIVERGED_STARTS = 100


@dataclass
class Slot:
    """One task slot: its RNG streams and its inner run in flight."""

    index: int
    rng: np.random.Generator
    noise: torch.Generator
    run: InnerRun | None = None
    runs_started: int = 0


def new_slot(seed: int, index: int) -> Slot:
    """Slot ``index`` of a run seeded ``seed``, before its first inner run."""
    noise_seed = int(np.random.SeedSequence([seed, index, 0x5E5]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return Slot(index, np.random.default_rng([seed, index]), torch.Generator().manual_seed(noise_seed))


def new_run(slot: Slot, rule: Rule, suite: Suite, config: MetaTrainConfig, device: torch.device) -> InnerRun:
    """A fresh inner run for ``slot`` (task, seed and horizon drawn from the slot's stream); the slot's
    first run starts at a random iteration when ``config.random_start``."""
    for _attempt in range(MAX_DIVERGED_STARTS):
        entry, task_seed = suite.sample("train", slot.rng)
        horizon = entry.steps if config.horizon == "suite" else int(draw(config.horizon, slot.rng))
        run = InnerRun.start(rule, entry.family.sample(task_seed).to(device), label=entry.label, seed=task_seed,
                             horizon=horizon)
        if config.random_start and slot.runs_started == 0:
            run.train_without_graph(rule, int(slot.rng.integers(0, horizon)))
        slot.runs_started += 1
        if not run.finished:
            return run
    raise RuntimeError(f"slot {slot.index}: {MAX_DIVERGED_STARTS} consecutive inner runs diverged "
                       "before their first truncation")


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` (dicts, lists, tuples) with ``fn`` applied to every tensor in it."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    return obj


def run_payload(run: InnerRun, estimator: GradientEstimator) -> dict[str, Any]:
    """Checkpoint data of a run in flight (the estimator's state under ``extra``)."""
    return {"label": run.label, "seed": run.seed, "horizon": run.horizon, "iteration": run.iteration,
            "params": run.params, "state": run.state, "generator": run.generator.get_state(),
            "heldout_generator": run.heldout_generator.get_state(), "initial_loss": run.initial_loss,
            "diverged": run.diverged, "extra": estimator.state_tree(run.estimator_state)}


def restore_run(data: Mapping[str, Any], suite: Suite, device: torch.device, estimator: GradientEstimator) -> InnerRun:
    """Inverse of :func:`run_payload` (the task is rebuilt from its suite entry and seed)."""
    tree = map_tensors({"params": data["params"], "state": data["state"], "extra": data["extra"]},
                       lambda t: t.to(device))
    generator, heldout = torch.Generator(), torch.Generator()
    generator.set_state(data["generator"])
    heldout.set_state(data["heldout_generator"])
    task = suite.entry(data["label"]).family.sample(int(data["seed"])).to(device)
    initial = data["initial_loss"]
    return InnerRun(data["label"], int(data["seed"]), int(data["horizon"]), task, list(tree["params"]),
                    tree["state"], generator, heldout, int(data["iteration"]),
                    None if initial is None else initial.to(device), bool(data["diverged"]),
                    estimator.load_state(tree["extra"]))


def slot_payload(slot: Slot, estimator: GradientEstimator) -> dict[str, Any]:
    """Checkpoint data of a slot: its index, RNG states and run in flight."""
    return {"index": slot.index, "rng": slot.rng.bit_generator.state, "noise": slot.noise.get_state(),
            "runs_started": slot.runs_started,
            "run": None if slot.run is None else run_payload(slot.run, estimator)}


def restore_slot(data: Mapping[str, Any], seed: int, suite: Suite, device: torch.device,
                 estimator: GradientEstimator) -> Slot:
    """Inverse of :func:`slot_payload`."""
    slot = new_slot(seed, int(data["index"]))
    slot.rng.bit_generator.state = data["rng"]
    slot.noise.set_state(data["noise"])
    slot.runs_started = int(data["runs_started"])
    slot.run = None if data["run"] is None else restore_run(data["run"], suite, device, estimator)
    return slot
