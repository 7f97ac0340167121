"""The learned per-tensor step-size controller of the relative rule (``learned_opt.rules.relative``).

A tiny MLP shared by all tensors of a group reads scale-free features of each tensor
(:data:`FEATURES`) and emits two bounded numbers per tensor: an increment of an accumulated log
multiplier (state ``ctrl``) and a direct log offset. Vectorised over the group's tensors, so its
cost is per group, not per coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from learned_opt.rules.base import check_number

TINY = 1e-12
FEATURES = (
    "cos(g_t, m_{t-1}) (the hypergradient signal of a momentum step)",
    "EMA(0.9) of that cosine",
    "log(EMA(0.9) ||g|| / ||g_1||) / 4",
    "(log(||p - p_0|| / (||p_0|| + floor·√n)) + 5) / 5",
    "t / T (0 when T is unknown)",
    "1 when T is known, else 0",
    "log1p(t) / log1p(1000)",
    "accumulated log multiplier c",
    "1 for a vector/scalar tensor, else 0",
    "log1p(t) / log1p(1000) when T is known, else 0 (only controllers built with told_time read it)",
)
BASE_FEATURES = 9  # controllers built without told_time (weights saved before it) read the first nine
CTRL_RATE = 0.05  # largest change of the accumulated log multiplier per step
CTRL_DIRECT = 1.0  # largest direct log offset
CTRL_RANGE = (-6.0, 3.0)  # bounds of the accumulated log multiplier


class ControllerNet(nn.Module):
    """Per-tensor controller: ``features [n, F] -> (increment, direct) [n, 2]`` (bounded by tanh).

    A linear map of the features plus, with ``hidden > 0``, a one-hidden-layer tanh MLP. The
    output weights start at zero (an untrained controller does nothing); ``hidden = 0`` keeps θ
    small (20 numbers), which full-horizon ES estimates far better than a few hundred.
    ``cos_gain`` starts the increment's weights on the two cosine features there instead (a
    hypergradient prior: the multiplier grows while successive steps agree and shrinks while they
    oscillate), so meta-training starts from a controller that can grow a step, not from none.
    ``steady_gain`` (None: absent) adds one more input, the cosine EMA times the gradient-norm
    trend, meant to tell a steady descent (agreeing steps while the gradient shrinks: grow) from a
    noise floor (cosine near 0); its increment weight starts at ``steady_gain`` (θ ``ctrl.ws_steady``).
    ``travel_gain`` (None: absent) adds the travel input (:func:`travel_feature`: does the tensor
    travel along a steady path or random-walk?), with its increment weight starting there (θ
    ``ctrl.ws_travel``); the tensor's state then holds one more scalar, its path length.
    """

    def __init__(self, hidden: int = 8, seed: int = 0, told_time: bool = False, cos_gain: float = 0.0,
                 steady_gain: float | None = None, travel_gain: float | None = None) -> None:
        super().__init__()
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"invalid hidden: {hidden!r} (must be an int >= 0)")
        cos_gain = _finite("init_cos_gain", cos_gain)
        n = len(FEATURES) if told_time else BASE_FEATURES
        self.ws = nn.Parameter(torch.zeros(n, 2))  # linear: features -> outputs
        with torch.no_grad():
            self.ws[:2, 0] = cos_gain
        self.b2 = nn.Parameter(torch.zeros(2))
        if steady_gain is not None:
            self.ws_steady = nn.Parameter(torch.tensor([[_finite("init_steady_gain", steady_gain), 0.0]]))
        if travel_gain is not None:
            self.ws_travel = nn.Parameter(torch.tensor([[_finite("init_travel_gain", travel_gain), 0.0]]))
        if hidden:
            g = torch.Generator().manual_seed(seed)
            self.w1 = nn.Parameter(torch.randn(n, hidden, generator=g) / math.sqrt(n))
            self.b1 = nn.Parameter(torch.zeros(hidden))
            self.w2 = nn.Parameter(torch.zeros(hidden, 2))


def _finite(key: str, value: object) -> float:
    """``value`` as a float; ValueError naming ``key`` unless it is a finite number."""
    v = check_number(key, value)
    if not math.isfinite(v):
        raise ValueError(f"invalid {key}: {value!r} (must be finite)")
    return v


def controller_outputs(theta: Mapping[str, Tensor], feats: Tensor,
                       travel: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The controller's bounded (increment, direct offset) per tensor, from θ entries ``ctrl.*``
    (a controller built with ``told_time`` also reads the told-only log step, derived here from
    the "known" and log-step features, so controllers without it pay nothing for it; one with
    ``ctrl.ws_travel`` reads ``travel`` [n], :func:`travel_feature`)."""
    if theta["ctrl.ws"].shape[-2] > BASE_FEATURES:
        feats = torch.cat([feats, feats[:, 5:6] * feats[:, 6:7]], dim=-1)
    out = feats @ theta["ctrl.ws"] + theta["ctrl.b2"]
    if "ctrl.ws_steady" in theta:
        out = out + (feats[:, 1:2] * feats[:, 2:3]) @ theta["ctrl.ws_steady"]
    if "ctrl.ws_travel" in theta:
        out = out + travel.unsqueeze(-1) @ theta["ctrl.ws_travel"]
    if "ctrl.w1" in theta:
        out = out + torch.tanh(feats @ theta["ctrl.w1"] + theta["ctrl.b1"]) @ theta["ctrl.w2"]
    out = torch.tanh(out)
    return CTRL_RATE * out[:, 0], CTRL_DIRECT * out[:, 1]


def controller_stats(g: Tensor, prev: Tensor, travelled: Tensor) -> Tensor:
    """``(||g||, ||prev||, g·prev, ||p − p0||)`` of one tensor (``travelled`` is ``p − p0``): the
    statistics :func:`controller_features` reads."""
    return torch.stack([torch.linalg.vector_norm(g), torch.linalg.vector_norm(prev),
                        torch.dot(g.reshape(-1), prev.reshape(-1)), torch.linalg.vector_norm(travelled)])


# Per-tensor scalar state of the controller, packed in one vector per parameter (``controller``);
# a controller with the travel input keeps one more, its path length (TRAVEL_SCALARS).
SCALARS = ("ctrl", "cos_ema", "gnorm0", "gnorm_ema", "p0_norm")
TRAVEL_SCALARS = (*SCALARS, "path")
TRAVEL_THRESHOLD = 0.4  # the travel input is the travel term minus this, clipped to [0, 2]


def travel_feature(travelled: Tensor, path: Tensor, step: Tensor) -> Tensor:
    """The travel input per tensor: ``clamp(log(√(t−1) · ||p − p0|| / path) − 0.4, 0, 2)``, where
    ``path`` is the summed length of the tensor's t − 1 steps so far (0 before any step: input 0).

    A tensor that moves along a steady direction travels ``||p − p0|| ≈ path`` (the log term is
    ``½ log(t−1)``: it grows); one that random-walks around a noise floor travels about
    ``path / √(t−1)`` (the term stays near 0, below once it settles). One-sided: the input marks a
    descent still going, which the per-step cosine sees only one step at a time (DoG's and Prodigy's
    step sizes grow with the distance travelled for the same reason); it says nothing elsewhere.
    In the schedule-free form the path is the base sequence ``z``'s and the distance the training
    point ``y``'s, which lags ``z``: along a constant gradient the term is 0.1–0.5 below ``½ log(t−1)``.
    With decoupled weight decay the distance includes the decay's shrink and the path does not."""
    moved = torch.sqrt(torch.clamp(step - 1.0, min=1.0)) * travelled
    f = torch.log(torch.clamp(moved, min=TINY) / torch.clamp(path, min=TINY)) - TRAVEL_THRESHOLD
    return torch.where(path > TINY, torch.clamp(f, 0.0, 2.0), torch.zeros_like(f))


def controller_features(stats: Tensor, scalars: Tensor, numel: Tensor, is_vector: Tensor, step: Tensor,
                         total_steps: Tensor, floor: Tensor | float) -> tuple[Tensor, Tensor]:
    """Features ``[n, 9]`` (the first :data:`BASE_FEATURES` of :data:`FEATURES`; the told-only log step
    is derived by :func:`controller_outputs` when a controller reads it) of a group's n tensors and
    their new scalar state ``[n, 5]``.

    ``stats`` holds per tensor ``(||g||, ||m_{t-1}||, g·m_{t-1}, ||p - p0||)``; ``scalars`` the old
    state in :data:`SCALARS` order. Vectorised over tensors: the cost is per group, not per tensor.
    """
    gnorm, mnorm, dot, travelled = stats.unbind(-1)
    ctrl, cos_ema, gnorm0, gnorm_ema, p0_norm = scalars.unbind(-1)
    cos = dot / torch.clamp(gnorm * mnorm, min=TINY)
    cos_ema = 0.9 * cos_ema + 0.1 * cos
    first = step <= 1
    gnorm0 = torch.where(first, gnorm, gnorm0)
    gnorm_ema = torch.where(first, gnorm, 0.9 * gnorm_ema + 0.1 * gnorm)
    trend = torch.log(torch.clamp(gnorm_ema, min=TINY) / torch.clamp(gnorm0, min=TINY))
    ref = p0_norm + floor * numel.sqrt()
    dist = torch.log(torch.clamp(travelled, min=TINY) / torch.clamp(ref, min=TINY))
    known = (total_steps > 0).to(step.dtype)
    progress = known * step / torch.clamp(total_steps, min=1.0)
    ones = torch.ones_like(cos)
    feats = torch.stack([
        cos, cos_ema, torch.clamp(trend, -20.0, 20.0) / 4.0, (torch.clamp(dist, -10.0, 2.0) + 5.0) / 5.0,
        progress * ones, known * ones, torch.log1p(step) / math.log1p(1000.0) * ones, ctrl, is_vector,
    ], dim=-1)
    return feats, torch.stack([ctrl, cos_ema, gnorm0, gnorm_ema, p0_norm], dim=-1)


def controller_step(theta: Mapping[str, Tensor], stats: Tensor, scalars: Tensor, numel: Tensor,
                    is_vector: Tensor, step: Tensor, total_steps: Tensor,
                    floor: Tensor | float) -> tuple[Tensor, Tensor]:
    """One step of the controller over a group's tensors (``scalars``: their stacked :data:`SCALARS`,
    or :data:`TRAVEL_SCALARS` with the travel input): the step multipliers ``exp(ctrl + direct)`` and
    the new :data:`SCALARS` (a kept path is the caller's to extend: it needs this step's length)."""
    feats, new_scalars = controller_features(stats, scalars[:, :len(SCALARS)], numel, is_vector, step,
                                             total_steps, floor)
    travel = None
    if scalars.shape[-1] > len(SCALARS):
        travel = travel_feature(stats[:, 3], scalars[:, len(SCALARS)], step)
    elif "ctrl.ws_travel" in theta:
        raise ValueError("a controller with the travel input needs each tensor's path length in its state "
                         f"({len(TRAVEL_SCALARS)} controller scalars, got {scalars.shape[-1]}): "
                         "start the state with this rule's init_state")
    increment, direct = controller_outputs(theta, feats, travel)
    ctrl = torch.clamp(scalars[:, 0] + increment, *CTRL_RANGE)
    return torch.exp(ctrl + direct), torch.cat([ctrl.unsqueeze(-1), new_scalars[:, 1:]], dim=-1)
