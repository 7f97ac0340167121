#!/usr/bin/env python
"""Step cost of the optimizers (training-step ratio to Adam, LSTM efficiency, memory): same program
as `learned-opt bench-speed` and `learned_opt.bench.speed.run_speed_benchmark`."""

import sys

from learned_opt.bench.speed import main

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/bench_speed.py"))
