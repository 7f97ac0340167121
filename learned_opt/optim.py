"""``learned_opt.optim``: the optimizers' historic import path.

The adapter (:class:`LearnedOptimizer`, its state layout and guards) lives in
:mod:`learned_opt.adapter`, the public optimizers and :func:`load_optimizer` in
:mod:`learned_opt.optimizers` (the hand-set adaptive-rate ones in
:mod:`learned_opt.adaptive_optimizers`); every name is importable from here as before.
"""

from learned_opt.adapter import (
    ADAPTER_HPARAMS,
    COMPUTE_DTYPE,
    NONFINITE_CHECK_EVERY,
    NONFINITE_KEY,
    LearnedOptimizer,
)
from learned_opt.optimizers import (
    HYPERPARAMETER_OPTIMIZERS,
    GradNormDecayAdam,
    GradNormDecaySGD,
    HypergradientAdam,
    HypergradientSGD,
    LSTMOptimizer,
    MLPOptimizer,
    RelativeAdam,
    load_optimizer,
)

__all__ = [
    "ADAPTER_HPARAMS",
    "COMPUTE_DTYPE",
    "HYPERPARAMETER_OPTIMIZERS",
    "NONFINITE_CHECK_EVERY",
    "NONFINITE_KEY",
    "GradNormDecayAdam",
    "GradNormDecaySGD",
    "HypergradientAdam",
    "HypergradientSGD",
    "LSTMOptimizer",
    "LearnedOptimizer",
    "MLPOptimizer",
    "RelativeAdam",
    "load_optimizer",
]
