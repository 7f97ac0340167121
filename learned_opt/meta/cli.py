"""``learned-opt meta-train`` / ``scripts/meta_train.py``: the command line of :func:`meta_train`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import Field, fields
from typing import TYPE_CHECKING, Any

from learned_opt.cli import add_threads_flag, apply_threads, output_dir, suite_or_file
from learned_opt.meta.config import CHOICES, MetaTrainConfig, parse_range_flag

if TYPE_CHECKING:
    from learned_opt.meta.trainer import MetaTrainResult

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


# The config fields that are flags (``suite`` is the ``tasks`` argument), with the parsers of those
# whose type their default does not tell.
FLAG_FIELDS = tuple(f for f in fields(MetaTrainConfig) if f.name != "suite")
PARSERS: dict[str, Callable[[str], Any]] = {"unroll": _range_arg, "horizon": _range_arg, "rule_config": _json_object}


def _flag(f: Field[Any]) -> dict[str, Any]:
    """argparse keyword arguments of the flag of config field ``f``: its type from its default, its
    choices from :data:`~learned_opt.meta.config.CHOICES`, its help from the field."""
    kwargs: dict[str, Any] = {"help": f.metadata.get("help")}
    default = getattr(MetaTrainConfig(), f.name)
    if f.name == "rule":
        kwargs["help"] = f"{kwargs['help']}: {_rule_names()}"
    if f.name in CHOICES:
        kwargs["choices"] = list(CHOICES[f.name])
    elif f.name in PARSERS:
        kwargs["type"] = PARSERS[f.name]
    elif isinstance(default, bool):
        kwargs.update(action=argparse.BooleanOptionalAction, default=None)
    elif isinstance(default, (int, float)):
        kwargs["type"] = type(default)
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    """The parser: the run's own flags, then one flag per config field (overrides of the config file)."""
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
    suite = MetaTrainConfig.__dataclass_fields__["suite"].metadata["help"]
    p.add_argument("--suite", type=suite_or_file, help=f"{suite}; default: the config file's [suite]")
    for f in FLAG_FIELDS:
        p.add_argument("--" + f.name.replace("_", "-"), **_flag(f))
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

    overrides = {f.name: getattr(args, f.name) for f in FLAG_FIELDS if f.name not in ("rule", "estimator")}
    try:
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
    _print_summary(result)
    return 0


def _print_summary(result: MetaTrainResult) -> None:
    """The one-paragraph summary of a finished run (rank 0)."""
    rate = result.inner_steps_per_s
    print(f"meta-trained {result.step} steps in {result.wall_s:.1f}s ({result.inner_steps} optimizee steps"
          + ("" if rate is None else f", {rate:.0f}/s") + f"); final meta-loss {result.final_meta_loss}; "
          f"best validation {result.best_val} at step {result.best_step}; skipped updates {result.skipped}")
    print(f"weights: {result.out / 'final.safetensors'} (best: {result.out / 'best.safetensors'})")


if __name__ == "__main__":
    sys.exit(main())
