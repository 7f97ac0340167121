"""Batched inner runs: a population of rule variants (or of learning rates) trains one task in lockstep.

Every member starts from the same initial parameters and sees the same batches (common random
numbers, which also keep antithetic ES differences low-variance). Gradients of all members come
from one ``torch.func.vmap(grad(loss))`` call and their updates from one vmapped rule call, so the
Python overhead of a step is paid once for the whole population, not once per run.

An update function has the signature ``update_fn(member, grads, params, state, *, checked) ->
(updates, state)`` over one member's unbatched tensors; ``member`` is whatever varies across the
population (a θ dict, a learning rate), stacked along dim 0. ``checked`` is True when every
member's gradients pass the step's guard unchanged (checked once for the population, on the host:
:func:`learned_opt.rules.transforms.gradients_pass_guard`); pass it on to ``apply_update``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

from learned_opt.bench.runner import DIVERGENCE_FACTOR
from learned_opt.bench.tuning import tune_lr
from learned_opt.rules.base import RuleState
from learned_opt.rules.directions import adam_direction
from learned_opt.rules.transforms import gradients_pass_guard
from learned_opt.tasks.base import Task

UpdateFn = Callable[..., tuple[list[Tensor], RuleState]]  # (member, grads, params, state, *, checked)


@dataclass
class PopulationResult:
    """Initial full-data loss (shared by all members), each member's final full-data loss and divergence flag."""

    initial_loss: float
    final_losses: Tensor  # [P]
    diverged: Tensor  # [P] bool


def _expand(tree: Any, members: int) -> Any:
    return tree_map(lambda t: t.unsqueeze(0).expand(members, *t.shape).clone() if isinstance(t, Tensor) else t, tree)


def reparameterised(task: Task, scales: Sequence[float] | None) -> Callable[[Sequence[Tensor], Any], Tensor]:
    """``task.loss`` seen through ``p = c · p'`` per tensor (task augmentation; None: the plain loss)."""
    if scales is None:
        return task.loss
    return lambda params, batch: task.loss([p * c for p, c in zip(params, scales)], batch)


def run_population(
    task: Task,
    seed: int,
    steps: int,
    members: Any,
    n_members: int,
    update_fn: UpdateFn,
    init_state: Callable[[list[Tensor]], RuleState],
    *,
    scales: Sequence[float] | None = None,
    eval_point: Callable[[Any, list[Tensor], RuleState], list[Tensor] | None] | None = None,
) -> PopulationResult:
    """Train ``task`` (initial params and batches from ``seed``) for ``steps`` steps with every member at once.

    ``scales`` reparameterises each parameter tensor (``p = c · p'``, the rule sees ``p'``). A member
    is diverged when any minibatch loss is non-finite or its final loss exceeds 10x the initial one.
    ``eval_point(member, params, state)`` (one member's; None: the parameters) is where the final
    loss is taken: a schedule-free rule's average, as its optimizer's ``eval()`` gives.
    """
    generator = torch.Generator().manual_seed(int(seed))
    init = [p.detach() for p in task.init_params(generator)]
    if scales is not None:
        init = [p / c for p, c in zip(init, scales)]
    loss_of = reparameterised(task, scales)
    full = task.full_batch()
    with torch.no_grad():
        initial = float(loss_of(init, full))
    params = _expand(init, n_members)
    with torch.no_grad():
        state = _expand(init_state(init), n_members)
    grad_fn = vmap(grad_and_value(loss_of), in_dims=(0, None))
    step_fn = vmap(update_fn, in_dims=(0, 0, 0, 0))
    bad = torch.zeros(n_members, dtype=torch.bool)
    for _ in range(steps):
        batch = task.sample_batch(generator)
        grads, losses = grad_fn(params, batch)
        bad |= ~torch.isfinite(losses)
        with torch.no_grad():
            updates, state = step_fn(members, grads, params, state, checked=gradients_pass_guard(grads))
            params = [p + u for p, u in zip(params, updates)]
    with torch.no_grad():
        if eval_point is not None:
            params = vmap(lambda m, p, st: eval_point(m, p, st) or p, in_dims=(0, 0, 0))(members, params, state)
        final = vmap(loss_of, in_dims=(0, None))(params, full)
    bad |= ~torch.isfinite(final) | (final > DIVERGENCE_FACTOR * abs(initial))
    return PopulationResult(initial, final.detach(), bad)


def adam_update(lr: Tensor, grads: list[Tensor], params: list[Tensor], state: RuleState, *,
                checked: bool = False) -> tuple[list[Tensor], RuleState]:
    """torch.optim.Adam's step (default betas and eps) at learning rate ``lr``: the references' rule
    (unguarded, as torch's Adam is, so ``checked`` changes nothing)."""
    group, per_param = state
    step = group["step"] + 1
    updates, new = [], []
    for g, st in zip(grads, per_param):
        d, m, v = adam_direction(g, st["exp_avg"], st["exp_avg_sq"], step, (0.9, 0.999), 1e-8)
        updates.append(-lr * d)
        new.append({"exp_avg": m, "exp_avg_sq": v})
    return updates, ({"step": step}, new)


def adam_init(params: list[Tensor]) -> RuleState:
    zero = torch.zeros((), dtype=params[0].dtype)
    return {"step": zero}, [{"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)} for p in params]


def adam_sweep(task: Task, seed: int, steps: int, lrs: Sequence[float]) -> PopulationResult:
    """Adam at each of ``lrs`` on one task run, batched (a tuning grid in one population run)."""
    lr = torch.tensor([float(x) for x in lrs])
    return run_population(task, seed, steps, lr, len(lrs), adam_update, adam_init)


def tuned_adam_final(task: Task, seed: int, steps: int) -> tuple[float, float, float]:
    """(best final loss, its lr, initial loss) of Adam tuned as the benchmark tunes it
    (:func:`learned_opt.bench.tuning.tune_lr`), the initial grid in one batched run."""
    initial = math.nan

    def finals(lrs: list[float]) -> list[float]:
        nonlocal initial
        result = adam_sweep(task, seed, steps, lrs)
        initial = result.initial_loss
        return [math.inf if bad or not math.isfinite(loss) else float(loss)
                for loss, bad in zip(result.final_losses.tolist(), result.diverged.tolist())]

    tuning = tune_lr(lambda lr: finals([lr])[0], score_many=finals)
    return tuning.scores[tuning.best_lr], tuning.best_lr, initial
