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
of shape ``(num_layers, hidden_size)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learned_opt.rules.base import Rule, RuleState

PREPROCESSINGS = ("log_sign", "none")
DEFAULT_CHUNK_SIZE = 2**16


def preprocess_log_sign(g: Tensor, p: float = 10.0) -> Tensor:
    """The paper's gradient preprocessing, shape ``g.shape + (2,)``.

    ``(log|g| / p, sign g)`` where ``|g| >= e^-p``, else ``(-1, e^p g)``; both branches agree at
    ``|g| = e^-p``, so the map is continuous.
    """
    threshold = math.exp(-p)
    big = g.abs() >= threshold
    log_part = torch.log(g.abs().clamp_min(threshold)) / p
    first = torch.where(big, log_part, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack((first, second), dim=-1)


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
        return torch.zeros(
            (*shape, self.num_layers, self.hidden_size), dtype=_state_dtype(like), device=like.device
        )

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        per_param = [{"h": self._zero_state(p.shape, p), "c": self._zero_state(p.shape, p)} for p in params]
        like = params[0] if params else torch.zeros(())
        group = {"ref_h": self._zero_state((), like), "ref_c": self._zero_state((), like)}
        return group, per_param

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        group_state, per_param = state
        lr = hparams.get("lr", 1.0)
        casts: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}

        def weights_for(like: Tensor) -> dict[str, Tensor]:
            """θ on ``like``'s dtype and device (the rule may live on the CPU, params on a GPU)."""
            key = (like.dtype, like.device)
            if key not in casts:
                casts[key] = {k: v.to(dtype=like.dtype, device=like.device) for k, v in self.named_parameters()}
            return casts[key]

        ref_h, ref_c = group_state["ref_h"], group_state["ref_c"]
        zero = torch.zeros(1, dtype=ref_h.dtype, device=ref_h.device)
        ref_out, new_ref_h, new_ref_c = self.cell(
            self.features(zero), ref_h.unsqueeze(0), ref_c.unsqueeze(0), weights_for(ref_h)
        )

        # Plan chunks: a list of (param index, start, stop) segments per chunk, <= chunk_size coords.
        # A chunk holds one dtype/device only.
        chunks: list[list[tuple[int, int, int]]] = [[]]
        filled = 0
        kind = None
        for idx, g in enumerate(grads):
            this_kind = (per_param[idx]["h"].dtype, per_param[idx]["h"].device)
            if this_kind != kind and filled:
                chunks.append([])
                filled = 0
            kind = this_kind
            start, n = 0, g.numel()
            while start < n:
                take = min(n - start, self.chunk_size - filled)
                chunks[-1].append((idx, start, start + take))
                filled += take
                start += take
                if filled == self.chunk_size:
                    chunks.append([])
                    filled = 0

        flat_g = [g.reshape(-1) for g in grads]
        flat_h = [s["h"].reshape(-1, self.num_layers, self.hidden_size) for s in per_param]
        flat_c = [s["c"].reshape(-1, self.num_layers, self.hidden_size) for s in per_param]
        pieces: list[list[tuple[Tensor, Tensor, Tensor]]] = [[] for _ in grads]
        for segments in chunks:
            if not segments:
                continue
            h, c, g = (_gather(flat, segments) for flat in (flat_h, flat_c, flat_g))
            g = g.to(h.dtype)
            out, h_new, c_new = self.cell(self.features(g), h, c, weights_for(h))
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
            out, h, c = (_concat([piece[k] for piece in pieces[i]]) for k in range(3))
            h = h.reshape(per_param[i]["h"].shape)
            c = c.reshape(per_param[i]["c"].shape)
            step = (out - ref_out.to(dtype=out.dtype, device=out.device)).reshape(p.shape) * lr
            updates.append(step.to(p.dtype))
            new_per_param.append({"h": h, "c": c})
        new_group = dict(group_state)
        new_group["ref_h"] = new_ref_h.squeeze(0)
        new_group["ref_c"] = new_ref_c.squeeze(0)
        return updates, (new_group, new_per_param)


def _gather(flat: list[Tensor], segments: list[tuple[int, int, int]]) -> Tensor:
    """The chunk's rows: a view when it is one slice of one tensor, else a concatenation."""
    return _concat([flat[i][a:b] for i, a, b in segments])


def _concat(pieces: list[Tensor]) -> Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _state_dtype(p: Tensor) -> torch.dtype:
    """State dtype: the parameter's own floating dtype (float64 stays float64)."""
    return p.dtype if p.is_floating_point() else torch.get_default_dtype()
