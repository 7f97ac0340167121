#!/usr/bin/env python
"""Benchmark optimizers on a suite: same program as `learned-opt benchmark` and `learned_opt.benchmark`."""

import sys

from learned_opt.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/benchmark.py"))
