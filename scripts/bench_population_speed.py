#!/usr/bin/env python
"""ES evaluation throughput of the batched population engine against the per-task loop, side by side:
same program as `learned_opt.bench.population_speed.measure_population_throughput`."""

import sys

from learned_opt.bench.population_speed import main

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/bench_population_speed.py"))
