"""Meta-training throughput: optimizee steps per second against the gate-matmul bound and the plain loop.

One meta-step advances ``tasks`` inner runs by one truncation of ``unroll`` steps each and computes
the meta-gradient (first-order truncated BPTT, mean meta-loss: the paper's setting). Throughput is
optimizee steps per second, summed over the task batch. Measured side by side in one process,
alternating meta-step by meta-step (so a shared machine's load drifts over all alike):

- **fused**: the library's path (``LSTMRule.update_first_order``: the chunk step with its
  written-out backward);
- **plain**: the plain one-task-at-a-time loop through autograd's op-by-op LSTM
  (``LSTMRule.update_reference``, the rule's config with ``fused_training=False``);
- **bound**: the gate matmuls alone that one optimizee step needs, at the rule's chunk plan for
  the task's parameters: per chunk of ``N`` coordinates and layer the forward
  ``(4H × k) @ (k × N)`` with ``k = 1 + inputs + H`` (bias folded in), and the backward's
  ``(4H × N) @ (N × k)`` and ``(k × 4H) @ (4H × N)``; FLOPs ``3 · 2·N·k·4H``. Backpropagation is
  part of meta-training, so its matmuls are part of the bound.

Medians over ``repeats`` meta-steps after ``warmup`` ones. Both paths run the same tasks from the
same seeds; they compute the same meta-gradient (tests check it), so only time differs.
``measure_meta_throughput`` is the Python entry point; ``main`` the command line
(``scripts/bench_meta_speed.py``, ``learned-opt bench-meta-speed``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from learned_opt.bench.speed import machine_info
from learned_opt.fileio import atomic_write_json, atomic_write_text
from learned_opt.meta.estimators import TruncatedBPTT
from learned_opt.meta.losses import MetaLoss
from learned_opt.meta.unroll import InnerRun
from learned_opt.rules.lstm import LSTMRule
from learned_opt.suites import Suite, load_suite

PATHS = ("fused", "plain")


def meta_gate_matmuls(rule: LSTMRule, shapes: Sequence[torch.Size], tasks: int) -> tuple[Callable[[], None], float]:
    """A function running the gate matmuls (forward and backward) of one optimizee step of each of
    ``tasks`` tasks with parameters ``shapes``, at the rule's first-order chunk plan; and their FLOPs."""
    params = [torch.zeros(s) for s in shapes]
    _, per_param = rule.init_state(params)
    sizes = [sum(b - a for _, a, b in chunk) for chunk in rule.chunk_plan(params, per_param, large_apart=True)]
    sizes = sizes * tasks
    H = rule.hidden_size
    widths = [1 + rule.input_size + H] + [1 + 2 * H] * (rule.num_layers - 1)
    n_max = max(sizes)
    weights = [torch.randn(4 * H, k) for k in widths]
    z = [torch.randn(k, n_max) for k in widths]
    d_gates = torch.randn(4 * H, n_max)
    gates = torch.empty(4 * H, n_max)
    dz = [torch.empty(k, n_max) for k in widths]
    d_w = [torch.empty(4 * H, k) for k in widths]
    flops = float(sum(3 * 2 * n * k * 4 * H for n in sizes for k in widths))

    def run() -> None:
        for n in sizes:
            for w, zl, dzl, dwl in zip(weights, z, dz, d_w):
                torch.mm(w, zl[:, :n], out=gates[:, :n])
                torch.mm(d_gates[:, :n], zl[:, :n].t(), out=dwl)
                torch.mm(w.t(), d_gates[:, :n], out=dzl[:, :n])

    return run, flops


def _runs(rule: LSTMRule, suite: Suite, tasks: int, seed: int) -> list[InnerRun]:
    rng = np.random.default_rng(seed)
    runs = []
    for i in range(tasks):
        entry, task_seed = suite.sample("train", rng)
        runs.append(InnerRun.start(rule, entry.task(task_seed), label=entry.label, seed=task_seed, horizon=entry.steps))
    return runs


def _on_path(rule: LSTMRule, path: str) -> LSTMRule:
    """``rule``'s θ in a rule whose first-order meta-training takes ``path`` (``fused_training`` on
    for "fused", off for "plain"): the path is the rule's config, so each path gets its own rule."""
    on_path = LSTMRule(**{**rule.config(), "fused_training": path == "fused"})
    on_path.load_state_dict(rule.state_dict())
    return on_path


def _time_paths(
    rules: dict[str, LSTMRule],
    runs: dict[str, list[InnerRun]],
    matmuls: Callable[[], None],
    unroll: int,
    rounds: int,
    warmup: int,
    seed: int,
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Per path (and the matmul bound) the seconds and optimizee steps of each timed meta-step,
    alternating path by path each round; the first ``warmup`` rounds are not kept."""
    estimator, objective = TruncatedBPTT(second_order=False), MetaLoss("mean")
    noise = torch.Generator().manual_seed(seed)
    times: dict[str, list[float]] = {path: [] for path in (*rules, "bound")}
    steps: dict[str, list[int]] = {path: [] for path in rules}
    for repeat in range(rounds):
        for path, rule in rules.items():
            start, done = time.perf_counter(), 0
            for i, run in enumerate(runs[path]):
                if run.finished:  # a fresh run of the same task
                    run = runs[path][i] = InnerRun.start(rule, run.task, label=run.label, seed=run.seed,
                                                         horizon=run.horizon)
                n = min(unroll, run.remaining())
                estimator.estimate(rule, run, n, objective, noise)
                done += n
            if repeat >= warmup:
                times[path].append(time.perf_counter() - start)
                steps[path].append(done)
        start = time.perf_counter()
        matmuls()
        if repeat >= warmup:
            times["bound"].append(time.perf_counter() - start)
    return times, steps


def measure_meta_throughput(
    suite: Suite | str = "l2l_mnist",
    *,
    rule: LSTMRule | None = None,
    tasks: int = 4,
    unroll: int = 20,
    repeats: int = 5,
    warmup: int = 1,
    threads: int = 1,
    seed: int = 0,
    paths: Sequence[str] = PATHS,
) -> dict[str, Any]:
    """Median optimizee steps/s of each path in ``paths`` and of the gate-matmul bound (see the module docstring)."""
    for key, value, low in (("tasks", tasks, 1), ("unroll", unroll, 1), ("repeats", repeats, 1), ("warmup", warmup, 0),
                            ("threads", threads, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"invalid {key}: {value!r} (must be an int >= {low})")
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"invalid paths: {list(paths)!r} (choose from {list(PATHS)})")
    torch.set_num_threads(threads)
    suite = load_suite(suite) if isinstance(suite, str) else suite
    if rule is None:
        torch.manual_seed(seed)
        rule = LSTMRule()
    rules = {path: _on_path(rule, path) for path in paths}
    runs = {path: _runs(rules[path], suite, tasks, seed) for path in paths}
    shapes = [p.shape for p in runs[paths[0]][0].params]
    matmuls, flops_per_step = meta_gate_matmuls(rule, shapes, 1)
    times, steps = _time_paths(rules, runs, matmuls, unroll, warmup + repeats, warmup, seed)
    rates = {path: statistics.median(s / t for s, t in zip(steps[path], times[path])) for path in paths}
    bound_step_s = statistics.median(times["bound"])
    row: dict[str, Any] = {
        "suite": suite.name,
        "tasks": tasks,
        "unroll": unroll,
        "rule_config": rule.config(),
        "params_per_task": int(sum(int(np.prod(s)) for s in shapes)),
        "flops_per_step": flops_per_step,
        "bound_steps_per_s": 1.0 / bound_step_s,
        "matmul_gflops": flops_per_step / bound_step_s / 1e9,
        **{f"{path}_steps_per_s": rate for path, rate in rates.items()},
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        "machine": machine_info(),
    }
    if "fused" in rates:
        row["fused_fraction_of_bound"] = rates["fused"] * bound_step_s
        if "plain" in rates:
            row["fused_over_plain"] = rates["fused"] / rates["plain"]
    return row


def markdown(row: dict[str, Any], command: str) -> str:
    """The result as a short markdown table."""
    lines = [
        f"Meta-training throughput, {row['suite']} ({row['params_per_task']:,} params per task), first-order BPTT, "
        f"unroll {row['unroll']}, {row['tasks']} tasks per meta-step, LSTM {row['rule_config']['num_layers']}x"
        f"{row['rule_config']['hidden_size']}, {row['threads']} thread(s); medians of {row['repeats']} meta-steps.",
        "",
        "| path | optimizee steps/s | vs plain loop | of matmul bound |",
        "|---|---:|---:|---:|",
    ]
    bound = row["bound_steps_per_s"]
    plain = row.get("plain_steps_per_s")
    for path in PATHS:
        rate = row.get(f"{path}_steps_per_s")
        if rate is not None:
            ratio = f"{rate / plain:.2f}x" if plain else "n/a"
            lines.append(f"| {path} | {rate:.1f} | {ratio} | {rate / bound:.0%} |")
    lines.append(f"| gate-matmul bound | {bound:.1f} | | 100% |")
    lines += [
        "",
        f"Bound: {row['flops_per_step'] / 1e6:.0f} MFLOP of gate matmuls (forward and backward) per optimizee step at "
        f"{row['matmul_gflops']:.0f} GFLOP/s measured. CPU: {row['machine']['cpu']}, {row['machine']['cores']} cores, "
        f"load {row['machine']['loadavg']}, torch {row['machine']['torch']}.",
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Measure meta-training throughput (optimizee steps per second summed over the task batch, "
            "first-order truncated BPTT) of the library's fused LSTM path, the plain autograd loop, and "
            "the gate-matmul bound, side by side in one process. Writes meta_speed.md and meta_speed.json to --out."
        ),
    )
    parser.add_argument("--suite", default="l2l_mnist", help="suite name or path (default: %(default)s, the paper's MNIST task)")
    parser.add_argument("--tasks", type=int, default=4, help="tasks per meta-step (default: %(default)s)")
    parser.add_argument("--unroll", type=int, default=20, help="truncation length (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed meta-steps per path (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed meta-steps first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of fused,plain (default: %(default)s)")
    parser.add_argument("--out", default="speed_results", help="output directory (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command line: parse ``argv``, measure, print and write the table."""
    prog = prog or "learned-opt bench-meta-speed"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
    try:
        row = measure_meta_throughput(args.suite, tasks=args.tasks, unroll=args.unroll, repeats=args.repeats,
                                      warmup=args.warmup, threads=args.threads,
                                      paths=[p.strip() for p in args.paths.split(",") if p.strip()])
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(row, command)
    atomic_write_json(out / "meta_speed.json", {**row, "command": command})
    atomic_write_text(out / "meta_speed.md", text)
    print(text)
    return 0
