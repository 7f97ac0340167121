"""The ``learned-opt`` command: one subcommand per tool, each a module with ``main(argv)``.

Subcommand modules are imported only when chosen, so ``learned-opt benchmark`` never pays for
meta-training imports (and the other way round). ``scripts/*.py`` call the same ``main`` functions.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import import_module

# subcommand -> (module holding ``main(argv) -> int``, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "benchmark": ("learned_opt.bench.cli", "benchmark optimizers on a suite against tuned baselines"),
    "meta-train": ("learned_opt.meta.cli", "meta-train a learned optimizer on a suite of tasks"),
    "bench-speed": ("learned_opt.bench.speed", "step cost: training-step time vs Adam, LSTM matmul efficiency, memory"),
    "bench-meta-speed": ("learned_opt.bench.meta_speed", "meta-training throughput vs the plain loop and the matmul bound"),
}


def _usage() -> str:
    lines = ["usage: learned-opt <command> [options]", "", "commands:"]
    width = max(len(name) for name in SUBCOMMANDS)
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `learned-opt <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its subcommand's ``main`` with the remaining arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"learned-opt: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = import_module(SUBCOMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
