"""Fused kernels of the coordinate-wise LSTM over feature-major chunks.

A chunk of ``n`` coordinates is held as rows: the input features ``x`` (I, n), the state ``h``
and ``c`` (L·H, n), layer ``l`` in rows ``l·H : (l + 1)·H``. Layer ``l`` multiplies its fused
weight ``[b, W_ih, W_hh]`` (4H, 1 + I_l + H), gates reordered to i, f, o, g, by the stacked input
``z = [1; input; h_l]`` (1 + I_l + H, n): one matmul per layer and chunk, and element-wise work
over contiguous rows.

:func:`layer_forward` is the one home of the cell's math in this layout: the optimizer's no-grad
step (:mod:`~learned_opt.rules.lstm.fast`) and the first-order meta-training step
(:class:`ChunkStep`, a hand-written backward instead of autograd's op-by-op graph) both call it.
The row-major ``LSTMCore.cell`` is the readable reference that tests hold both against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from learned_opt.rules.lstm.layout import pin_

def fuse_weights(weights: Mapping[str, Tensor], num_layers: int, hidden_size: int) -> list[Tensor]:
    """Per layer the fused ``[b_ih + b_hh, W_ih, W_hh]`` with gates reordered from torch's i, f, g, o
    to i, f, o, g. Differentiable: θ's gradient flows back through it."""
    H = hidden_size
    device = weights["lstm.weight_ih_l0"].device
    order = torch.cat([torch.arange(0, 2 * H), torch.arange(3 * H, 4 * H), torch.arange(2 * H, 3 * H)]).to(device)
    return [
        torch.cat(
            [
                (weights[f"lstm.bias_ih_l{l}"] + weights[f"lstm.bias_hh_l{l}"]).unsqueeze(1),
                weights[f"lstm.weight_ih_l{l}"],
                weights[f"lstm.weight_hh_l{l}"],
            ],
            dim=1,
        )[order]
        for l in range(num_layers)
    ]


def layer_forward(weight: Tensor, z: Tensor, c_prev: Tensor, gates: Tensor, tanh_c: Tensor, c_new: Tensor,
                  h_new: Tensor) -> None:
    """One LSTM layer on a chunk, written into the given buffers.

    ``z`` (1 + I + H, n) is ``[1; input; h]``; ``c_prev`` (H, n). Leaves the activated gates
    (i, f, o, g) in ``gates`` (4H, n), ``tanh(c_new)`` in ``tanh_c``, and writes ``c_new``, ``h_new``.
    """
    H = c_prev.shape[0]
    torch.mm(weight, z, out=gates)
    gates[: 3 * H].sigmoid_()
    gates[3 * H :].tanh_()
    i, f, o, g = gates[:H], gates[H : 2 * H], gates[2 * H : 3 * H], gates[3 * H :]
    torch.mul(f, c_prev, out=c_new)
    c_new.addcmul_(i, g)
    torch.tanh(c_new, out=tanh_c)
    torch.mul(o, tanh_c, out=h_new)


class ChunkStep(torch.autograd.Function):
    """One LSTM step of a chunk, differentiable in θ, the state, ``lr`` and ``ref_out``.

    ``forward(spec, x, h, c, lr, ref_out, new_ref_h, new_ref_c, rest, head_w, head_b, *weights)``
    with ``spec = (L, H, scale)`` and fused ``weights`` (:func:`fuse_weights`) returns the update
    ``(head(h'_L) · scale - ref_out) · lr`` (n,) and the new ``h``, ``c`` (L·H, n). Columns
    ``rest`` (indices of the coordinates at rest: zero gradient and exactly the reference state) are
    pinned to a zero update and the reference's new state ``new_ref_h``/``new_ref_c`` (L·H, 1), bit for bit.
    Their state's gradient flows through their own cell, which computes the reference's function
    at the reference's point (the same derivative up to rounding), so the pinned values are
    taken as constants here.

    The backward is written out (one matmul pair per layer, 15 element-wise ops over contiguous
    rows), which is what makes first-order meta-training fast. It is not itself differentiable:
    second-order meta-training takes the reference path.
    """

    @staticmethod
    def forward(ctx: Any, spec: tuple[int, int, float], x: Tensor, h: Tensor, c: Tensor, lr: Tensor,
                ref_out: Tensor, new_ref_h: Tensor, new_ref_c: Tensor, rest: Tensor, head_w: Tensor,
                head_b: Tensor, *weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        L, H, scale = spec
        n = x.shape[1]
        opts = {"dtype": h.dtype, "device": h.device}
        h_new, c_new = torch.empty_like(h), torch.empty_like(c)
        saved = []
        inp = x
        for layer in range(L):
            rows = slice(layer * H, (layer + 1) * H)
            z = torch.empty(1 + inp.shape[0] + H, n, **opts)
            z[0] = 1.0
            z[1 : 1 + inp.shape[0]].copy_(inp)
            z[1 + inp.shape[0] :].copy_(h[rows])
            gates = torch.empty(4 * H, n, **opts)
            tanh_c = torch.empty(H, n, **opts)
            layer_forward(weights[layer], z, c[rows], gates, tanh_c, c_new[rows], h_new[rows])
            saved += [z, gates, tanh_c]
            inp = h_new[rows]
        raw = torch.mv(inp.t(), head_w.reshape(-1)).add_(head_b.reshape(()))
        u = (raw * scale - ref_out) * lr
        pin_(rest, u, h_new, c_new, new_ref_h, new_ref_c)
        ctx.spec = spec
        ctx.save_for_backward(c, h_new, raw, lr, ref_out, rest, head_w, *weights, *saved)
        return u, h_new, c_new

    @staticmethod
    def backward(ctx: Any, du: Tensor, dh_new: Tensor, dc_new: Tensor) -> tuple[Tensor | None, ...]:
        L, H, scale = ctx.spec
        c, h_new, raw, lr, ref_out, rest, head_w, *more = ctx.saved_tensors
        weights, saved = more[:L], more[L:]
        needs = ctx.needs_input_grad
        if rest.numel():  # a pinned update is the constant 0
            du = du.index_fill(0, rest, 0.0)
        d_raw = du * (lr * scale)
        d_lr = (du * (raw * scale - ref_out)).sum().reshape(lr.shape) if needs[4] else None
        d_ref = (-(du * lr).sum()).reshape(ref_out.shape) if needs[5] else None
        d_head_w = torch.mv(h_new[(L - 1) * H :], d_raw).reshape(head_w.shape) if needs[9] else None
        d_head_b = d_raw.sum().reshape(1) if needs[10] else None
        dh_in, dc_in = torch.empty_like(dh_new), torch.empty_like(dc_new)
        d_weights: list[Tensor | None] = [None] * L
        carry = torch.outer(head_w.reshape(-1), d_raw)  # gradient reaching the top layer's h'
        for layer in reversed(range(L)):
            rows = slice(layer * H, (layer + 1) * H)
            z, gates, tanh_c = saved[3 * layer : 3 * layer + 3]
            i, f, o, g = gates[:H], gates[H : 2 * H], gates[2 * H : 3 * H], gates[3 * H :]
            d_gates = torch.empty_like(gates)
            di, df, do, dg = d_gates[:H], d_gates[H : 2 * H], d_gates[2 * H : 3 * H], d_gates[3 * H :]
            dh = carry.add_(dh_new[rows])
            b = dh.mul_(o)  # dh · o (dh is not needed on its own after this)
            b2 = torch.mul(b, tanh_c)
            dc = b.add_(dc_new[rows]).addcmul_(b2, tanh_c, value=-1.0)  # dc' + dh · o · (1 - tanh²c')
            torch.addcmul(b2, b2, o, value=-1.0, out=do)  # dh · tanh c' · o(1 - o)
            t = torch.mul(dc, i)
            tg = torch.mul(t, g)
            torch.addcmul(tg, tg, i, value=-1.0, out=di)  # dc · g · i(1 - i)
            torch.addcmul(t, tg, g, value=-1.0, out=dg)  # dc · i · (1 - g²)
            sf = torch.mul(dc, c[rows], out=t).mul_(f)
            torch.addcmul(sf, sf, f, value=-1.0, out=df)  # dc · c · f(1 - f)
            torch.mul(dc, f, out=dc_in[rows])
            if needs[11 + layer]:
                d_weights[layer] = torch.mm(d_gates, z.t())
            dz = torch.mm(weights[layer].t(), d_gates)
            inputs = z.shape[0] - 1 - H
            dh_in[rows].copy_(dz[1 + inputs :])
            carry = dz[1 : 1 + inputs]
        dx = carry if needs[1] else None
        return (None, dx, dh_in if needs[2] else None, dc_in if needs[3] else None, d_lr, d_ref, None, None, None,
                d_head_w, d_head_b, *d_weights)


def chunk_step(spec: tuple[int, int, float], x: Tensor, h: Tensor, c: Tensor, lr: Tensor, ref_out: Tensor,
               new_ref_h: Tensor, new_ref_c: Tensor, rest: Tensor, head_w: Tensor, head_b: Tensor,
               weights: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`ChunkStep` applied (see there)."""
    return ChunkStep.apply(spec, x, h, c, lr, ref_out, new_ref_h, new_ref_c, rest, head_w, head_b, *weights)
