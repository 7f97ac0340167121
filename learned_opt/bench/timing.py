"""The uncached timing pass: all optimizers side by side, interleaved step by step.

Interleaving (with the order rotated every step) exposes every optimizer to the same machine load,
so ratios stay meaningful on a busy machine. Reported per optimizer: median ``optimizer.step()``
time, median whole training step (forward, backward, step), and optimizer state bytes per parameter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from learned_opt.bench.runner import init_leaf_params, set_eval_mode
from learned_opt.tasks.base import Task


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor storage held in ``optimizer.state`` (nested dicts/lists included), each
    storage once: a group-wide tensor every parameter's state shares (the LSTM's reference state,
    the non-finite skip count) is memory held once, not once per parameter."""
    storages: dict[tuple[str, int], int] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            storages[(str(obj.device), storage.data_ptr())] = storage.nbytes()
        elif isinstance(obj, Mapping):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for st in optimizer.state.values():
        visit(st)
    return sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_optimizers(
    task: Task,
    seed: int,
    builders: Mapping[str, Callable[[list[Tensor]], torch.optim.Optimizer]],
    steps: int,
    *,
    warmup: int = 3,
) -> dict[str, dict[str, float]]:
    """Median step times (ms) and state bytes per parameter for each optimizer on ``task``."""
    if steps < 1:
        raise ValueError(f"timing needs steps >= 1, got {steps}")
    labels = list(builders)
    params = {}
    opts = {}
    generator = None
    for label in labels:
        params[label], generator = init_leaf_params(task, seed)
        opts[label] = builders[label](params[label])
        set_eval_mode(opts[label], False)  # schedule-free optimizers must be in train mode to step
    assert generator is not None
    device = task.device
    step_s: dict[str, list[float]] = {label: [] for label in labels}
    total_s: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(warmup + steps):
        batch = task.sample_batch(generator)
        shift = i % len(labels)
        for label in labels[shift:] + labels[:shift]:
            opt, ps = opts[label], params[label]
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            task.loss(ps, batch).backward()
            _sync(device)
            t1 = time.perf_counter()
            opt.step()
            _sync(device)
            t2 = time.perf_counter()
            if i >= warmup:
                step_s[label].append(t2 - t1)
                total_s[label].append(t2 - t0)
    out = {}
    for label in labels:
        n_params = sum(p.numel() for p in params[label])
        out[label] = {
            "step_ms": 1e3 * statistics.median(step_s[label]),
            "train_step_ms": 1e3 * statistics.median(total_s[label]),
            "state_bytes_per_param": state_bytes(opts[label]) / max(n_params, 1),
        }
    return out
