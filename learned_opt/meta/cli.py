"""``learned-opt meta-train`` / ``scripts/meta_train.py``: the command line of :func:`meta_train`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from learned_opt.cli import add_threads_flag, apply_threads, output_dir, suite_or_file
from learned_opt.meta.config import parse_range_flag

EXAMPLES = """examples:
  python scripts/meta_train.py --config tasks/l2l_quadratic.toml --out runs/quad
  python scripts/meta_train.py --suite meta_train --rule learnable-adam --estimator pes --out runs/ladam
  python scripts/meta_train.py --out runs/quad --resume          # continue after Ctrl-C or a crash
  torchrun --nproc_per_node=4 scripts/meta_train.py --config tasks/l2l_mnist.toml --out runs/mnist
"""


def _range_arg(text: str) -> Any:
    try:
        return parse_range_flag(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"hidden_size\": 20}}', got {text!r}")
    return value


def _rule_names() -> str:
    from learned_opt.rules.base import RULES

    return ", ".join(sorted(RULES))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="learned-opt meta-train",
        description="Meta-train a learned optimizer. Settings come from the config file's [meta_train] table; "
        "flags override them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=suite_or_file, help="TOML file with a [meta_train] table (and usually the [suite] to train on)")
    p.add_argument("--out", required=True, type=output_dir, help="output directory (must be empty unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--suite", type=suite_or_file, help="suite name (e.g. meta_train) or .toml path; default: the config file's [suite]")
    p.add_argument("--rule", help=f"rule to meta-train: {_rule_names()}")
    p.add_argument("--rule-config", type=_json_object, help='rule constructor kwargs as JSON, e.g. \'{"hidden_size": 20}\'')
    p.add_argument("--estimator", choices=["bptt", "es", "pes"])
    p.add_argument("--second-order", action=argparse.BooleanOptionalAction, default=None,
                   help="bptt: differentiate through the optimizee gradients too")
    p.add_argument("--es-sigma", type=float, help="es/pes perturbation scale")
    p.add_argument("--es-pairs", type=int, help="es/pes antithetic pairs per task and truncation")
    p.add_argument("--unroll", type=_range_arg, help="steps per truncation: N, or LO:HI for log-uniform lengths")
    p.add_argument("--horizon", type=_range_arg, help="steps per inner run: N, LO:HI (log-uniform) or 'suite'")
    p.add_argument("--random-start", action=argparse.BooleanOptionalAction, default=None,
                   help="start each slot's first run at a random iteration")
    p.add_argument("--tasks-per-step", type=int, help="inner runs per meta-step (split across ranks)")
    p.add_argument("--meta-loss", choices=["mean", "final", "heldout"])
    p.add_argument("--loss-cap", type=float, help="cap on log(loss / initial loss)")
    p.add_argument("--meta-optimizer", choices=["adam", "sgd"])
    p.add_argument("--meta-lr", type=float)
    p.add_argument("--grad-clip", type=float, help="meta-gradient norm clip (0: off)")
    p.add_argument("--meta-steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="meta-steps between validation runs (best.*)")
    p.add_argument("--eval-tasks", type=int, help="validation tasks per evaluation")
    p.add_argument("--checkpoint-every", type=int, help="meta-steps between checkpoints")
    p.add_argument("--device", help="cpu or cuda")
    add_threads_flag(p, "the same count makes a CPU run bitwise reproducible, so resume with the same --threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run meta-training from command-line arguments; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from learned_opt.meta.train import MetaTrainingInterrupted, meta_train

    try:
        overrides = {
            "rule_config": args.rule_config, "second_order": args.second_order, "es_sigma": args.es_sigma,
            "es_pairs": args.es_pairs, "unroll": args.unroll, "horizon": args.horizon,
            "random_start": args.random_start,
            "tasks_per_step": args.tasks_per_step, "meta_loss": args.meta_loss, "loss_cap": args.loss_cap,
            "meta_optimizer": args.meta_optimizer, "meta_lr": args.meta_lr, "grad_clip": args.grad_clip,
            "meta_steps": args.meta_steps, "seed": args.seed, "eval_every": args.eval_every,
            "eval_tasks": args.eval_tasks, "checkpoint_every": args.checkpoint_every, "device": args.device,
        }
        result = meta_train(args.rule, args.suite, estimator=args.estimator, config=args.config, out=args.out,
                            resume=args.resume, progress=not args.no_progress, **overrides)
    except MetaTrainingInterrupted as exc:
        print(f"learned-opt meta-train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except (ValueError, FileNotFoundError) as exc:
        print(f"learned-opt meta-train: error: {exc}", file=sys.stderr)
        return 2
    if result.step == 0 or result.out is None or result.rank != 0:  # one summary per job
        return 0
    rate = result.inner_steps_per_s
    print(f"meta-trained {result.step} steps in {result.wall_s:.1f}s ({result.inner_steps} optimizee steps"
          + ("" if rate is None else f", {rate:.0f}/s") + f"); final meta-loss {result.final_meta_loss}; "
          f"best validation {result.best_val} at step {result.best_step}; skipped updates {result.skipped}")
    print(f"weights: {result.out / 'final.safetensors'} (best: {result.out / 'best.safetensors'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
