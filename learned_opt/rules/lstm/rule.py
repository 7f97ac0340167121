"""The LSTM rule: :class:`LSTMCore`'s math with its update, each step sent down one execution path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState
from learned_opt.rules.lstm import fast, first_order, reference
from learned_opt.rules.lstm.core import LSTMCore


class LSTMRule(LSTMCore):
    """Coordinate-wise LSTM: ``update = lr * (head(h_t) - head(h_t^ref)) * output_scale``.

    Constructor arguments: see :class:`~learned_opt.rules.lstm.core.LSTMCore`. ``hparams`` is
    ``{"lr": ...}``; ``lr`` multiplies the learned update (0 freezes).
    """

    name: ClassVar[str] = "lstm"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0}

    update_reference = reference.update_reference
    update_first_order = first_order.update_first_order
    update_fast = fast.update_fast

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        """One step. While autograd records (grad mode on and θ, a gradient, the state or ``lr``
        requires grad) this runs a differentiable path: :meth:`update_first_order` when the
        gradients are constants and the config's ``fused_training`` is on (first-order
        meta-training), else :meth:`update_reference`; otherwise the fused no-grad
        :meth:`update_fast`. One math (tests check they agree)."""
        return self._dispatch(grads, params, state, hparams, donate_state=False)

    def update_inplace(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        """:meth:`update`, writing the new per-parameter state over the old one when no graph is recorded."""
        return self._dispatch(grads, params, state, hparams, donate_state=True)

    def _dispatch(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
        *,
        donate_state: bool,
    ) -> tuple[list[Tensor], RuleState]:
        if not self._records_graph(grads, state, hparams):
            return self.update_fast(grads, params, state, hparams, donate_state=donate_state)
        if not self.fused_training or any(g.requires_grad for g in grads):  # (second order: through the gradients too)
            return self.update_reference(grads, params, state, hparams)
        return self.update_first_order(grads, params, state, hparams)

    def _records_graph(self, grads: Sequence[Tensor], state: RuleState, hparams: Mapping[str, Any]) -> bool:
        """Whether autograd would record this step (then a differentiable path must run)."""
        if not torch.is_grad_enabled():
            return False
        group_state, per_param = state
        lr = hparams.get("lr", 1.0)
        tensors = chain(
            self.parameters(),
            grads,
            group_state.values(),
            (v for s in per_param for v in s.values()),
            [lr] if isinstance(lr, Tensor) else [],
        )
        return any(t.requires_grad for t in tensors)
