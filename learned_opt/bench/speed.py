"""Step cost of the optimizers: training-step time against Adam, LSTM gate-matmul efficiency, memory.

Every measurement (one optimizer on one model size) runs in a fresh ``spawn`` subprocess, so peak
resident memory is that run's own and no allocator or thread-pool state leaks between runs;
times are medians over repeated steps after warm-up steps. Models are MLPs
(``64 → w → w → 10``, ReLU) whose width ``w`` gives the requested parameter count, at batch 128.

Reported per optimizer and size:

- **training step**: ``zero_grad`` + forward + backward + ``step``; its **ratio** to the same with
  ``torch.optim.Adam(foreach=True)`` on the same model;
- **optimizer step** alone, and optimizer **state bytes per parameter** (unique storages, so
  group-wide state shared by every parameter counts once);
- **peak RSS** of the subprocess;
- for LSTM optimizers, the **efficiency**: the time of the gate matmuls alone, per chunk and layer
  ``(N × (inputs + H)) @ ((inputs + H) × 4H)`` at the rule's chunk size ``N``, divided by the
  optimizer step time; the two are timed alternately in the same process (so a shared machine's
  load drifts over both alike); FLOPs are those matmuls' ``2·N·(inputs + H)·4H``.

JSON rows also hold the fastest step (``*_min_s``), a steadier figure than the median on a busy machine.

``run_speed_benchmark`` is the Python entry point (optimizers are :class:`SpeedSpec` objects
with picklable factories); ``main`` is the command line (``scripts/bench_speed.py``,
``learned-opt bench-speed``).
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import Optimizer

from learned_opt.bench.timing import state_bytes
from learned_opt.fileio import atomic_write_json, atomic_write_text
from learned_opt.optim import (
    GradNormDecayAdam,
    GradNormDecaySGD,
    HypergradientAdam,
    HypergradientSGD,
    LearnedOptimizer,
    LSTMOptimizer,
    RelativeAdam,
)
from learned_opt.rules.lstm import LSTMRule

SIZES: dict[str, int] = {"10k": 10_000, "100k": 100_000, "1M": 1_000_000, "10M": 10_000_000}
DEFAULT_SIZES = ("10k", "100k", "1M", "10M")
BATCH = 128
IN_FEATURES = 64
CLASSES = 10
BASELINE = "adam"
TOLD_STEPS = 1_000_000  # the horizon told to ``default (told)``: far beyond the steps a measurement takes
LARGE = 5_000_000  # sizes from here on use ``large_repeats`` timed steps


@dataclass(frozen=True)
class SpeedSpec:
    """A named optimizer: ``factory(params) -> Optimizer``; picklable (a class or functools.partial)."""

    name: str
    factory: Callable[[Iterable[nn.Parameter]], Optimizer]


def default_optimizers() -> list[SpeedSpec]:
    """Adam (the baseline) and every library optimizer, at default hyperparameters.

    Learned rules without shipped weights run untrained: a step costs the same whatever the
    weights' values. The shipped ``default`` is measured when this install has it.
    """
    specs = [
        SpeedSpec(BASELINE, functools.partial(torch.optim.Adam, lr=1e-3, foreach=True)),
        SpeedSpec("lstm", functools.partial(LSTMOptimizer, weights=None)),
        SpeedSpec("hypergradient-adam", HypergradientAdam),
        SpeedSpec("hypergradient-sgd", HypergradientSGD),
        SpeedSpec("grad-norm-decay-sgd", GradNormDecaySGD),
        SpeedSpec("grad-norm-decay-adam", GradNormDecayAdam),
        SpeedSpec("relative-adam", RelativeAdam),
    ]
    from learned_opt.optim import MLPOptimizer, load_optimizer
    from learned_opt.weights import list_pretrained

    specs.append(SpeedSpec("mlp (untrained)", functools.partial(MLPOptimizer, weights=None)))
    specs.append(SpeedSpec("learned-relative-sf", _learned_relative_sf))
    if "default" in list_pretrained():
        specs.append(SpeedSpec("default", functools.partial(load_optimizer, "default")))
        specs.append(SpeedSpec("default (told)", functools.partial(load_optimizer, "default", total_steps=TOLD_STEPS)))
    return specs


def _learned_relative_sf(params: Iterable[Any]) -> Optimizer:
    """The learned relative Adam in schedule-free form at its initial θ (a step costs the same for any θ)."""
    from learned_opt.optim import LearnedOptimizer
    from learned_opt.rules.relative import LearnedRelativeAdamRule

    return LearnedOptimizer(params, LearnedRelativeAdamRule(hidden=0, schedule_free=True))


def parse_size(text: str | int) -> int:
    """``"10k"``, ``"1M"``, ``"2.5M"`` or an int -> a parameter count (ValueError naming the text)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", text)
        if not match:
            raise ValueError(f"invalid size {text!r} (use e.g. 10k, 1M or 250000)")
        value = round(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6}[match.group(2).lower()])
    if value < 100:
        raise ValueError(f"invalid size {text!r} (at least 100 parameters)")
    return value


def mlp_for(num_params: int) -> nn.Sequential:
    """The benchmark MLP ``64 → w → w → 10`` with ``w`` chosen so it has about ``num_params`` parameters."""
    b = IN_FEATURES + CLASSES + 2  # w² + b·w + CLASSES = num_params
    width = max(1, round((-b + math.sqrt(b * b + 4 * max(num_params - CLASSES, 0))) / 2))
    return nn.Sequential(
        nn.Linear(IN_FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, CLASSES)
    )


def gate_matmuls(rule: LSTMRule, numel: int, dtype: torch.dtype = torch.float32) -> tuple[Callable[[], None], float]:
    """A function running the LSTM's gate matmuls alone for ``numel`` coordinates, and their FLOPs.

    Per chunk (the rule's ``chunk_size``) and layer ``(N × (inputs + H)) @ ((inputs + H) × 4H)``,
    written as its transpose (the layout the rule uses) into a preallocated output.
    """
    H, N = rule.hidden_size, min(rule.chunk_size, numel)
    widths = [rule.input_size + H] + [2 * H] * (rule.num_layers - 1)
    weights = [torch.randn(4 * H, k, dtype=dtype) for k in widths]
    inputs = [torch.randn(k, N, dtype=dtype) for k in widths]
    out = torch.empty(4 * H, N, dtype=dtype)
    sizes = [N] * (numel // N) + ([numel % N] if numel % N else [])
    flops = float(sum(2 * n * k * 4 * H for n in sizes for k in widths))

    def run() -> None:
        for n in sizes:
            for w, z in zip(weights, inputs):
                torch.mm(w, z[:, :n], out=out[:, :n])

    return run, flops


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def measure(spec: SpeedSpec, num_params: int, *, warmup: int, repeats: int, threads: int, seed: int = 0) -> dict[str, Any]:
    """One optimizer on one model size, in this process (``run_speed_benchmark`` calls it in a fresh one)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = mlp_for(num_params)
    params = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(BATCH, IN_FEATURES), torch.randint(0, CLASSES, (BATCH,))
    rss_model = _peak_rss_bytes()
    opt = spec.factory(model.parameters())
    steps, opt_steps = [], []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            steps.append(t2 - t0)
            opt_steps.append(t2 - t1)
    result: dict[str, Any] = {
        "optimizer": spec.name,
        "params": params,
        "threads": threads,
        "repeats": repeats,
        "step_s": statistics.median(steps),
        "opt_step_s": statistics.median(opt_steps),
        "step_min_s": min(steps),
        "opt_step_min_s": min(opt_steps),
        "state_bytes_per_param": state_bytes(opt) / params,
    }
    rule = opt.rule if isinstance(opt, LearnedOptimizer) else None
    if isinstance(rule, LSTMRule):
        # optimizer steps (on the last gradients) and matmuls alternate, so both see the same load
        run, flops = gate_matmuls(rule, params)
        run()  # warm-up
        step_times, matmul_times = [], []
        for _ in range(max(repeats, 3)):
            t0 = time.perf_counter()
            opt.step()
            t1 = time.perf_counter()
            run()
            step_times.append(t1 - t0)
            matmul_times.append(time.perf_counter() - t1)
        result.update(
            chunk_size=rule.chunk_size,
            lstm_step_s=statistics.median(step_times),
            gate_matmul_s=statistics.median(matmul_times),
            gate_gflops=flops / 1e9,
        )
        result["efficiency"] = result["gate_matmul_s"] / result["lstm_step_s"]
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["model_rss_bytes"] = rss_model
    return result


def _in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args, kwargs)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, load averages and library versions, for the report."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model, "cores": os.cpu_count(), "loadavg": load, "torch": torch.__version__, "python": platform.python_version()}


def run_speed_benchmark(
    sizes: Sequence[int | str] = DEFAULT_SIZES,
    optimizers: Sequence[SpeedSpec] | None = None,
    *,
    repeats: int = 10,
    large_repeats: int = 3,
    warmup: int = 2,
    threads: int = 1,
    out_dir: str | Path | None = None,
    command: str | None = None,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Measure every optimizer at every size (each in a fresh subprocess); return the report.

    Adam (``torch.optim.Adam(foreach=True)``) is always measured as the ratios' baseline. With
    ``out_dir``, writes ``speed.json`` and ``speed.md`` there (atomically).
    """
    for key, value, low in (("repeats", repeats, 1), ("large_repeats", large_repeats, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"invalid {key}: {value!r} (must be an int >= {low})")
    counts = [parse_size(s) for s in sizes]
    specs = list(default_optimizers() if optimizers is None else optimizers)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"optimizer names must be unique, got {names}")
    if BASELINE not in names:
        specs.insert(0, default_optimizers()[0])
    else:  # the baseline first, so each size's ratios are known as its rows arrive
        specs.sort(key=lambda s: s.name != BASELINE)
    info_start = machine_info()
    rows = []
    started = time.perf_counter()
    for count in counts:
        reps = large_repeats if count >= LARGE else repeats
        base = None
        for spec in specs:
            row = _in_fresh_process(measure, spec, count, warmup=warmup, repeats=reps, threads=threads)
            row["size"] = count
            if spec.name == BASELINE:
                base = row["step_s"]
            row["ratio_vs_adam"] = row["step_s"] / base if base else None
            rows.append(row)
            if progress:
                progress(_row_line(row))
    report = {
        "command": command,
        "machine": {**info_start, "loadavg_end": machine_info()["loadavg"]},
        "settings": {"batch": BATCH, "repeats": repeats, "large_repeats": large_repeats, "warmup": warmup, "threads": threads},
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "speed.json", report)
        atomic_write_text(out / "speed.md", markdown_table(report))
    return report


def _row_line(row: dict[str, Any]) -> str:
    eff = f", LSTM efficiency {row['efficiency']:.0%}" if "efficiency" in row else ""
    ratio = f"{row['ratio_vs_adam']:.2f}x Adam" if row.get("ratio_vs_adam") else "-"
    return f"{row['params']:>10,} {row['optimizer']:<22} step {row['step_s'] * 1e3:9.2f} ms ({ratio}){eff}"


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a markdown table, preceded by the command and the machine."""
    m, s = report["machine"], report["settings"]
    lines = [
        f"Command: `{report['command']}`" if report.get("command") else "Command: (called from Python)",
        f"Machine: {m['cpu']}, {m['cores']} cores, {s['threads']} torch thread(s); torch {m['torch']}; "
        f"load average at start {_load(m['loadavg'])}, at end {_load(m['loadavg_end'])}.",
        f"Batch {s['batch']}; medians of {s['repeats']} timed steps ({s['large_repeats']} from "
        f"{LARGE:,} parameters) after {s['warmup']} warm-up steps, each optimizer and size in a fresh process.",
        "LSTM efficiency = time of its gate matmuls alone at its chunk size ÷ its optimizer step, "
        "the two timed alternately in one process.",
        "",
        "| params | optimizer | train step ms | ratio vs Adam | opt step ms | state B/param | peak RSS MiB "
        "| gate matmuls ms | gate GFLOP/s | LSTM efficiency |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        if "efficiency" in r:
            lstm = f"{_ms(r['gate_matmul_s'])} | {r['gate_gflops'] / r['gate_matmul_s']:.1f} | {r['efficiency']:.0%}"
        else:
            lstm = "– | – | –"
        ratio = "–" if r["ratio_vs_adam"] is None else f"{r['ratio_vs_adam']:.2f}"
        lines.append(
            f"| {r['params']:,} | {r['optimizer']} | {_ms(r['step_s'])} | {ratio} | {_ms(r['opt_step_s'])} "
            f"| {r['state_bytes_per_param']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | {lstm} |"
        )
    return "\n".join(lines) + "\n"


def _load(load: Sequence[float] | None) -> str:
    return "n/a" if load is None else " / ".join(f"{v:.2f}" for v in load) + " (1/5/15 min)"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Measure the step cost of the library's optimizers on MLPs of given sizes (batch 128): "
            "training-step time (zero_grad + forward + backward + step) and its ratio to "
            "torch.optim.Adam(foreach=True), the optimizer step alone, state bytes per parameter, "
            "peak resident memory, and for the LSTM its efficiency (time of its gate matmuls alone "
            "at its chunk size / its step time). Each optimizer and size runs in a fresh subprocess; "
            "times are medians. Writes speed.md (table) and speed.json to --out."
        ),
    )
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated parameter counts, e.g. 10k,1M or 250000 (default: %(default)s)")
    names = [s.name for s in default_optimizers()]
    parser.add_argument("--optimizers", default=None, help=f"comma-separated subset of {names} (default: all; Adam is always measured)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per measurement (default: %(default)s)")
    parser.add_argument("--large-repeats", type=int, default=3, help=f"timed steps from {LARGE:,} parameters on (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement (default: %(default)s; on a shared, loaded CPU more threads wait on each other)")
    parser.add_argument("--out", default="speed_results", help="output directory for speed.md and speed.json (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command line: parse ``argv``, run, print the table."""
    prog = prog or "learned-opt bench-speed"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    specs = None
    if args.optimizers:
        known = {s.name: s for s in default_optimizers()}
        wanted = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            parser.error(f"unknown optimizers {unknown}; choose from {sorted(known)}")
        specs = [known[n] for n in wanted]
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        command = " ".join([prog, *(sys.argv[1:] if argv is None else argv)])
        report = run_speed_benchmark(
            sizes,
            specs,
            repeats=args.repeats,
            large_repeats=args.large_repeats,
            warmup=args.warmup,
            threads=args.threads,
            out_dir=args.out,
            command=command,
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(markdown_table(report))
    return 0
