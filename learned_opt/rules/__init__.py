"""Update rules: each rule's math lives in exactly one module here."""

from learned_opt.rules.base import RULES, Rule, RuleState, build_rule

__all__ = ["RULES", "Rule", "RuleState", "build_rule"]
