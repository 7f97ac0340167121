"""learned_opt: learned optimizers for PyTorch."""

from learned_opt._version import __version__
from learned_opt.bench.harness import benchmark

__all__ = ["__version__", "benchmark"]
