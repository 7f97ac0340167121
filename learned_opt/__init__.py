"""learned_opt: learned optimizers for PyTorch."""

from learned_opt._version import __version__
from learned_opt.bench.harness import benchmark
from learned_opt.meta.train import meta_train
from learned_opt.optim import (
    GradNormDecayAdam,
    GradNormDecaySGD,
    HypergradientAdam,
    HypergradientSGD,
    LearnedOptimizer,
    LSTMOptimizer,
    MLPOptimizer,
    RelativeAdam,
    load_optimizer,
)
from learned_opt.suites import Suite, SuiteEntry, load_suite
from learned_opt.weights import list_pretrained

__all__ = [
    "GradNormDecayAdam",
    "GradNormDecaySGD",
    "HypergradientAdam",
    "HypergradientSGD",
    "LSTMOptimizer",
    "LearnedOptimizer",
    "MLPOptimizer",
    "RelativeAdam",
    "Suite",
    "SuiteEntry",
    "list_pretrained",
    "load_optimizer",
    "load_suite",
    "__version__",
    "benchmark",
    "meta_train",
]
