"""Update rules: each rule's math lives in exactly one module here.

Importing this package registers every rule in ``RULES`` (by its ``name``).
"""

from learned_opt.rules.base import RULES, Rule, RuleState, build_rule
from learned_opt.rules.grad_norm_decay import GradNormDecayAdamRule, GradNormDecayRule
from learned_opt.rules.hypergradient import HypergradientAdamRule, HypergradientSGDRule
from learned_opt.rules.learnable import LearnableAdamRule, LearnableSGDRule
from learned_opt.rules.lstm import LSTMRule
from learned_opt.rules.mlp import MLPRule
from learned_opt.rules.relative import LearnedRelativeAdamRule, RelativeAdamRule

__all__ = [
    "RULES",
    "GradNormDecayAdamRule",
    "GradNormDecayRule",
    "HypergradientAdamRule",
    "HypergradientSGDRule",
    "LSTMRule",
    "LearnedRelativeAdamRule",
    "LearnableAdamRule",
    "LearnableSGDRule",
    "MLPRule",
    "RelativeAdamRule",
    "Rule",
    "RuleState",
    "build_rule",
]
