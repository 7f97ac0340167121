"""The LSTM's first-order fused path: differentiable in θ, ``lr`` and the state, the gradients
taken as constants (first-order meta-training).

The reference path's math on feature-major chunks through the fused
:class:`~learned_opt.rules.lstm.kernels.ChunkStep` (its backward written out): several times
faster than autograd op by op. Coordinates at rest are pinned on their indices, as in the fast path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState
from learned_opt.rules.chunks import cast_parameters, concat, gather
from learned_opt.rules.lstm.core import LSTMCore
from learned_opt.rules.lstm.kernels import chunk_step, fuse_weights
from learned_opt.rules.lstm.layout import (
    at_rest,
    collect,
    feature_rows,
    gather_columns,
    new_group,
    references,
    rows_to_state,
    split_chunk,
)


def update_first_order(
    rule: LSTMCore,
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    state: RuleState,
    hparams: Mapping[str, Tensor | float],
) -> tuple[list[Tensor], RuleState]:
    """The step differentiable in θ, ``lr`` and the state, the gradients taken as constants."""
    group_state, per_param = state
    L, H = rule.num_layers, rule.hidden_size
    casts: dict[Any, dict[str, Tensor]] = {}
    step = rule.reference_step(group_state, casts)
    reference = references(step, group_state)
    kinds: dict[Any, tuple[Tensor, Tensor, Tensor, list[Tensor]]] = {}  # per dtype/device: lr, head, fused weights

    def kind(like: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        key = (like.dtype, like.device)
        if key not in kinds:
            w = cast_parameters(rule, like, casts)
            lr = torch.as_tensor(hparams.get("lr", 1.0), dtype=like.dtype, device=like.device)
            kinds[key] = (lr, w["head.weight"], w["head.bias"], fuse_weights(w, L, H))
        return kinds[key]

    flat_g = [g.detach().reshape(-1) for g in grads]
    h_in = [feature_rows(s["h"]) for s in per_param]
    c_in = [feature_rows(s["c"]) for s in per_param]
    pieces: list[list[tuple[Tensor, ...]]] = [[] for _ in grads]
    for segments in rule.chunk_plan(grads, per_param, large_apart=True):
        like = h_in[segments[0][0]]
        ref, (lr, head_w, head_b, fused) = reference(like), kind(like)
        h, c = gather_columns(h_in, segments), gather_columns(c_in, segments)
        g = gather(flat_g, segments).to(h.dtype)
        rest = at_rest(g, [h.detach()], c.detach(), ref.h, ref.c, dense=False)
        u, h_new, c_new = chunk_step((L, H, rule.output_scale), rule.features(g).t(), h, c, lr, ref.out,
                                     ref.new_h, ref.new_c, rest, head_w, head_b, fused)
        for i, piece in split_chunk(segments, [(u, 0), (h_new, 1), (c_new, 1)]):
            pieces[i].append(piece)

    results = []
    for i, p in enumerate(params):
        if not pieces[i]:  # zero-element parameter
            results.append(None)
            continue
        h, c = (rows_to_state(concat([piece[k] for piece in pieces[i]], dim=1), L, H, p.shape) for k in (1, 2))
        results.append((concat([piece[0] for piece in pieces[i]]), h, c))
    updates, new_per_param = collect(params, per_param, results)
    return updates, (new_group(group_state, step[1], step[2]), new_per_param)
