"""The coordinate-wise LSTM update rule of Andrychowicz et al. (2016).

One small LSTM, its weights shared by every coordinate, reads each coordinate's preprocessed
gradient and emits that coordinate's step. All coordinates of a param group are processed in
batched tensor ops: small tensors are packed together and large ones split, so each LSTM call sees
at most ``chunk_size`` coordinates and the extra memory beyond the new state stays bounded.

Zero gradient, zero step. The LSTM's raw output at a zero gradient is not zero (its biases and
the preprocessed input ``(-1, 0)`` see to that), so the rule subtracts a *reference*: the output
of the same LSTM on the same number of all-zero gradients from a fresh state. The reference is
one coordinate's trajectory, kept in the group state (``ref_h``, ``ref_c``). A coordinate at rest
(zero gradient and exactly the reference state) is pinned to the reference's new state and output,
so a coordinate whose gradients have all been zero since its state was fresh moves exactly nothing,
by construction and for any θ (batched matmuls alone would leave float noise of ~1e-9, as they are
not bitwise batch-size invariant); once it has seen a gradient it may keep moving (as momentum
does). Small gradients give small steps: the input is then close to the reference's.

State: per parameter ``h`` and ``c`` shaped ``param.shape + (num_layers, hidden_size)`` (for the
default 2 x 20 that is 80 numbers, 320 bytes per float32 parameter); per group ``ref_h``/``ref_c``
of shape ``(num_layers, hidden_size)``. The per-parameter state is stored feature-major (memory
laid out as ``(num_layers, hidden_size, *param.shape)``, presented permuted), so the fast path's
element-wise work runs over contiguous rows.

Two code paths, one math: :meth:`LSTMRule.update_reference` (autograd, meta-training) and
:meth:`LSTMRule.update_fast` (no graph: the optimizer, evaluation), which fuses the gate matmuls,
writes into preallocated buffers and tests rest cheaply; ``update`` picks one. Timings and the
gate-matmul efficiency are in ``docs/speed.md`` (``scripts/bench_speed.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import chain
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learned_opt.rules.base import Rule, RuleState
from learned_opt.rules.chunks import Segment, cast_parameters, concat, gather, plan_chunks
from learned_opt.rules.lstm_kernels import chunk_step, fuse_weights, layer_forward

PREPROCESSINGS = ("log_sign", "none")
DEFAULT_CHUNK_SIZE = 2**14  # among the fastest on a 2-core AVX-512 CPU (docs/speed.md); any size gives the same steps


def preprocess_log_sign(g: Tensor, p: float = 10.0) -> Tensor:
    """The paper's gradient preprocessing, shape ``g.shape + (2,)``.

    ``(log|g| / p, sign g)`` where ``|g| >= e^-p``, else ``(-1, e^p g)``; both branches agree at
    ``|g| = e^-p``, so the map is continuous.
    """
    return torch.stack(_log_sign_parts(g, p), dim=-1)


def _log_sign_parts(g: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """The two features of :func:`preprocess_log_sign`, each shaped like ``g``."""
    threshold = math.exp(-p)
    big = g.abs() >= threshold
    log_part = torch.log(g.abs().clamp_min(threshold)) / p
    first = torch.where(big, log_part, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return first, second


class LSTMRule(Rule):
    """Coordinate-wise LSTM: ``update = lr * (head(h_t) - head(h_t^ref)) * output_scale``.

    Args:
        num_layers, hidden_size: the stacked LSTM (paper: 2 x 20).
        preprocess: ``"log_sign"`` (the paper's, p = ``p``) or ``"none"`` (the raw gradient).
        p: the preprocessing's log scale.
        output_scale: multiplies the head's output (paper: 0.1).
        chunk_size: the most coordinates one batched LSTM call processes.

    ``hparams`` is ``{"lr": ...}``; ``lr`` multiplies the learned update (0 freezes).
    The weights live in ``self.lstm`` (a ``torch.nn.LSTM`` used as the weight container, so its
    parameter names are torch's) and ``self.head``; the math is written out in :meth:`cell` with
    ``F.linear`` so it stays twice differentiable on every backend. θ is cast to each parameter's
    dtype and device inside ``update``, so the rule module itself may stay on the CPU.
    """

    name: ClassVar[str] = "lstm"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0}

    def __init__(
        self,
        num_layers: int = 2,
        hidden_size: int = 20,
        preprocess: str = "log_sign",
        p: float = 10.0,
        output_scale: float = 0.1,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        if preprocess not in PREPROCESSINGS:
            raise ValueError(f"invalid preprocess: {preprocess!r} (choose from {PREPROCESSINGS})")
        for key, value in (("num_layers", num_layers), ("hidden_size", hidden_size), ("chunk_size", chunk_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {key}: {value!r} (must be an int >= 1)")
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"invalid p: {p!r} (must be > 0)")
        if not math.isfinite(output_scale):
            raise ValueError(f"invalid output_scale: {output_scale!r}")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.preprocess = preprocess
        self.p = float(p)
        self.output_scale = float(output_scale)
        self.chunk_size = chunk_size
        self.lstm = nn.LSTM(self.input_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, 1)
        # Not part of the config: False sends first-order meta-training through autograd's
        # op-by-op reference path (the plain baseline the meta-training speed benchmark measures).
        self.fused_training = True

    @property
    def input_size(self) -> int:
        return 2 if self.preprocess == "log_sign" else 1

    def config(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "preprocess": self.preprocess,
            "p": self.p,
            "output_scale": self.output_scale,
            "chunk_size": self.chunk_size,
        }

    def features(self, g: Tensor) -> Tensor:
        """Preprocessed inputs, shape ``g.shape + (input_size,)``."""
        if self.preprocess == "log_sign":
            return preprocess_log_sign(g, self.p)
        return g.unsqueeze(-1)

    def _write_features(self, g: Tensor, out: Tensor) -> None:
        """:meth:`features` of a flat ``g`` (n,), written transposed into ``out`` (input_size, n)."""
        if self.preprocess == "log_sign":
            for row, part in zip(out, _log_sign_parts(g, self.p)):
                row.copy_(part)
        else:
            out[0].copy_(g)

    def cell(self, x: Tensor, h: Tensor, c: Tensor, weights: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """One LSTM step for a batch of coordinates.

        ``x``: (n, input_size); ``h``, ``c``: (n, num_layers, hidden_size). Returns the scaled head
        output (n,) and the new ``h``, ``c``. ``weights`` is ``self``'s parameters cast to x's dtype.
        """
        inp = x
        hs, cs = [], []
        for layer in range(self.num_layers):
            gates = F.linear(inp, weights[f"lstm.weight_ih_l{layer}"], weights[f"lstm.bias_ih_l{layer}"])
            gates = gates + F.linear(h[:, layer], weights[f"lstm.weight_hh_l{layer}"], weights[f"lstm.bias_hh_l{layer}"])
            i, f, g, o = gates.chunk(4, dim=-1)
            c_new = torch.sigmoid(f) * c[:, layer] + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            hs.append(h_new)
            cs.append(c_new)
            inp = h_new
        out = F.linear(inp, weights["head.weight"], weights["head.bias"]).squeeze(-1) * self.output_scale
        return out, torch.stack(hs, dim=1), torch.stack(cs, dim=1)

    def _zero_state(self, shape: torch.Size | tuple[int, ...], like: Tensor) -> Tensor:
        """Zeros shaped ``shape + (L, H)``, laid out feature-major (see :func:`_feature_rows`)."""
        zeros = torch.zeros(
            (self.num_layers, self.hidden_size, *shape), dtype=_state_dtype(like), device=like.device
        )
        return _from_feature_rows(zeros, len(shape))

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        per_param = [{"h": self._zero_state(p.shape, p), "c": self._zero_state(p.shape, p)} for p in params]
        like = params[0] if params else torch.zeros(())
        group = {"ref_h": self._zero_state((), like), "ref_c": self._zero_state((), like)}
        return group, per_param

    def join_state(self, group_state: dict[str, Tensor], per_param: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """A late-joining parameter starts on the group's zero-gradient reference trajectory, so an
        all-zero gradient still moves it exactly nothing (a zero state would not be "at rest")."""
        ref_h, ref_c = group_state["ref_h"], group_state["ref_c"]
        return [{"h": ref_h.to(s["h"]).expand_as(s["h"]).clone(), "c": ref_c.to(s["c"]).expand_as(s["c"]).clone()}
                for s in per_param]

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        """One step. While autograd records (grad mode on and θ, a gradient, the state or ``lr``
        requires grad) this runs a differentiable path: :meth:`update_first_order` when the
        gradients are constants (first-order meta-training), else :meth:`update_reference`;
        otherwise the fused no-grad :meth:`update_fast`. One math (tests check they agree)."""
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
        if not _records_graph(self, grads, state, hparams):
            return self.update_fast(grads, params, state, hparams, donate_state=donate_state)
        if not self.fused_training or any(g.requires_grad for g in grads):  # (second order: through the gradients too)
            return self.update_reference(grads, params, state, hparams)
        return self.update_first_order(grads, params, state, hparams)

    def _weights_for(self, cache: dict[Any, dict[str, Tensor]], like: Tensor) -> dict[str, Tensor]:
        """θ on ``like``'s dtype and device (the rule may live on the CPU, params on a GPU)."""
        return cast_parameters(self, like, cache)

    def _reference_step(
        self, group_state: Mapping[str, Tensor], cache: dict[Any, dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The reference coordinate's step on a zero gradient: its output (1,) and new h, c (1, L, H)."""
        ref_h, ref_c = group_state["ref_h"], group_state["ref_c"]
        zero = torch.zeros(1, dtype=ref_h.dtype, device=ref_h.device)
        return self.cell(self.features(zero), ref_h.unsqueeze(0), ref_c.unsqueeze(0), self._weights_for(cache, ref_h))

    def _plan_chunks(self, grads: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]], *,
                     large_apart: bool = False) -> list[list[Segment]]:
        """Chunks of ``(param index, start, stop)`` segments, <= chunk_size coordinates and one
        state dtype/device each: small tensors packed together, large ones split.

        ``large_apart``: tensors of at least half a chunk are never packed with others (their
        chunks are views, not copies); the small ones are packed together after them.
        """
        kinds = [(st["h"].dtype, st["h"].device) for st in per_param]
        sizes = [g.numel() for g in grads]
        order = list(range(len(sizes)))
        if large_apart:
            order.sort(key=lambda i: sizes[i] < self.chunk_size // 2)
            kinds = [(*k, i if n >= self.chunk_size // 2 else -1) for i, (k, n) in enumerate(zip(kinds, sizes))]
        chunks = plan_chunks([sizes[i] for i in order], [kinds[i] for i in order], self.chunk_size)
        return [[(order[j], a, b) for j, a, b in chunk] for chunk in chunks]

    def update_reference(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        """The differentiable step (twice differentiable in θ and through the gradients)."""
        group_state, per_param = state
        lr = hparams.get("lr", 1.0)
        casts: dict[Any, dict[str, Tensor]] = {}
        ref_h, ref_c = group_state["ref_h"], group_state["ref_c"]
        ref_out, new_ref_h, new_ref_c = self._reference_step(group_state, casts)

        flat_g = [g.reshape(-1) for g in grads]
        flat_h = [s["h"].reshape(-1, self.num_layers, self.hidden_size) for s in per_param]
        flat_c = [s["c"].reshape(-1, self.num_layers, self.hidden_size) for s in per_param]
        pieces: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in grads]
        for segments in self._plan_chunks(grads, per_param):
            h, c, g = (gather(flat, segments) for flat in (flat_h, flat_c, flat_g))
            g = g.to(h.dtype)
            out, h_new, c_new = self.cell(self.features(g), h, c, self._weights_for(casts, h))
            # Pin coordinates still at rest (zero gradient, reference state) to the reference
            # exactly: batched matmuls are not bitwise batch-size invariant.
            like = {"dtype": h.dtype, "device": h.device}
            at_rest = (
                (g == 0)
                & (h == ref_h.to(**like)).flatten(1).all(1)
                & (c == ref_c.to(**like)).flatten(1).all(1)
            )
            out = torch.where(at_rest, ref_out.to(**like), out)
            h_new = torch.where(at_rest[:, None, None], new_ref_h.to(**like), h_new)
            c_new = torch.where(at_rest[:, None, None], new_ref_c.to(**like), c_new)
            pos = 0
            for i, a, b in segments:
                n = b - a
                pieces[i].append((out[pos : pos + n], h_new[pos : pos + n], c_new[pos : pos + n]))
                pos += n

        updates, new_per_param = [], []
        for i, p in enumerate(params):
            if not pieces[i]:  # zero-element parameter
                updates.append(torch.zeros_like(p))
                new_per_param.append(dict(per_param[i]))
                continue
            out, h, c = (concat([piece[k] for piece in pieces[i]]) for k in range(3))
            h = h.reshape(per_param[i]["h"].shape)
            c = c.reshape(per_param[i]["c"].shape)
            step = (out - ref_out.to(dtype=out.dtype, device=out.device)).reshape(p.shape) * lr
            updates.append(step.to(p.dtype))
            new_per_param.append({"h": h, "c": c})
        return updates, (_new_group(group_state, new_ref_h, new_ref_c), new_per_param)

    def update_first_order(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        """The step differentiable in θ, ``lr`` and the state, the gradients taken as constants.

        :meth:`update_reference`'s math on feature-major chunks through the fused
        :class:`~learned_opt.rules.lstm_kernels.ChunkStep` (its backward written out): the path of
        first-order meta-training, several times faster than autograd op by op. Coordinates at
        rest are pinned to the reference on their indices, as in :meth:`update_fast`.
        """
        group_state, per_param = state
        L, H = self.num_layers, self.hidden_size
        casts: dict[Any, dict[str, Tensor]] = {}
        ref_out, new_ref_h, new_ref_c = self._reference_step(group_state, casts)
        kinds: dict[Any, SimpleNamespace] = {}  # per dtype/device: θ, fused weights, reference, lr

        def kind(like: Tensor) -> SimpleNamespace:
            key = (like.dtype, like.device)
            if key not in kinds:
                opts = {"dtype": like.dtype, "device": like.device}
                w = self._weights_for(casts, like)
                kinds[key] = SimpleNamespace(
                    head_w=w["head.weight"], head_b=w["head.bias"], fused=fuse_weights(w, L, H),
                    lr=torch.as_tensor(hparams.get("lr", 1.0), **opts), ref_out=ref_out.to(**opts).reshape(()),
                    ref_h=group_state["ref_h"].to(**opts).reshape(-1, 1),
                    ref_c=group_state["ref_c"].to(**opts).reshape(-1, 1),
                    new_ref_h=new_ref_h.detach().to(**opts).reshape(-1),
                    new_ref_c=new_ref_c.detach().to(**opts).reshape(-1),
                )
            return kinds[key]

        flat_g = [g.detach().reshape(-1) for g in grads]
        h_in = [_feature_rows(s["h"]) for s in per_param]
        c_in = [_feature_rows(s["c"]) for s in per_param]
        pieces: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in grads]
        for segments in self._plan_chunks(grads, per_param, large_apart=True):
            k = kind(h_in[segments[0][0]])
            h = _gather_columns(h_in, segments)
            c = _gather_columns(c_in, segments)
            g = gather(flat_g, segments).to(h.dtype)
            rest = _at_rest_columns(g, [h.detach()], c.detach(), k.ref_h, k.ref_c)
            u, h_new, c_new = chunk_step((L, H, self.output_scale), self.features(g).t(), h, c, k.lr, k.ref_out,
                                         k.new_ref_h, k.new_ref_c, rest, k.head_w, k.head_b, k.fused)
            sizes = [b - a for _, a, b in segments]
            for (i, _, _), *piece in zip(segments, u.split(sizes), h_new.split(sizes, 1), c_new.split(sizes, 1)):
                pieces[i].append(tuple(piece))

        updates, new_per_param = [], []
        for i, p in enumerate(params):
            if not pieces[i]:  # zero-element parameter
                updates.append(torch.zeros_like(p))
                new_per_param.append(dict(per_param[i]))
                continue
            u = concat([piece[0] for piece in pieces[i]])
            h, c = (_concat_columns([piece[k] for piece in pieces[i]]) for k in (1, 2))
            ndim = p.dim()
            updates.append(u.reshape(p.shape).to(p.dtype))
            new_per_param.append({"h": _from_feature_rows(h.reshape(L, H, *p.shape), ndim),
                                  "c": _from_feature_rows(c.reshape(L, H, *p.shape), ndim)})
        return updates, (_new_group(group_state, new_ref_h, new_ref_c), new_per_param)

    @torch.no_grad()
    def update_fast(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
        *,
        donate_state: bool = False,
    ) -> tuple[list[Tensor], RuleState]:
        """The step without autograd: :meth:`update_reference`'s math, fused and in place.

        Works feature-major: the state is stored as ``(L·H, numel)`` rows (see
        :func:`_feature_rows`), so every element-wise op runs over contiguous rows. Per chunk and
        layer one buffer holds ``[1; input; h_l]`` as rows, so the gates are one matmul with
        ``[b, W_ih, W_hh]`` (bias folded in; gates reordered to i, f, o, g so that one sigmoid
        covers three). ``c'``, the last layer's ``h'`` and the update are written straight into
        the outputs. Extra memory: a few chunk-sized buffers. The at-rest test looks only at the
        chunk's zero-gradient coordinates (a GPU takes the dense test instead: no device sync).

        ``donate_state=True`` lets the new state reuse the input state's storage (the caller
        gives the old state up, as torch optimizers update their state in place); by default no
        input is touched.
        """
        group_state, per_param = state
        lr = hparams.get("lr", 1.0)
        L, H = self.num_layers, self.hidden_size
        ref = self._reference_step(group_state, {})

        def rows_out(rows: Tensor, original: Tensor) -> Tensor:
            private = rows.data_ptr() != original.data_ptr()  # _feature_rows had to copy
            return rows if private or donate_state else torch.empty_like(rows)

        flat_g = [g.reshape(-1) for g in grads]
        h_in = [_feature_rows(s["h"]) for s in per_param]
        c_in = [_feature_rows(s["c"]) for s in per_param]
        h_out = [rows_out(r, s["h"]) for r, s in zip(h_in, per_param)]
        c_out = [rows_out(r, s["c"]) for r, s in zip(c_in, per_param)]
        updates = [torch.empty(p.shape, dtype=r.dtype, device=r.device) for p, r in zip(params, h_in)]
        flat_u = [u.view(-1) for u in updates]
        rows = min(self.chunk_size, sum(g.numel() for g in grads))
        kinds: dict[tuple[torch.dtype, torch.device], _FastKind] = {}

        for segments in self._plan_chunks(grads, per_param):
            like = h_in[segments[0][0]]
            key = (like.dtype, like.device)
            if key not in kinds:
                kinds[key] = _FastKind(self, like, rows, ref, group_state)
            k = kinds[key]
            n = sum(b - a for _, a, b in segments)
            v = k.views(n)
            if len(segments) == 1:  # the common case: read and write the state directly
                i, a, b = segments[0]
                g, c, h_new, c_new, u = flat_g[i][a:b], c_in[i][:, a:b], h_out[i][:, a:b], c_out[i][:, a:b], flat_u[i][a:b]
                for layer in range(L):
                    v.h[layer].copy_(h_in[i][layer * H : (layer + 1) * H, a:b])
            else:
                g = torch.cat([flat_g[i][a:b] for i, a, b in segments])
                c, h_new, c_new, u = v.c_in, v.h_out, v.c_out, v.u
                pos = 0
                for i, a, b in segments:
                    for layer in range(L):
                        v.h[layer][:, pos : pos + b - a].copy_(h_in[i][layer * H : (layer + 1) * H, a:b])
                    c[:, pos : pos + b - a].copy_(c_in[i][:, a:b])
                    pos += b - a
            g = g.to(like.dtype)
            self._write_features(g, v.x)
            rest = k.at_rest(g, v.h, c)
            for layer in range(L):
                rows_l = slice(layer * H, (layer + 1) * H)
                layer_forward(k.weight[layer], v.z[layer], c[rows_l], v.gates, v.tmp, c_new[rows_l], h_new[rows_l])
                if layer + 1 < L:
                    v.inputs[layer + 1].copy_(h_new[rows_l])
            torch.addmv(k.head_bias, h_new[(L - 1) * H :].t(), k.head_weight, out=u)
            u.mul_(self.output_scale).sub_(k.ref_out).mul_(lr)
            k.pin(rest, u, h_new, c_new)
            if len(segments) > 1:
                pos = 0
                for i, a, b in segments:
                    m = b - a
                    h_out[i][:, a:b].copy_(h_new[:, pos : pos + m])
                    c_out[i][:, a:b].copy_(c_new[:, pos : pos + m])
                    flat_u[i][a:b].copy_(u[pos : pos + m])
                    pos += m

        new_per_param = []
        for i, p in enumerate(params):
            if p.numel() == 0:
                updates[i] = torch.zeros_like(p)
                new_per_param.append(dict(per_param[i]))
                continue
            updates[i] = updates[i].to(p.dtype)
            ndim = per_param[i]["h"].dim() - 2
            new_per_param.append(
                {
                    "h": _from_feature_rows(h_out[i].view(L, H, *p.shape), ndim),
                    "c": _from_feature_rows(c_out[i].view(L, H, *p.shape), ndim),
                }
            )
        _, new_ref_h, new_ref_c = ref
        return updates, (_new_group(group_state, new_ref_h, new_ref_c), new_per_param)




class _FastKind:
    """:meth:`LSTMRule.update_fast`'s per-step constants and chunk buffers for one dtype/device.

    Buffers have ``rows`` columns (the chunk size); a chunk of ``n`` coordinates uses their first
    ``n`` columns, so row ``0`` of each layer's input buffer stays all ones (the folded bias).
    """

    def __init__(
        self,
        rule: LSTMRule,
        like: Tensor,
        rows: int,
        ref: tuple[Tensor, Tensor, Tensor],
        group_state: Mapping[str, Tensor],
    ) -> None:
        L, H, I = rule.num_layers, rule.hidden_size, rule.input_size
        self.num_layers, self.hidden_size, self.input_size = L, H, I
        opts = {"dtype": like.dtype, "device": like.device}
        w = {k: v.detach().to(**opts) for k, v in rule.named_parameters()}
        self.weight = [wl.contiguous() for wl in fuse_weights(w, L, H)]
        self.head_weight = w["head.weight"][0]
        self.head_bias = w["head.bias"]
        ref_out, new_ref_h, new_ref_c = (t.to(**opts) for t in ref)
        self.ref_out = ref_out
        self.ref_h = group_state["ref_h"].to(**opts).reshape(-1, 1)
        self.ref_c = group_state["ref_c"].to(**opts).reshape(-1, 1)
        self.new_ref_h, self.new_ref_c = new_ref_h.reshape(-1, 1), new_ref_c.reshape(-1, 1)
        self.dense = _dense_at_rest(like.device)
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

    def at_rest(self, g: Tensor, h: list[Tensor], c: Tensor) -> Tensor:
        """The coordinates still at rest (zero gradient, exactly the reference state): their
        indices, or a mask when dense. ``h``: per layer (H, n) rows; ``c``: (L·H, n) rows."""
        H = self.hidden_size
        if self.dense:
            rest = (g == 0) & (c == self.ref_c).all(0)
            for layer, rows in enumerate(h):
                rest &= (rows == self.ref_h[layer * H : (layer + 1) * H]).all(0)
            return rest
        return _at_rest_columns(g, h, c, self.ref_h, self.ref_c)

    def pin(self, rest: Tensor, u: Tensor, h_new: Tensor, c_new: Tensor) -> None:
        """Coordinates at rest take the reference's new state and a zero update, exactly."""
        if self.dense:
            u.masked_fill_(rest, 0.0)
            h_new.copy_(torch.where(rest, self.new_ref_h, h_new))
            c_new.copy_(torch.where(rest, self.new_ref_c, c_new))
        elif rest.numel():
            u[rest] = 0.0
            h_new[:, rest] = self.new_ref_h
            c_new[:, rest] = self.new_ref_c


def _dense_at_rest(device: torch.device) -> bool:
    """Whether the at-rest test runs dense (no host sync: GPUs) or on zero-gradient indices (CPU)."""
    return device.type != "cpu"


def _feature_rows(state: Tensor) -> Tensor:
    """A ``(*shape, L, H)`` state as ``(L·H, numel)`` rows: a view when it is laid out
    feature-major (as :meth:`LSTMRule.init_state` and :meth:`LSTMRule.update_fast` make it),
    else a copy (e.g. a state loaded from a contiguous checkpoint)."""
    ndim = state.dim() - 2
    rows = state.permute(ndim, ndim + 1, *range(ndim))
    return rows.contiguous().view(state.shape[-2] * state.shape[-1], -1)


def _from_feature_rows(rows: Tensor, ndim: int) -> Tensor:
    """``(L, H, *shape)`` memory presented as the state's ``(*shape, L, H)`` (a permuted view)."""
    return rows.permute(*range(2, ndim + 2), 0, 1)


def _at_rest_columns(g: Tensor, h: Sequence[Tensor], c: Tensor, ref_h: Tensor, ref_c: Tensor) -> Tensor:
    """Indices of a chunk's coordinates at rest: zero gradient and exactly the reference state.

    ``h``: blocks of rows of the (L·H, n) hidden state; ``c``: (L·H, n) rows; ``ref_h``, ``ref_c``:
    (L·H, 1). Only zero-gradient columns are read, and those whose first cell-state row already
    differs are dropped before the full test.
    """
    idx = (g == 0).nonzero().squeeze(1)
    if idx.numel():
        idx = idx[c[0, idx] == ref_c[0]]
    if idx.numel():
        keep = (c[:, idx] == ref_c).all(0)
        pos = 0
        for rows in h:
            keep &= (rows[:, idx] == ref_h[pos : pos + rows.shape[0]]).all(0)
            pos += rows.shape[0]
        idx = idx[keep]
    return idx


def _gather_columns(rows: Sequence[Tensor], segments: Sequence[Segment]) -> Tensor:
    """A chunk's columns of ``(L·H, numel)`` row blocks: a view when it is one slice of one tensor."""
    return _concat_columns([rows[i][:, a:b] for i, a, b in segments])


def _concat_columns(pieces: Sequence[Tensor]) -> Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=1)


def _records_graph(rule: LSTMRule, grads: Sequence[Tensor], state: RuleState, hparams: Mapping[str, Any]) -> bool:
    """Whether autograd would record this step (then the differentiable path must run)."""
    if not torch.is_grad_enabled():
        return False
    group_state, per_param = state
    lr = hparams.get("lr", 1.0)
    tensors = chain(
        rule.parameters(),
        grads,
        group_state.values(),
        (v for s in per_param for v in s.values()),
        [lr] if isinstance(lr, Tensor) else [],
    )
    return any(t.requires_grad for t in tensors)


def _new_group(group_state: Mapping[str, Tensor], new_ref_h: Tensor, new_ref_c: Tensor) -> dict[str, Tensor]:
    new_group = dict(group_state)
    new_group["ref_h"] = new_ref_h.squeeze(0)
    new_group["ref_c"] = new_ref_c.squeeze(0)
    return new_group


def _state_dtype(p: Tensor) -> torch.dtype:
    """State dtype: the parameter's own floating dtype (float64 stays float64)."""
    return p.dtype if p.is_floating_point() else torch.get_default_dtype()
