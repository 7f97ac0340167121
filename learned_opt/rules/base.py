"""The Rule: the single home of an update rule's math.

A Rule is an ``nn.Module`` whose parameters are the meta-parameters θ. Its ``init_state`` and
``update`` are pure functions over one param group: meta-training calls them with autograd on
(differentiable in θ, and through the gradients for second-order meta-training); the
``torch.optim`` adapter calls the very same code under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

# (group-wide state, one dict per parameter). Group state holds quantities shared by the whole
# param group (step count, an adapted learning-rate factor); per-parameter state is shaped like the
# parameter (momentum, LSTM hidden/cell state with trailing hidden dims).
GroupState = dict[str, Tensor]
ParamState = dict[str, Tensor]
RuleState = tuple[GroupState, list[ParamState]]

RULES: dict[str, type[Rule]] = {}


class Rule(nn.Module):
    """Base class of update rules.

    Subclasses set ``name`` (the registry key written into weight cards), ``hyperparameters`` (the
    param-group keys and defaults the optimizer adapter passes in ``hparams``; always includes
    ``lr``, a multiplier of the rule's own rate: 1.0 is the step the rule was trained or set to
    take, and schedulers scale it), and implement ``init_state``/``update``/``config``.
    """

    name: ClassVar[str] = ""
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0}
    # Hyperparameters and state keys added after states were saved: a loaded state may lack them
    # (a hyperparameter then takes its default here, which must be the rule as it was before).
    added_keys: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            RULES[cls.name] = cls

    def config(self) -> dict[str, Any]:
        """JSON-able constructor kwargs; ``type(self)(**self.config())`` rebuilds the architecture."""
        return {}

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        """Fresh state for a group of parameters (state tensors on each parameter's device/dtype)."""
        raise NotImplementedError

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        """Additive updates (``p_new = p + u``) for one group and the new state. Never mutates."""
        raise NotImplementedError

    def join_state(self, group_state: GroupState, per_param: list[ParamState]) -> list[ParamState]:
        """Fresh state of parameters joining a group whose state has already advanced (their grad
        was None so far). A rule whose "fresh" means "equal to a group-wide reference" (the LSTM)
        moves them onto it; by default fresh per-parameter state is kept as it is."""
        return per_param

    def update_inplace(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        """:meth:`update` for a caller that gives ``state`` up (the optimizer adapter): the new state
        may reuse the old state's storage, as torch optimizers update their state in place. Rules
        with large state override it to save the allocation; by default it is :meth:`update`."""
        return self.update(grads, params, state, hparams)

    def move_inplace(self, grads: Sequence[Tensor], params: Sequence[Tensor], state: RuleState,
                     hparams: Mapping[str, Tensor | float], settings: Mapping[str, float]) -> RuleState | None:
        """One step for the optimizer on the CPU that moves ``params`` (its own tensors) in place and
        returns the new state, for rules with a fused path; None (nothing changed) where a rule has
        none or declines, and the caller takes :meth:`update_inplace`. ``settings`` holds the step
        transforms as numbers: ``sign`` (-1 when maximizing), ``coupled`` (L2 decay added to the
        gradient), ``decoupled`` (the AdamW shrink of the parameters) and ``bound`` (the guard's
        norm bound: a rule declines a gradient, decay included, above it or not finite)."""
        return None

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Raise ValueError naming any hyperparameter value this rule cannot use.

        The base check gives every key of ``hyperparameters`` its default's kind (a number, a bool,
        a tuple of them: ``lr="0.1"`` or ``lr=True`` fail here, not at ``step()``) and covers ``lr``
        (finite, >= 0); subclasses extend it with their own keys' ranges.
        """
        for key, default in self.hyperparameters.items():
            if key in hparams:
                check_like(key, hparams[key], default)
        check_nonnegative("lr", hparams.get("lr", 0.0))

    def meta_hparams(self) -> dict[str, Tensor | float]:
        """The ``hparams`` meta-training passes to ``update``: derived from θ where θ holds them."""
        return {k: v for k, v in self.hyperparameters.items()}

    def default_hparams(self) -> dict[str, Any]:
        """This instance's defaults of ``hyperparameters``: the optimizer adapter's group defaults
        (a rule whose θ holds hyperparameters gives its learned or configured values)."""
        return dict(self.hyperparameters)


def check_number(key: str, value: Any) -> float:
    """``value`` as a float; ValueError unless it is a real number or a one-element tensor
    (strings, bools and None are refused, not coerced)."""
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    is_scalar_tensor = isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex()
    if not (is_number or is_scalar_tensor):
        raise ValueError(f"invalid {key}: {value!r} (must be a number)")
    return float(value)


def check_like(key: str, value: Any, default: Any) -> None:
    """ValueError unless ``value`` is the kind of value ``default`` is: a bool, a number, or a
    tuple (or list) of as many of them."""
    if isinstance(default, bool):
        check_bool(key, value)
    elif isinstance(default, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(default):
            raise ValueError(f"invalid {key}: {value!r} (must be a tuple of {len(default)} values)")
        for i, (v, d) in enumerate(zip(value, default)):
            check_like(f"{key}[{i}]", v, d)
    elif isinstance(default, numbers.Real):
        check_number(key, value)


def check_nonnegative(key: str, value: Any) -> None:
    """ValueError unless ``value`` is a finite number >= 0 (NaN fails too)."""
    v = check_number(key, value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"invalid {key}: {value!r} (must be a finite number >= 0)")


def check_bool(key: str, value: Any) -> bool:
    """ValueError unless ``value`` is a bool (1, "yes" and None are refused, not coerced)."""
    if not isinstance(value, bool):
        raise ValueError(f"invalid {key}: {value!r} (must be True or False)")
    return value


def check_count(key: str, value: Any, low: int) -> None:
    """ValueError unless ``value`` is a whole number >= ``low`` (a step count)."""
    v = check_number(key, value)
    if not (math.isfinite(v) and v == int(v) and v >= low):
        raise ValueError(f"invalid {key}: {value!r} (must be a whole number >= {low})")


def check_in_range(key: str, value: Any, low: float, high: float) -> None:
    """ValueError unless ``value`` is a number with ``low <= value < high`` (NaN fails too)."""
    v = check_number(key, value)
    if not (low <= v < high):
        raise ValueError(f"invalid {key}: {value!r} (must be in [{low}, {high}))")


def scalar_like(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device. A Python number is filled on the
    device (``torch.as_tensor`` would copy it from the host and wait for the device every step)."""
    return value.to(like) if isinstance(value, Tensor) else like.new_full((), value)


def build_rule(name: str, config: Mapping[str, Any] | None = None) -> Rule:
    """Instantiate a registered rule by name with its ``config``."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; known rules: {sorted(RULES)}")
    return RULES[name](**dict(config or {}))
