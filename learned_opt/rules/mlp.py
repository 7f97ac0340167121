"""A per-coordinate MLP learned optimizer in the style of Metz et al. (2022), "small_fc_lopt".

One small MLP, its weights shared by every coordinate, reads features of each coordinate and emits
a direction ``d`` and a magnitude ``mag``; the update is ``-d · exp(mag · exp_mult) · step_mult``
(both multipliers 1e-3 by default, so a fresh rule makes tiny steps). With ``adam_residual=True``
the update is ``-(lr0 · adam · exp(mag · exp_mult) + d · step_mult)`` with a learned ``log lr0``
(initially log 1e-3) and the MLP's last layer initialised at zero: a fresh rule is exactly
Adam(lr=1e-3), so meta-training starts from Adam.

Features of a coordinate, each normalised per tensor by its root mean square over the tensor
(``x · rsqrt(1e-5 + mean(x²))``): the parameter value, the gradient, the momenta ``m_k`` (EMA of
``g``, one per momentum decay), the accumulators ``v_j`` (EMA of ``g²``, one per rms decay),
``m_k · rsqrt(v_j + 1e-6)`` for every pair, ``rsqrt(v_j + 1e-6)``, and (``adam_feature``) Adam's
bias-corrected direction ``m̂ / (sqrt(v̂) + 1e-8)`` from the 0.9 momentum and the 0.999
accumulator. Appended un-normalised: time features ``tanh(t / x)`` for the ``timescales`` x
(1 … 10^4), ``t`` the 1-based step count of the group. :meth:`MLPRule.feature_names` lists them.

Zero gradient, zero step. A coordinate whose accumulator ``v`` is exactly 0 has seen only zero
gradients since its state was fresh (``v`` is a sum of non-negative terms ``(1-β)β^i g²``), and its
update is set to exactly 0 — whatever θ, whatever its parameter value feature says. Once it has
seen a gradient it may keep moving, as Adam's momentum does. (A gradient so small that ``(1-β)g²``
underflows, below about 1e-21 in float32, counts as zero.)

Batching: the new accumulators are computed per tensor (they are the new state); then each
tensor's feature normalisers are computed over the whole tensor, one block of features at a time
(no block is larger than the state); only then are the coordinates packed into chunks of at most
``chunk_size`` (:mod:`learned_opt.rules.chunks`) for the MLP, so temporary memory beyond the new
state is bounded by the chunk and the result does not depend on the chunking. Within a chunk the
first layer runs per tensor slice with that tensor's normalisers folded into its weights and the
shared time features folded into its bias (the same function as :meth:`MLPRule.features` fed
through the MLP, without materialising it).

State: per parameter ``mom`` shaped ``param.shape + (len(momentum_decays),)`` and ``rms`` shaped
``param.shape + (len(rms_decays),)`` (defaults 5 + 1 numbers: 24 bytes per float32 parameter);
per group ``step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from learned_opt.rules.base import Rule, RuleState, check_in_range
from learned_opt.rules.chunks import cast_parameters, concat, gather, plan_chunks, state_dtype
from learned_opt.rules.directions import bias_corrected_adam
from learned_opt.rules.hparam_base import log_param

DEFAULT_CHUNK_SIZE = 2**16
NORM_EPS = 1e-5  # per-tensor second-moment normaliser: x * rsqrt(NORM_EPS + mean(x^2))
RSQRT_EPS = 1e-6  # rsqrt(v + RSQRT_EPS) features
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class MLPRule(Rule):
    """Per-coordinate MLP: ``update = lr · step(MLP(features))`` (see the module docstring).

    Args:
        hidden_size, hidden_layers: the MLP (ReLU hidden layers, 2 outputs: direction, magnitude).
        momentum_decays: decays of the gradient EMAs ``m_k`` (state, one per decay).
        rms_decays: decays of the squared-gradient EMAs ``v_j`` (state, one per decay).
        timescales: the ``x`` of the time features ``tanh(t / x)``.
        adam_feature: add Adam's bias-corrected direction as a feature.
        adam_residual: step relative to Adam (fresh rule = Adam(``init_lr0``)); adds θ ``log_lr0``.
        exp_mult, step_mult: the output scalings (1e-3 each: tiny initial steps).
        init_lr0: Adam's initial learning rate in the residual parameterisation.
        chunk_size: the most coordinates one batched MLP call processes.

    Adam's direction (feature or residual) needs 0.9 among ``momentum_decays`` and 0.999 among
    ``rms_decays``. ``hparams`` is ``{"lr": ...}``; ``lr`` multiplies the update (0 freezes).
    θ is cast to each parameter's dtype and device inside ``update``.
    """

    name: ClassVar[str] = "mlp"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0}

    def __init__(
        self,
        hidden_size: int = 32,
        hidden_layers: int = 2,
        momentum_decays: Sequence[float] = (0.1, 0.5, 0.9, 0.99, 0.999),
        rms_decays: Sequence[float] = (0.999,),
        timescales: Sequence[float] = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000),
        adam_feature: bool = True,
        adam_residual: bool = False,
        exp_mult: float = 1e-3,
        step_mult: float = 1e-3,
        init_lr0: float = 1e-3,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        for key, value, low in (("hidden_size", hidden_size, 1), ("hidden_layers", hidden_layers, 0), ("chunk_size", chunk_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"invalid {key}: {value!r} (must be an int >= {low})")
        self.momentum_decays = _floats("momentum_decays", momentum_decays)
        self.rms_decays = _floats("rms_decays", rms_decays)
        for key, decays in (("momentum_decays", self.momentum_decays), ("rms_decays", self.rms_decays)):
            if not decays:
                raise ValueError(f"invalid {key}: {decays!r} (needs at least one decay)")
            for d in decays:
                check_in_range(key, d, 0.0, 1.0)
        self.timescales = _floats("timescales", timescales)
        if not all(math.isfinite(x) and x > 0 for x in self.timescales):
            raise ValueError(f"invalid timescales: {timescales!r} (must be > 0)")
        for key, flag in (("adam_feature", adam_feature), ("adam_residual", adam_residual)):
            if not isinstance(flag, bool):
                raise ValueError(f"invalid {key}: {flag!r} (must be a bool)")
        if (adam_feature or adam_residual) and (
            ADAM_BETAS[0] not in self.momentum_decays or ADAM_BETAS[1] not in self.rms_decays
        ):
            raise ValueError(
                f"Adam's direction needs momentum decay {ADAM_BETAS[0]} and rms decay {ADAM_BETAS[1]}; got "
                f"momentum_decays={self.momentum_decays}, rms_decays={self.rms_decays}"
            )
        for key, value in (("exp_mult", exp_mult), ("step_mult", step_mult)):
            if not math.isfinite(value):
                raise ValueError(f"invalid {key}: {value!r} (must be finite)")
        self.hidden_size = hidden_size
        self.hidden_layers = hidden_layers
        self.adam_feature = adam_feature
        self.adam_residual = adam_residual
        self.exp_mult = float(exp_mult)
        self.step_mult = float(step_mult)
        self.init_lr0 = float(init_lr0)
        self.chunk_size = chunk_size
        widths = [len(self.feature_names()), *[hidden_size] * hidden_layers, 2]
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        if adam_residual:
            self.log_lr0 = log_param(init_lr0, "init_lr0")
            with torch.no_grad():  # the MLP starts silent: a fresh residual rule is exactly Adam
                self.mlp[-1].weight.zero_()
                self.mlp[-1].bias.zero_()

    def config(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "hidden_layers": self.hidden_layers,
            "momentum_decays": list(self.momentum_decays),
            "rms_decays": list(self.rms_decays),
            "timescales": list(self.timescales),
            "adam_feature": self.adam_feature,
            "adam_residual": self.adam_residual,
            "exp_mult": self.exp_mult,
            "step_mult": self.step_mult,
            "init_lr0": self.init_lr0,
            "chunk_size": self.chunk_size,
        }

    # --- features ----------------------------------------------------------------------------
    def feature_names(self) -> list[str]:
        """Names of the MLP's inputs, in order: normalised features first, then time features."""
        mom = [f"mom{b}" for b in self.momentum_decays]
        rms = [f"rms{b}" for b in self.rms_decays]
        names = ["param", "grad", *mom, *rms]
        names += [f"{m}*rsqrt({r})" for m in mom for r in rms]
        names += [f"rsqrt({r})" for r in rms]
        if self.adam_feature:
            names.append("adam")
        return names + [f"tanh(t/{x:g})" for x in self.timescales]

    @property
    def num_normalized(self) -> int:
        """How many features are normalised per tensor (all but the time features)."""
        return len(self.feature_names()) - len(self.timescales)

    def _raw_blocks(self, p: Tensor, g: Tensor, mom: Tensor, rms: Tensor, step: Tensor) -> Iterator[Tensor]:
        """The un-normalised features of flat coordinates as (n, k) blocks, in ``feature_names`` order.

        ``p``, ``g``: (n,); ``mom``: (n, K); ``rms``: (n, J) — the accumulators after this step.
        A generator, so the per-tensor normaliser holds one block (at most the size of the state)
        at a time.
        """
        yield torch.stack([p, g], dim=-1)
        yield mom
        yield rms
        rsqrts = torch.rsqrt(rms + RSQRT_EPS)
        yield (mom.unsqueeze(-1) * rsqrts.unsqueeze(-2)).flatten(-2)  # m_k * rsqrt(v_j), k-major
        yield rsqrts
        if self.adam_feature:
            yield self._adam(mom, rms, step).unsqueeze(-1)

    def _adam(self, mom: Tensor, rms: Tensor, step: Tensor) -> Tensor:
        m = mom[:, self.momentum_decays.index(ADAM_BETAS[0])]
        v = rms[:, self.rms_decays.index(ADAM_BETAS[1])]
        return bias_corrected_adam(m, v, step, ADAM_BETAS, ADAM_EPS)

    def _raw(self, p: Tensor, g: Tensor, mom: Tensor, rms: Tensor, step: Tensor) -> Tensor:
        """The un-normalised features, (n, num_normalized)."""
        return torch.cat(list(self._raw_blocks(p, g, mom, rms, step)), dim=-1)

    def _normalizers(self, p: Tensor, g: Tensor, mom: Tensor, rms: Tensor, step: Tensor) -> Tensor:
        """Per-feature ``rsqrt(NORM_EPS + mean(x²))`` over a whole (flat) tensor, shape (num_normalized,)."""
        return torch.cat(
            [torch.rsqrt(NORM_EPS + block.square().mean(0)) for block in self._raw_blocks(p, g, mom, rms, step)]
        )

    def _time_features(self, step: Tensor) -> Tensor:
        scales = torch.tensor(self.timescales, dtype=step.dtype, device=step.device)
        return torch.tanh(step / scales)

    def features(self, param: Tensor, grad: Tensor, mom: Tensor, rms: Tensor, step: Tensor) -> Tensor:
        """The MLP inputs of one whole tensor, shape ``(numel, len(feature_names()))``.

        ``mom``/``rms`` are the tensor's accumulators *after* this step's gradient, ``step`` the
        1-based step count. ``update`` computes the same first layer chunk by chunk, with the
        normalisers folded into the weights and the (shared) time features into the bias.
        """
        flat = _flat(param, grad, mom, rms, step.to(mom.dtype))
        raw = self._raw(*flat) * self._normalizers(*flat)
        return torch.cat([raw, self._time_features(flat[-1]).expand(raw.shape[0], -1)], dim=-1)

    # --- the rule ----------------------------------------------------------------------------
    def _first_layer(self, raw: Tensor, norms: Tensor, step: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
        """The first layer's pre-activation on ``[raw · norms, time]`` (n, width), without building it."""
        w, b = weights["mlp.0.weight"], weights["mlp.0.bias"]
        k = self.num_normalized
        return F.linear(raw, w[:, :k] * norms, b + w[:, k:] @ self._time_features(step))

    def _step(self, h: Tensor, adam: Tensor | None, weights: Mapping[str, Tensor]) -> Tensor:
        """The step of each coordinate from the first layer's pre-activation ``h``, before ``lr`` and the mask."""
        for i in range(1, len(self.mlp)):
            h = F.linear(F.relu(h), weights[f"mlp.{i}.weight"], weights[f"mlp.{i}.bias"])
        direction, magnitude = h[:, 0], h[:, 1]
        scale = torch.exp(magnitude * self.exp_mult)
        if adam is None:
            return -(direction * scale * self.step_mult)
        return -(weights["log_lr0"].exp() * adam * scale + direction * self.step_mult)

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        def zeros(p: Tensor, k: int) -> Tensor:
            return torch.zeros((*p.shape, k), dtype=state_dtype(p), device=p.device)

        per_param = [{"mom": zeros(p, len(self.momentum_decays)), "rms": zeros(p, len(self.rms_decays))} for p in params]
        like = params[0] if params else torch.zeros(())
        return {"step": torch.zeros((), dtype=state_dtype(like), device=like.device)}, per_param

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        group_state, per_param = state
        lr = hparams.get("lr", 1.0)
        step = group_state["step"] + 1
        casts: dict[tuple, dict[str, Tensor]] = {}

        new_per_param, flats, norms = [], [], []
        for p, g, st in zip(params, grads, per_param):
            mom, rms = st["mom"], st["rms"]
            decays_m = torch.tensor(self.momentum_decays, dtype=mom.dtype, device=mom.device)
            decays_v = torch.tensor(self.rms_decays, dtype=rms.dtype, device=rms.device)
            gs = g.to(mom.dtype).unsqueeze(-1)
            mom = mom * decays_m + gs * (1 - decays_m)
            rms = rms * decays_v + gs * gs * (1 - decays_v)
            new_per_param.append({"mom": mom, "rms": rms})
            flat = _flat(p, g, mom, rms, step.to(device=mom.device, dtype=mom.dtype))
            flats.append(flat)
            norms.append(self._normalizers(*flat) if p.numel() else None)

        chunks = plan_chunks(
            [p.numel() for p in params], [(st["mom"].dtype, st["mom"].device) for st in new_per_param], self.chunk_size
        )
        pieces: list[list[Tensor]] = [[] for _ in params]
        for segments in chunks:
            weights = cast_parameters(self, flats[segments[0][0]][0], casts)
            h = concat([self._first_layer(self._raw(*_slice(flats[i], a, b)), norms[i], flats[i][-1], weights)
                        for i, a, b in segments])
            adam = None
            if self.adam_residual:
                adam = concat([self._adam(*_slice(flats[i], a, b)[2:]) for i, a, b in segments])
            out = self._step(h, adam, weights)
            # coordinates that have seen only zero gradients (v == 0) do not move, exactly
            moving = gather([f[3][:, 0] for f in flats], segments) > 0
            out = torch.where(moving, out, torch.zeros_like(out))
            pos = 0
            for i, a, b in segments:
                pieces[i].append(out[pos : pos + b - a])
                pos += b - a

        updates = []
        for p, piece in zip(params, pieces):
            if not piece:  # zero-element parameter
                updates.append(torch.zeros_like(p))
                continue
            updates.append((concat(piece).reshape(p.shape) * lr).to(p.dtype))
        return updates, ({**group_state, "step": step}, new_per_param)


def _flat(p: Tensor, g: Tensor, mom: Tensor, rms: Tensor, step: Tensor) -> tuple[Tensor, ...]:
    """A tensor's inputs as flat coordinates in the state's dtype: (p, g, mom (n,K), rms (n,J), step)."""
    dtype = mom.dtype
    return (
        p.reshape(-1).to(dtype),
        g.reshape(-1).to(dtype),
        mom.reshape(-1, mom.shape[-1]),
        rms.reshape(-1, rms.shape[-1]),
        step,
    )


def _slice(flat: tuple[Tensor, ...], a: int, b: int) -> tuple[Tensor, ...]:
    """Coordinates ``a:b`` of a tensor's flat inputs (the step count is shared)."""
    p, g, mom, rms, step = flat
    return p[a:b], g[a:b], mom[a:b], rms[a:b], step


def _floats(key: str, values: Sequence[float]) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"invalid {key}: {values!r} (must be a sequence of numbers)") from None
