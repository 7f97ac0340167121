"""The LSTM's no-grad fast path: the optimizer's step and evaluation, fused and in place.

The reference path's math, feature-major: the state is read as ``(L·H, numel)`` rows, so every
element-wise op runs over contiguous rows. Per chunk and layer one buffer holds ``[1; input; h_l]``
as rows, so the gates are one matmul with ``[b, W_ih, W_hh]`` (bias folded in; gates reordered to
i, f, o, g so that one sigmoid covers three; :mod:`~learned_opt.rules.lstm.kernels`). ``c'``, the
last layer's ``h'`` and the update are written straight into the outputs. Extra memory: a few
chunk-sized buffers. The at-rest test looks only at the chunk's zero-gradient coordinates (a GPU
takes the dense test instead: no device sync).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState
from learned_opt.rules.chunks import Segment, cast_parameters, gather
from learned_opt.rules.lstm.core import LSTMCore
from learned_opt.rules.lstm.kernels import fuse_weights, layer_forward
from learned_opt.rules.lstm.layout import (
    Reference,
    at_rest,
    collect,
    dense_at_rest,
    feature_rows,
    new_group,
    pin_,
    references,
    rows_to_state,
)


@torch.no_grad()
def update_fast(
    rule: LSTMCore,
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    state: RuleState,
    hparams: Mapping[str, Tensor | float],
    *,
    donate_state: bool = False,
) -> tuple[list[Tensor], RuleState]:
    """The step without autograd: the reference path's math, fused and in place.

    ``donate_state=True`` lets the new state reuse the input state's storage (the caller gives the
    old state up, as torch optimizers update their state in place); by default no input is touched.
    """
    group_state, per_param = state
    L, H = rule.num_layers, rule.hidden_size
    casts: dict[Any, dict[str, Tensor]] = {}
    step = rule.reference_step(group_state, casts)
    reference = references(step, group_state)

    def rows_out(rows: Tensor, original: Tensor) -> Tensor:
        private = rows.data_ptr() != original.data_ptr()  # feature_rows had to copy
        return rows if private or donate_state else torch.empty_like(rows)

    io = SimpleNamespace(g=[g.reshape(-1) for g in grads])
    io.h_in, io.c_in = [feature_rows(s["h"]) for s in per_param], [feature_rows(s["c"]) for s in per_param]
    io.h_out = [rows_out(r, s["h"]) for r, s in zip(io.h_in, per_param)]
    io.c_out = [rows_out(r, s["c"]) for r, s in zip(io.c_in, per_param)]
    updates = [torch.empty(p.shape, dtype=r.dtype, device=r.device) for p, r in zip(params, io.h_in)]
    io.u = [u.view(-1) for u in updates]
    rows = min(rule.chunk_size, sum(g.numel() for g in grads))
    kinds: dict[tuple[torch.dtype, torch.device], _Kind] = {}
    for segments in rule.chunk_plan(grads, per_param):
        like = io.h_in[segments[0][0]]
        key = (like.dtype, like.device)
        if key not in kinds:
            kinds[key] = _Kind(rule, like, rows, reference(like), cast_parameters(rule, like, casts))
        _chunk(rule, kinds[key], io, segments, hparams.get("lr", 1.0))

    results = [None if p.numel() == 0 else (u, rows_to_state(h, L, H, p.shape), rows_to_state(c, L, H, p.shape))
               for p, u, h, c in zip(params, updates, io.h_out, io.c_out)]
    new_updates, new_per_param = collect(params, per_param, results)
    return new_updates, (new_group(group_state, step[1], step[2]), new_per_param)


def _chunk(rule: LSTMCore, k: _Kind, io: SimpleNamespace, segments: Sequence[Segment], lr: Tensor | float) -> None:
    """One chunk's step: read its gradients and state into ``k``'s buffers (or views of the state
    when the chunk is one slice of one tensor), run the layers and the head, pin the coordinates at
    rest and write the new state and update into ``io``'s outputs."""
    L, H = rule.num_layers, rule.hidden_size
    v = k.views(sum(b - a for _, a, b in segments))
    g = gather(io.g, segments)
    pos = 0
    for i, a, b in segments:
        for layer in range(L):
            v.h[layer][:, pos : pos + b - a].copy_(io.h_in[i][layer * H : (layer + 1) * H, a:b])
        pos += b - a
    if len(segments) == 1:  # the common case: read and write the cell state directly
        i, a, b = segments[0]
        c, h_new, c_new, u = io.c_in[i][:, a:b], io.h_out[i][:, a:b], io.c_out[i][:, a:b], io.u[i][a:b]
    else:
        c, h_new, c_new, u = v.c_in, v.h_out, v.c_out, v.u
        pos = 0
        for i, a, b in segments:
            c[:, pos : pos + b - a].copy_(io.c_in[i][:, a:b])
            pos += b - a
    g = g.to(c.dtype)
    rule.write_features(g, v.x)
    rest = at_rest(g, v.h, c, k.ref.h, k.ref.c, dense=k.dense)
    for layer in range(L):
        rows_l = slice(layer * H, (layer + 1) * H)
        layer_forward(k.weight[layer], v.z[layer], c[rows_l], v.gates, v.tmp, c_new[rows_l], h_new[rows_l])
        if layer + 1 < L:
            v.inputs[layer + 1].copy_(h_new[rows_l])
    torch.addmv(k.head_bias, h_new[(L - 1) * H :].t(), k.head_weight, out=u)
    u.mul_(rule.output_scale).sub_(k.ref.out).mul_(lr)
    pin_(rest, u, h_new, c_new, k.ref.new_h, k.ref.new_c)
    if len(segments) > 1:
        pos = 0
        for i, a, b in segments:
            m = b - a
            io.h_out[i][:, a:b].copy_(h_new[:, pos : pos + m])
            io.c_out[i][:, a:b].copy_(c_new[:, pos : pos + m])
            io.u[i][a:b].copy_(u[pos : pos + m])
            pos += m


class _Kind:
    """One dtype/device's fused weights, reference and chunk buffers.

    Buffers have ``rows`` columns (the chunk size); a chunk of ``n`` coordinates uses their first
    ``n`` columns, so row ``0`` of each layer's input buffer stays all ones (the folded bias).
    """

    def __init__(self, rule: LSTMCore, like: Tensor, rows: int, ref: Reference, weights: Mapping[str, Tensor]) -> None:
        L, H, I = rule.num_layers, rule.hidden_size, rule.input_size
        self.hidden_size, self.input_size = H, I
        opts = {"dtype": like.dtype, "device": like.device}
        self.weight = fuse_weights(weights, L, H)
        self.head_weight, self.head_bias = weights["head.weight"][0], weights["head.bias"]
        self.ref = ref
        self.dense = dense_at_rest(like.device)
        self.z = [torch.empty(1 + (I if l == 0 else H) + H, rows, **opts) for l in range(L)]
        for z in self.z:
            z[0] = 1.0
        self.gates = torch.empty(4 * H, rows, **opts)
        self.tmp = torch.empty(H, rows, **opts)
        self.c_in = torch.empty(L * H, rows, **opts)
        self.h_out = torch.empty(L * H, rows, **opts)
        self.c_out = torch.empty(L * H, rows, **opts)
        self.u = torch.empty(rows, **opts)
        self._views: dict[int, SimpleNamespace] = {}

    def views(self, n: int) -> SimpleNamespace:
        """The buffers' first ``n`` columns, named (cached: most chunks share one ``n``)."""
        if n not in self._views:
            H, I = self.hidden_size, self.input_size
            z = [b[:, :n] for b in self.z]
            self._views[n] = SimpleNamespace(
                z=z,
                x=z[0][1 : 1 + I],
                inputs=[None] + [b[1 : 1 + H] for b in z[1:]],
                h=[b[-H:] for b in z],
                gates=self.gates[:, :n],
                tmp=self.tmp[:, :n],
                c_in=self.c_in[:, :n],
                h_out=self.h_out[:, :n],
                c_out=self.c_out[:, :n],
                u=self.u[:n],
            )
        return self._views[n]
