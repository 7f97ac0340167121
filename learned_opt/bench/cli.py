"""``learned-opt benchmark`` / ``scripts/benchmark.py``: the command line of :func:`learned_opt.benchmark`."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from learned_opt.bench.harness import BenchmarkConfigError, benchmark
from learned_opt.bench.settings import check_steps_override
from learned_opt.cli import add_threads_flag, apply_threads, output_dir, suite_or_file


def build_parser(prog: str = "learned-opt benchmark") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark optimizers on a suite's test tasks against tuned Adam and Adam(lr=1e-3); "
        "writes report.md, results.json and plots to --out. Flags override the suite's [benchmark] table.",
    )
    p.add_argument("--suite", required=True, type=suite_or_file, help="suite name (e.g. heldout) or path to a suite .toml file")
    p.add_argument("--optimizers", nargs="+", metavar="SPEC",
                   help="shipped names, .safetensors paths, sgd momentum nesterov adam adamw rmsprop adagrad, "
                   "GradNormDecaySGD GradNormDecayAdam HypergradientSGD HypergradientAdam RelativeAdam, module:factory, "
                   "schedulefree-adamw, prodigy; NAME[lr=0.01,...] fixes hyperparameters (quote it in the shell)")
    tune = p.add_mutually_exclusive_group()
    tune.add_argument("--tune", dest="tune", action="store_true", default=None,
                      help="tune each tunable optimizer's lr per task (grid 1e-4 … 1, half-decades, extended)")
    tune.add_argument("--no-tune", dest="tune", action="store_false", help="run untuned (tuned Adam still tuned)")
    p.add_argument("--seeds", type=_seeds, help="number of test seeds, or a comma-separated list of test seeds")
    p.add_argument("--split", choices=["test", "validation"], default="test",
                   help="task seeds to run on: test (reports) or validation (choosing settings); default test")
    p.add_argument("--steps", type=_steps,
                   help="horizon override: N steps, or Nx to multiply each task's horizon (e.g. 10x)")
    p.add_argument("--out", type=output_dir, help="output directory (run cache, report.md, results.json, plots/)")
    p.add_argument("--device", default="cpu", help="torch device for the tasks (default cpu)")
    p.add_argument("--eval-every", type=int, help="evaluate the full-data loss every K steps (0 = auto)")
    p.add_argument("--timing-steps", type=int, help="steps of the timing pass (0 = skip it)")
    add_threads_flag(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _seeds(text: str) -> int | list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a comma-separated list of ints, got {text!r}") from None


def _steps(text: str) -> int | str:
    try:
        steps = check_steps_override(text, "--steps")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--steps: ")) from None
    assert steps is not None
    return steps


def main(argv: Sequence[str] | None = None, prog: str = "learned-opt benchmark") -> int:
    """Parse flags, run the benchmark, print the report and where the files are."""
    args = build_parser(prog).parse_args(argv)
    apply_threads(args.threads)
    command = " ".join([prog, shlex.join(list(sys.argv[1:] if argv is None else argv))])
    try:
        result = benchmark(
            args.suite, args.optimizers, tune=args.tune, seeds=args.seeds, steps=args.steps, out=args.out,
            device=args.device, eval_every=args.eval_every, timing_steps=args.timing_steps,
            progress=not args.quiet, plots=not args.no_plots, command=command, split=args.split,
        )
    except BenchmarkConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(result.report)
    if result.out is not None:
        plots = f" and plots in {result.out / 'plots'}/" if any(f.suffix == ".png" for f in result.files) else ""
        print(f"\nWrote {result.out / 'report.md'}, {result.out / 'results.json'}{plots}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
