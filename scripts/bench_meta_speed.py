#!/usr/bin/env python
"""Meta-training throughput (optimizee steps/s of the fused LSTM path, the plain autograd loop and the
gate-matmul bound): same program as `learned-opt bench-meta-speed` and
`learned_opt.bench.meta_speed.measure_meta_throughput`."""

import sys

from learned_opt.bench.meta_speed import main

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/bench_meta_speed.py"))
