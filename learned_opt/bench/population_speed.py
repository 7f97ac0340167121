"""ES evaluation throughput: the batched population engine against the per-task loop, side by side.

Both paths evaluate the same ``members`` perturbations of the learned relative-Adam θ on the same
tasks (from the same seeds, the same batches) for ``steps`` optimizee steps each, without a graph
to θ — the work of one full-horizon ES meta-step:

- **batched**: :func:`learned_opt.meta.population.run_population` (one vmapped gradient call and
  one vmapped call of the step path, ``rules.transforms.apply_update``, per step for the whole
  population), as :mod:`learned_opt.meta.es` runs it;
- **loop**: what the ES estimator of the truncated trainer does today, one run at a time:
  ``meta.unroll.unroll(mode="none")`` per member with θ set to that member.

Throughput is optimizee steps per second (members × steps / seconds), medians over ``repeats``
rounds that alternate the two paths task by task, so a shared machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learned_opt.bench.speed import machine_info
from learned_opt.fileio import atomic_write_json
from learned_opt.cli import add_threads_flag, apply_threads
from learned_opt.meta.es import stack_members
from learned_opt.meta.population import run_population
from learned_opt.meta.unroll import TruncationData, unroll
from learned_opt.rules.relative import LearnedRelativeAdamRule
from learned_opt.rules.transforms import apply_update
from learned_opt.suites import load_suite


def _batched(task: Any, seed: int, steps: int, thetas: torch.Tensor, rule: LearnedRelativeAdamRule) -> None:
    stacked = stack_members(rule, thetas)

    def update(theta: Any, grads: Any, params: Any, state: Any, *, checked: bool = False) -> Any:  # the ES trainer's
        result = apply_update(rule.with_theta(theta), grads, params, state, {"lr": 1.0, "total_steps": steps},
                              checked=checked)
        return result.updates, result.state

    run_population(task, seed, steps, stacked, len(thetas), update, rule.init_state)


def _loop(task: Any, seed: int, steps: int, thetas: torch.Tensor, rule: LearnedRelativeAdamRule) -> None:
    generator = torch.Generator().manual_seed(seed)
    init = [p.detach() for p in task.init_params(generator)]
    data = TruncationData([task.sample_batch(generator) for _ in range(steps)], None)
    with torch.no_grad():
        for theta in thetas:
            torch.nn.utils.vector_to_parameters(theta, rule.parameters())
            unroll(rule, task, init, rule.init_state(init), data, mode="none", hparams={"total_steps": steps})


def measure_population_throughput(suite: str = "meta_train_general", *, tasks: int = 4, members: int = 16,
                                  steps: int = 100, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Optimizee steps/s of both paths and their ratio (see the module docstring)."""
    loaded = load_suite(suite)
    rng = np.random.default_rng(seed)
    draws = [loaded.sample("train", rng) for _ in range(tasks)]
    built = [(entry.label, entry.task(task_seed), task_seed) for entry, task_seed in draws]
    rule = LearnedRelativeAdamRule()
    base = torch.nn.utils.parameters_to_vector(rule.parameters()).detach()
    thetas = base + 0.05 * torch.randn(members, base.numel(), generator=torch.Generator().manual_seed(seed))
    times: dict[str, list[float]] = {"batched": [], "loop": []}
    for r in range(repeats + 1):  # round 0 warms up
        totals = {"batched": 0.0, "loop": 0.0}
        for i, (_, task, task_seed) in enumerate(built):
            order = ("batched", "loop") if (r + i) % 2 == 0 else ("loop", "batched")
            for path in order:
                t0 = time.perf_counter()
                (_batched if path == "batched" else _loop)(task, task_seed, steps, thetas, rule)
                totals[path] += time.perf_counter() - t0
        if r:
            for path in times:
                times[path].append(totals[path])
    work = members * steps * tasks
    rate = {path: work / statistics.median(ts) for path, ts in times.items()}
    return {"suite": suite, "tasks": [label for label, _, _ in built], "members": members, "steps": steps,
            "repeats": repeats, "threads": torch.get_num_threads(), "machine": machine_info(),
            "steps_per_s": rate, "ratio": rate["batched"] / rate["loop"], "seconds": times}


def main(argv: Sequence[str] | None = None, prog: str = "bench_population_speed.py") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="meta_train_general", help="suite name or .toml path (default: %(default)s)")
    parser.add_argument("--tasks", type=int, default=4, help="tasks drawn from the suite's train split")
    parser.add_argument("--members", type=int, default=16, help="population size (2 × ES pairs)")
    parser.add_argument("--steps", type=int, default=100, help="optimizee steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    add_threads_flag(parser)
    parser.add_argument("--out", type=Path, help="write results.json here")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    try:
        result = measure_population_throughput(args.suite, tasks=args.tasks, members=args.members, steps=args.steps,
                                               repeats=args.repeats)
    except (ValueError, FileNotFoundError) as exc:  # bad input or missing data: one line, not a traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    s = result["steps_per_s"]
    print(f"{args.suite}: {result['tasks']}, {args.members} members x {args.steps} steps")
    print(f"batched {s['batched']:.0f} optimizee steps/s, loop {s['loop']:.0f}; ratio {result['ratio']:.2f}x")
    if args.out:
        atomic_write_json(args.out / "results.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
