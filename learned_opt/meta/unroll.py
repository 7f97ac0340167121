"""Functional unrolls of inner training runs, the one place the inner loop of meta-training lives.

An :class:`InnerRun` is one optimizee being trained by the rule: its task, parameters, rule state,
iteration, horizon and the two generators its batches come from. A run is trained in truncations;
:func:`unroll` runs one truncation and returns the losses along it, with or without an autograd
graph back to the rule's meta-parameters θ. Between truncations everything is detached, so the
state is carried across truncations of one run but gradients are not.

Each step goes through :func:`learned_opt.rules.transforms.apply_update`, the function the
``torch.optim`` adapter steps with (weight decay, the gradient bound, the non-finite guard), so
the rule is meta-trained on the update that ships.

Batches are drawn once per truncation (:meth:`InnerRun.draw_data`) and shared by every trajectory
an estimator unrolls from the same point (ES/PES perturbations), so the run's generators advance the
same way whatever the estimator and whether or not a trajectory diverged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from learned_opt.rules.base import Rule, RuleState
from learned_opt.rules.transforms import apply_update
from learned_opt.tasks.base import Batch, Task

UNROLL_MODES = ("none", "first", "second")


def detach_state(state: RuleState) -> RuleState:
    """A copy of a rule state with every tensor detached from the autograd graph."""
    group, per_param = state
    return {k: v.detach() for k, v in group.items()}, [{k: v.detach() for k, v in s.items()} for s in per_param]


def heldout_seed(seed: int) -> int:
    """Seed of a run's held-out batch stream: independent of, and never equal to, its training stream."""
    return int(np.random.SeedSequence([int(seed), 0x4E1D]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class TruncationData:
    """The batches of one truncation: one per step, the one the loss after the last step is measured
    on (None: not measured), and the held-out batch (None unless the meta-loss needs one)."""

    batches: list[Batch]
    final_batch: Batch | None
    heldout_batch: Batch | None = None


@dataclass
class UnrollOutput:
    """What one truncation produced.

    ``losses[i]`` is the loss after step ``i + 1`` (on the next step's batch; the last on
    ``final_batch``); fewer than the number of steps when the run diverged. ``first_loss`` is the
    (detached) loss before the first step; ``heldout`` the held-out loss after the last step.
    """

    losses: list[Tensor]
    heldout: Tensor | None
    params: list[Tensor]
    state: RuleState
    first_loss: Tensor
    diverged: bool


def unroll(
    rule: Rule,
    task: Task,
    params: Sequence[Tensor],
    state: RuleState,
    data: TruncationData,
    *,
    mode: str = "first",
    track_losses: bool = True,
    hparams: Mapping[str, Any] | None = None,
) -> UnrollOutput:
    """Train ``params`` for ``len(data.batches)`` steps with ``rule`` and record the losses.

    mode: ``"none"`` — no graph to θ (evaluation, ES/PES, fast-forward); ``"first"`` — graph to θ
    through the updates, optimizee gradients treated as constants (first-order truncated BPTT);
    ``"second"`` — also through the optimizee gradients (second-order). ``track_losses=False``
    keeps no graph for the losses before the last (meta-losses that only read the final loss).
    ``hparams``: per-step settings merged over ``rule.meta_hparams()`` (e.g. ``weight_decay``,
    ``decoupled_weight_decay``: see :data:`learned_opt.rules.transforms.STEP_DEFAULTS`).
    A non-finite loss stops the unroll (``diverged=True``); a non-finite gradient skips its step.
    """
    if mode not in UNROLL_MODES:
        raise ValueError(f"invalid unroll mode: {mode!r} (choose from {list(UNROLL_MODES)})")
    differentiable = mode != "none"
    with torch.set_grad_enabled(differentiable):
        step_hparams = {**rule.meta_hparams(), **(hparams or {})}
    params = [p.detach().requires_grad_(True) for p in params]
    losses: list[Tensor] = []
    first_loss: Tensor | None = None
    for t, batch in enumerate(data.batches):
        with torch.enable_grad():
            loss = task.loss(params, batch)
        if first_loss is None:
            first_loss = loss.detach()
        if not bool(torch.isfinite(loss)):
            return UnrollOutput(losses, None, params, state, first_loss, True)
        keep = differentiable and t > 0 and track_losses
        if t > 0:
            losses.append(loss if keep else loss.detach())
        grads = torch.autograd.grad(loss, params, create_graph=mode == "second", retain_graph=keep or mode == "second")
        with torch.set_grad_enabled(differentiable):
            updates, state, _, _ = apply_update(rule, grads, params, state, step_hparams)
            params = [p + u for p, u in zip(params, updates)]
        if not differentiable:
            params = [p.detach().requires_grad_(True) for p in params]
    if first_loss is None:
        raise ValueError("unroll needs at least one batch")
    heldout = None
    with torch.set_grad_enabled(differentiable):
        if data.final_batch is not None:
            final = task.loss(params, data.final_batch)
            losses.append(final if differentiable else final.detach())
            if not bool(torch.isfinite(final)):
                losses.pop()
                return UnrollOutput(losses, None, params, state, first_loss, True)
        if data.heldout_batch is not None:
            heldout = task.loss(params, data.heldout_batch)
            heldout = heldout if differentiable else heldout.detach()
    return UnrollOutput(losses, heldout, params, state, first_loss, False)


@dataclass
class InnerRun:
    """One inner training run in flight (see the module docstring).

    ``estimator_state`` belongs to the gradient estimator that advances the run (None for the
    stateless ones; PES keeps its perturbed trajectories there, a
    :class:`~learned_opt.meta.estimators.PESState`); it lives and ends with the run, and is checkpointed
    with it through the estimator's ``state_tree``/``load_state``.
    """

    label: str
    seed: int
    horizon: int
    task: Task
    params: list[Tensor]
    state: RuleState
    generator: torch.Generator
    heldout_generator: torch.Generator
    iteration: int = 0
    initial_loss: Tensor | None = None
    diverged: bool = False
    estimator_state: Any = None

    @classmethod
    def start(cls, rule: Rule, task: Task, *, label: str, seed: int, horizon: int) -> InnerRun:
        """A fresh run of ``task`` from its seeded initial parameters and a fresh rule state."""
        if horizon < 1:
            raise ValueError(f"invalid horizon: {horizon!r} (must be >= 1)")
        generator = torch.Generator().manual_seed(int(seed))
        params = [p.detach() for p in task.init_params(generator)]
        with torch.no_grad():
            state = detach_state(rule.init_state(params))
        heldout = torch.Generator().manual_seed(heldout_seed(seed))
        return cls(label, int(seed), int(horizon), task, params, state, generator, heldout)

    @property
    def finished(self) -> bool:
        return self.diverged or self.iteration >= self.horizon

    def remaining(self) -> int:
        return max(self.horizon - self.iteration, 0)

    def draw_data(self, steps: int, *, final: bool = True, heldout: bool = False) -> TruncationData:
        """Draw the next ``steps`` training batches (plus the final/held-out ones) from the run's streams."""
        batches = [self.task.sample_batch(self.generator) for _ in range(steps)]
        final_batch = self.task.sample_batch(self.generator) if final else None
        heldout_batch = self.task.sample_batch(self.heldout_generator) if heldout else None
        return TruncationData(batches, final_batch, heldout_batch)

    def advance(self, out: UnrollOutput, steps: int) -> None:
        """Adopt a truncation's end point as the run's state (detached)."""
        if self.initial_loss is None:
            self.initial_loss = out.first_loss
        self.params = [p.detach() for p in out.params]
        self.state = detach_state(out.state)
        self.iteration += steps
        self.diverged = self.diverged or out.diverged

    def train_without_graph(self, rule: Rule, steps: int, chunk: int = 50) -> list[Tensor]:
        """Train ``steps`` iterations with ``rule``, no graph to θ; the loss after each step.

        Used for random starting iterations and for validation; batches are drawn ``chunk`` steps
        at a time. The list is shorter than ``steps`` if the run diverged.
        """
        losses: list[Tensor] = []
        first_chunk = True
        while steps > 0 and not self.diverged:
            n = min(steps, chunk)
            out = unroll(rule, self.task, self.params, self.state, self.draw_data(n, final=n == steps), mode="none")
            if not first_chunk:  # the previous chunk's last step is scored by this chunk's first loss
                losses.append(out.first_loss)
            first_chunk = False
            losses.extend(out.losses)
            self.advance(out, n)
            steps -= n
        return losses
