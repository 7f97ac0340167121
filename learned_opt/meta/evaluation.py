"""Validation during meta-training: whole inner runs on the suite's validation split (picks ``best``)."""

from __future__ import annotations

import torch

from learned_opt.meta.config import MetaTrainConfig
from learned_opt.meta.distributed import DistContext
from learned_opt.meta.losses import MetaLoss
from learned_opt.meta.unroll import InnerRun
from learned_opt.rules.base import Rule
from learned_opt.suites import Suite, SuiteEntry


def validation_tasks(suite: Suite, n: int) -> list[tuple[SuiteEntry, int]]:
    """``n`` (entry, seed) pairs from the validation split, cycling through the entries evenly."""
    seeds = suite.seeds["validation"]
    k = len(suite.entries)
    return [(suite.entries[i % k], seeds[(i // k) % len(seeds)]) for i in range(n)]


def evaluate(rule: Rule, suite: Suite, config: MetaTrainConfig, device: torch.device,
             ctx: DistContext | None = None) -> float:
    """Mean over ``eval_tasks`` validation tasks of the normalised loss averaged over each whole run
    (the ``mean`` meta-loss over the full horizon, no truncation). Lower is better. Under
    torch.distributed each rank runs its share of the tasks."""
    ctx = ctx or DistContext()
    objective = MetaLoss("mean", config.loss_cap)
    tasks = validation_tasks(suite, config.eval_tasks)
    total = torch.zeros(2, dtype=torch.float64)
    for i in ctx.share(len(tasks)):
        entry, seed = tasks[i]
        steps = config.horizon if isinstance(config.horizon, int) else entry.steps
        run = InnerRun.start(rule, entry.family.sample(seed).to(device), label=entry.label, seed=seed, horizon=steps)
        losses = run.train_without_graph(rule, steps)
        initial = run.initial_loss if run.initial_loss is not None else torch.ones(())
        total += torch.tensor([objective(losses, None, steps, initial).item(), 1.0], dtype=torch.float64)
    total = ctx.all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")
