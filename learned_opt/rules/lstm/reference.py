"""The LSTM's reference path: autograd through :meth:`LSTMCore.cell`, op by op.

Twice differentiable, in θ and through the gradients: second-order meta-training takes it, and it
is the readable definition the fused paths are tested against. Chunks are row-major
``(n, L, H)`` gathers; the new state is returned contiguous.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState
from learned_opt.rules.chunks import cast_parameters, concat, gather
from learned_opt.rules.lstm.core import LSTMCore
from learned_opt.rules.lstm.layout import at_rest, collect, new_group, references, split_chunk


def update_reference(
    rule: LSTMCore,
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    state: RuleState,
    hparams: Mapping[str, Tensor | float],
) -> tuple[list[Tensor], RuleState]:
    """The differentiable step (twice differentiable in θ and through the gradients)."""
    group_state, per_param = state
    lr = hparams.get("lr", 1.0)
    L, H = rule.num_layers, rule.hidden_size
    casts: dict[Any, dict[str, Tensor]] = {}
    step = rule.reference_step(group_state, casts)
    reference = references(step, group_state)
    flat_g = [g.reshape(-1) for g in grads]
    flat_h = [s["h"].reshape(-1, L, H) for s in per_param]
    flat_c = [s["c"].reshape(-1, L, H) for s in per_param]
    pieces: list[list[tuple[Tensor, ...]]] = [[] for _ in grads]
    for segments in rule.chunk_plan(grads, per_param):
        h, c, g = (gather(flat, segments) for flat in (flat_h, flat_c, flat_g))
        g = g.to(h.dtype)
        out, h_new, c_new = rule.cell(rule.features(g), h, c, cast_parameters(rule, h, casts))
        # Pinned by torch.where, so the pinned values stay differentiable (the reference's own).
        ref = reference(h)
        rest = at_rest(g, [h.reshape(len(g), -1).t()], c.reshape(len(g), -1).t(), ref.h, ref.c, dense=True)
        out = torch.where(rest, ref.out, out)
        h_new = torch.where(rest[:, None, None], ref.new_h.reshape(1, L, H), h_new)
        c_new = torch.where(rest[:, None, None], ref.new_c.reshape(1, L, H), c_new)
        for i, piece in split_chunk(segments, [(out, 0), (h_new, 0), (c_new, 0)]):
            pieces[i].append(piece)

    results = []
    for i, st in enumerate(per_param):
        if not pieces[i]:  # zero-element parameter
            results.append(None)
            continue
        out, h, c = (concat([piece[k] for piece in pieces[i]]) for k in range(3))
        results.append(((out - reference(out).out) * lr, h.reshape(st["h"].shape), c.reshape(st["c"].shape)))
    updates, new_per_param = collect(params, per_param, results)
    return updates, (new_group(group_state, step[1], step[2]), new_per_param)
