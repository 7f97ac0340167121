"""One benchmark run: train a Task with a torch optimizer, recording full-data losses every K steps.

(task, seed) fully determines the run: initial parameters and batches come from a
``torch.Generator`` seeded with ``seed``. A run stops early when it diverges (non-finite loss, or
above ``DIVERGENCE_FACTOR`` × the initial loss at an evaluation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from learned_opt.tasks.base import Task

DIVERGENCE_FACTOR = 10.0
CHECK_EVERY = 10  # steps between minibatch-loss divergence checks


@dataclass
class RunResult:
    """The record of one (task, optimizer, lr, seed, steps) run."""

    seed: int
    steps: list[int]  # evaluated step indices, starting at 0
    losses: list[float]  # full-data training loss at those steps
    diverged: bool = False
    test: dict[str, float] | None = None
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        """Loss at the last evaluation (``inf`` for a diverged run, so it never looks good)."""
        return math.inf if self.diverged else self.losses[-1]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        data = dict(data)
        data["losses"] = [math.nan if x is None else float(x) for x in data["losses"]]
        return cls(**data)


def is_divergent(loss: float, initial: float) -> bool:
    """Non-finite, or above DIVERGENCE_FACTOR × the initial loss."""
    return not math.isfinite(loss) or loss > DIVERGENCE_FACTOR * abs(initial)


def set_eval_mode(optimizer: torch.optim.Optimizer, evaluating: bool) -> None:
    """Schedule-free optimizers evaluate at averaged weights: call their ``eval()``/``train()``."""
    method = getattr(optimizer, "eval" if evaluating else "train", None)
    if callable(method):
        method()


def eval_points(steps: int, eval_every: int) -> list[int]:
    """0, K, 2K, … and always the final step."""
    if steps < 0 or eval_every < 1:
        raise ValueError(f"need steps >= 0 and eval_every >= 1, got steps={steps}, eval_every={eval_every}")
    points = list(range(0, steps + 1, eval_every))
    return points if points[-1] == steps else [*points, steps]


def default_eval_every(steps: int) -> int:
    """About 25 evaluations per run: enough for curves and (interpolated) speedups, while
    full-data evaluations, each costing many training steps on larger datasets, stay a minority."""
    return max(1, steps // 25)


def init_leaf_params(task: Task, seed: int) -> tuple[list[Tensor], torch.Generator]:
    """The task's initial parameters for ``seed`` as trainable leaves, and the generator for batches."""
    generator = torch.Generator().manual_seed(int(seed))
    params = [p.detach().clone().requires_grad_(True) for p in task.init_params(generator)]
    return params, generator


def train_step(task: Task, params: list[Tensor], optimizer: torch.optim.Optimizer, batch: Any) -> Tensor:
    """One optimizer step on one batch; returns the (detached) minibatch loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = task.loss(params, batch)
    loss.backward()
    optimizer.step()
    return loss.detach()


def run(
    task: Task,
    make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
    seed: int,
    steps: int,
    eval_every: int,
    *,
    on_eval: Callable[[int, float], None] | None = None,
) -> RunResult:
    """Train ``task`` for ``steps`` steps; evaluate the full-data loss at :func:`eval_points`."""
    start = time.perf_counter()
    params, generator = init_leaf_params(task, seed)
    optimizer = make_optimizer(params)
    set_eval_mode(optimizer, False)
    lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
    points: Iterable[int] = eval_points(steps, eval_every)
    evaluated: list[int] = []
    losses: list[float] = []
    diverged = False
    step = 0
    for point in points:
        while step < point and not diverged:
            batch_loss = train_step(task, params, optimizer, task.sample_batch(generator))
            step += 1
            # cheap early stop between evaluations (tuning runs evaluate only at the end): a
            # suspicious minibatch loss triggers a full-data evaluation, which decides
            if step % CHECK_EVERY == 0 and step < point and is_divergent(float(batch_loss), losses[0]):
                loss = _evaluate(task, params, optimizer)
                if is_divergent(loss, losses[0]):
                    evaluated.append(step)
                    losses.append(loss)
                    diverged = True
        if diverged:
            break
        loss = _evaluate(task, params, optimizer)
        evaluated.append(step)
        losses.append(loss)
        if on_eval is not None:
            on_eval(step, loss)
        if is_divergent(loss, losses[0]):
            diverged = True
            break
    test = None
    if not diverged:
        set_eval_mode(optimizer, True)
        with torch.no_grad():
            metrics = task.test_metrics(params)
        set_eval_mode(optimizer, False)
        test = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    extra: dict[str, Any] = {"lr": float(lr)} if isinstance(lr, (int, float)) else {}
    state = final_group_state(optimizer)
    if state:
        extra["state"] = state
    return RunResult(seed, evaluated, losses, diverged, test, time.perf_counter() - start, extra)


def final_group_state(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Scalar group-wide state of a library optimizer's first group at the end of a run (how often
    the gradient-norm decay fired, the adapted lr factor, skipped steps); empty for other optimizers."""
    group_state = getattr(optimizer, "group_state", None)
    if not callable(group_state) or not optimizer.param_groups:
        return {}
    return {k: float(v) for k, v in group_state(0).items() if v.dim() == 0}


def _evaluate(task: Task, params: list[Tensor], optimizer: torch.optim.Optimizer) -> float:
    set_eval_mode(optimizer, True)
    with torch.no_grad():
        loss = float(task.eval_loss(params))
    set_eval_mode(optimizer, False)
    return loss
