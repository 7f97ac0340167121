"""The LSTM rule's architecture and math, shared by its three execution paths.

:class:`LSTMCore` holds θ (a ``torch.nn.LSTM`` used as the weight container, so its parameter
names are torch's, and a linear head), validates and reports the config, and writes the math once:
the preprocessing, the row-major :meth:`LSTMCore.cell` (the readable reference the fused kernels
are tested against), the state's initialisation and the reference coordinate's zero-gradient step.
:class:`~learned_opt.rules.lstm.rule.LSTMRule` adds the update and the choice of path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learned_opt.rules.base import Rule, RuleState
from learned_opt.rules.chunks import Segment, cast_parameters, plan_chunks
from learned_opt.rules.lstm.layout import zero_state

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


class LSTMCore(Rule):
    """The coordinate-wise LSTM's θ, config and math (see :class:`~learned_opt.rules.lstm.LSTMRule`).

    Args:
        num_layers, hidden_size: the stacked LSTM (paper: 2 x 20).
        preprocess: ``"log_sign"`` (the paper's, p = ``p``) or ``"none"`` (the raw gradient).
        p: the preprocessing's log scale.
        output_scale: multiplies the head's output (paper: 0.1).
        chunk_size: the most coordinates one batched LSTM call processes (any size, the same steps).
        fused_training: first-order meta-training through the fused chunk step with its written-out
            backward (``False``: autograd op by op through the reference path, the plain baseline
            the meta-training speed benchmark measures; the same math).

    ``hparams`` is ``{"lr": ...}``; ``lr`` multiplies the learned update (0 freezes).
    The weights live in ``self.lstm`` (a ``torch.nn.LSTM`` used as the weight container, so its
    parameter names are torch's) and ``self.head``; the math is written out in :meth:`cell` with
    ``F.linear`` so it stays twice differentiable on every backend. θ is cast to each parameter's
    dtype and device inside ``update``, so the rule module itself may stay on the CPU.
    """

    def __init__(
        self,
        num_layers: int = 2,
        hidden_size: int = 20,
        preprocess: str = "log_sign",
        p: float = 10.0,
        output_scale: float = 0.1,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        fused_training: bool = True,
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
        if not isinstance(fused_training, bool):
            raise ValueError(f"invalid fused_training: {fused_training!r} (must be a bool)")
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.preprocess = preprocess
        self.p = float(p)
        self.output_scale = float(output_scale)
        self.chunk_size = chunk_size
        self.lstm = nn.LSTM(self.input_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, 1)
        self.fused_training = fused_training

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
            "fused_training": self.fused_training,
        }

    def features(self, g: Tensor) -> Tensor:
        """Preprocessed inputs, shape ``g.shape + (input_size,)``."""
        if self.preprocess == "log_sign":
            return preprocess_log_sign(g, self.p)
        return g.unsqueeze(-1)

    def write_features(self, g: Tensor, out: Tensor) -> None:
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

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        """Zero ``h``, ``c`` per parameter (feature-major, see :mod:`~learned_opt.rules.lstm.layout`)
        and the reference's zero ``ref_h``, ``ref_c`` (L, H) for the group."""
        L, H = self.num_layers, self.hidden_size
        per_param = [{"h": zero_state(p.shape, L, H, p), "c": zero_state(p.shape, L, H, p)} for p in params]
        like = params[0] if params else torch.zeros(())
        group = {"ref_h": zero_state((), L, H, like), "ref_c": zero_state((), L, H, like)}
        return group, per_param

    def join_state(self, group_state: dict[str, Tensor], per_param: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """A late-joining parameter starts on the group's zero-gradient reference trajectory, so an
        all-zero gradient still moves it exactly nothing (a zero state would not be "at rest")."""
        ref_h, ref_c = group_state["ref_h"], group_state["ref_c"]
        return [{"h": ref_h.to(s["h"]).expand_as(s["h"]).clone(), "c": ref_c.to(s["c"]).expand_as(s["c"]).clone()}
                for s in per_param]

    def reference_step(
        self, group_state: Mapping[str, Tensor], cache: dict[Any, dict[str, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The reference coordinate's step on a zero gradient: its output (1,) and new h, c (1, L, H).
        ``cache`` memoises θ's casts (:func:`~learned_opt.rules.chunks.cast_parameters`)."""
        ref_h, ref_c = group_state["ref_h"], group_state["ref_c"]
        zero = torch.zeros(1, dtype=ref_h.dtype, device=ref_h.device)
        return self.cell(self.features(zero), ref_h.unsqueeze(0), ref_c.unsqueeze(0), cast_parameters(self, ref_h, cache))

    def chunk_plan(self, grads: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]], *,
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
