"""The ``learned-opt`` command: one subcommand per tool, each a ``module`` with ``main(argv)`` (or a
``module:function``), plus the argument checks the tools share.

Subcommand modules are imported only when chosen, so ``learned-opt benchmark`` never pays for
meta-training imports (and the other way round). ``scripts/*.py`` call the same ``main`` functions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Sequence
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from learned_opt._version import __version__

# subcommand -> (module holding ``main(argv) -> int``, or "module:function", one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "benchmark": ("learned_opt.bench.cli", "benchmark optimizers on a suite against tuned baselines"),
    "meta-train": ("learned_opt.meta.cli", "meta-train a learned optimizer on a suite of tasks"),
    "list": ("learned_opt.cli:list_main", "the shipped optimizers, with their cards' benchmark figures"),
    "bench-speed": ("learned_opt.bench.speed", "step cost: training-step time vs Adam, LSTM matmul efficiency, memory"),
    "bench-meta-speed": ("learned_opt.bench.meta_speed", "meta-training throughput vs the plain loop and the matmul bound"),
}

THREADS_HELP = (
    "torch intra-op threads (default 1: these tools step many small tensors, and with torch's default "
    "thread count they ran 5-8x slower on cores shared with other busy processes; a larger count helps "
    "only large tasks on idle cores)"
)


def _usage() -> str:
    lines = ["usage: learned-opt [--version] <command> [options]", "", "commands:"]
    width = max(len(name) for name in SUBCOMMANDS)
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `learned-opt <command> --help` for a command's options."]
    return "\n".join(lines)


def version_line() -> str:
    """``learned-opt X (torch Y, python Z)``, read without importing torch."""
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"learned-opt {__version__} (torch {torch_version}, python {platform.python_version()})"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its subcommand's ``main`` with the remaining arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(version_line())
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"learned-opt: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = SUBCOMMANDS[command][0].partition(":")
    return int(getattr(import_module(module_name), function or "main")(rest) or 0)


# --- learned-opt list -----------------------------------------------------------------------------


def card_summary(card: dict[str, Any]) -> str:
    """One line of a card's benchmark figures, per suite: wins vs tuned Adam, loss ratio, median
    speedup, step time (the summary row ``scripts/ship_pretrained.py`` records in ``metrics``)."""
    parts = []
    for suite, row in sorted(card.get("metrics", {}).items()):
        if not isinstance(row, dict):
            continue
        parts.append(f"{suite}: " + _row_figures(row))
        told = row.get("told_the_horizon")
        if isinstance(told, dict):  # a horizon-aware rule is benchmarked untold and told each run's length
            parts.append(f"{suite}, told total_steps: " + _row_figures(told))
    return "; ".join(parts) or "no benchmark figures in its card"


def _row_figures(row: dict[str, Any]) -> str:
    figures = [f"{row.get('wins_vs_tuned_adam', '?')}/{row.get('tasks', '?')} wins vs tuned Adam"]
    if _is_number(row.get("geomean_ratio_to_tuned_adam")):
        figures.append(f"loss ratio {row['geomean_ratio_to_tuned_adam']:.3g}")
    speedup = row.get("median_speedup")
    if isinstance(speedup, dict) and speedup.get("text"):
        figures.append(f"median speedup {speedup['text']}")
    if _is_number(row.get("step_time_ratio_to_adam")):
        figures.append(f"step time {row['step_time_ratio_to_adam']:.2f}x Adam")
    if row.get("diverged_tasks"):
        figures.append(f"diverged on {row['diverged_tasks']} tasks")
    return ", ".join(figures)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def list_main(argv: Sequence[str] | None = None) -> int:
    """``learned-opt list``: each shipped name, its rule and its card's figures, one line each."""
    argparse.ArgumentParser(
        prog="learned-opt list",
        description="List the optimizers shipped with this install: name, rule, and the figures its card "
        "records (from `python scripts/ship_pretrained.py`; reports under docs/results/). Use a name with "
        "learned_opt.load_optimizer(NAME, params) or `learned-opt benchmark --optimizers NAME`.",
    ).parse_args(argv)
    from learned_opt.weights import PRETRAINED_DIR, list_pretrained, read_card

    rows = []
    for name in list_pretrained():
        try:
            card = read_card(PRETRAINED_DIR / f"{name}.safetensors")
        except (OSError, ValueError) as exc:
            rows.append((name, "?", f"unreadable card: {exc}"))
            continue
        rows.append((name, str(card.get("rule", "?")), card_summary(card)))
    if not rows:
        print("no optimizers are shipped with this install")
        return 0
    name_w, rule_w = (max(len(r[i]) for r in rows) for i in (0, 1))
    print(f"{'name':<{name_w}}  {'rule':<{rule_w}}  figures (suite: untuned, against baselines tuned per task)")
    for name, rule, summary in rows:
        print(f"{name:<{name_w}}  {rule:<{rule_w}}  {summary}")
    return 0


# --- argument checks shared by the tools ----------------------------------------------------------


def add_threads_flag(parser: argparse.ArgumentParser, extra_help: str = "") -> None:
    """``--threads N`` (default 1, see :data:`THREADS_HELP`); apply it with :func:`apply_threads`."""
    parser.add_argument("--threads", type=positive_int, default=1, metavar="N",
                        help=THREADS_HELP + (f"; {extra_help}" if extra_help else ""))


def apply_threads(threads: int) -> None:
    """Set torch's intra-op threads for this process (the CLIs only: the Python APIs leave it alone)."""
    import torch

    torch.set_num_threads(threads)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def check_output_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a directory that can be created or written: ValueError naming the part in the way.

    Nothing is created: checked before any run, so a bad ``--out`` leaves nothing behind."""
    out = Path(path).expanduser()
    for part in (out, *out.parents):
        if not part.exists():
            continue
        if not part.is_dir():
            where = f"{out} is" if part == out else f"{out}: {part} is"
            raise ValueError(f"output directory {where} a file, not a directory; choose another path")
        if not os.access(part, os.W_OK | os.X_OK):
            raise ValueError(f"output directory {out}: {part} is not writable; choose another path")
        return out
    return out


def output_dir(text: str) -> Path:
    """argparse type for ``--out``: see :func:`check_output_dir`."""
    try:
        return check_output_dir(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_text_file(path: str | os.PathLike[str]) -> None:
    """An existing file must be readable UTF-8 text (TOML is): ValueError naming the file and the fix."""
    file = Path(path).expanduser()
    try:
        file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        raise ValueError(f"{file} is not UTF-8 text (byte 0x{bad:02x} at offset {exc.start}); "
                         "save it as UTF-8") from None
    except OSError as exc:
        raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from None


def suite_or_file(text: str) -> str:
    """argparse type for ``--suite``/``--config``: a name passes through; an existing file must be
    UTF-8 text (the loaders' own errors name the file for everything else)."""
    if Path(text).expanduser().is_file():
        try:
            check_text_file(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return text


if __name__ == "__main__":
    sys.exit(main())
