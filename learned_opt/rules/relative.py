"""Parameter-relative Adam, hand-set and with a learned per-tensor step-size controller.

Each tensor moves along Adam's direction ``u = m̂ / (√v̂ + eps)``, rescaled so that one step moves
it by a fraction of its own root-mean-square value (LAMB-like; VeLO and Celo also step relative
to the parameter scale, which makes the right multiplier far more uniform across tasks)::

    Δp = −lr · α · s(t) · exp(c_t) · (RMS(p) + floor) / RMS(u) · u

- ``α`` is the relative step (0.03 hand-set); ``lr`` is a plain multiplier (default 1.0), so
  schedulers scale the rule's own rate;
- ``s(t)`` is the schedule: with ``total_steps = T`` known, a linear warm-up over the first
  ``warmup · T`` steps, then cosine to ``final`` (a fraction of the peak: 0 hand-set, learned as
  ``logit_final``) at ``T`` (the learned rule with ``init_decay_start`` d holds the peak over the
  first d of the span after the warm-up and fits the cosine into the rest); without it, the same
  warm-up over ``warmup · HORIZON_FREE_STEPS`` steps (10 at the hand-set 0.05) and then constant (the
  controller decays from there);
- ``c_t`` is the per-tensor log multiplier of the learned controller (0 for the hand-set rule);
- ``floor`` keeps tensors near zero moving; ``floor_vec`` (optional) is the floor of vectors and
  scalars instead: biases start at zero, and with the matrices' 1e-3 they moved only ``α · 1e-3``
  per step (the learned rule learns it as ``log_floor_vec``).

Schedule-free form (``schedule_free=True``, after Defazio et al. 2024, "The Road Less Scheduled"):
the same relative step moves a base sequence ``z`` along ``u = g / (√v̂ + eps)`` (no first moment),
the evaluation point ``x`` is the running average of ``z`` weighted by each step's multiplier
squared (``(lr · s(t) · exp(c_t))²``), and gradients are taken at ``y = (1 − β₁) z + β₁ x``, which the
parameters hold while training. ``x`` anneals without a schedule or a horizon: optimizers with
this form have ``eval()``/``train()`` (as ``schedulefree``'s) that swap the parameters to ``x`` for
evaluation and back (:func:`schedule_free_eval_point`, :func:`schedule_free_train_point`). Told
``total_steps``, the cosine anneals ``z`` itself and the average would lag behind it (it weighs
the large early steps most), so a told run is evaluated where it trains, at ``y`` (unless the
learned rule is built with ``told_free``: then a told run keeps the untold form, evaluated at ``x``,
and the horizon reaches only its controller).

The controller (:mod:`learned_opt.rules.controller`) is a tiny MLP shared by all tensors; per
step it reads scale-free features of each tensor and emits two numbers: a bounded increment of an
accumulated log multiplier (state ``ctrl``) and a bounded direct offset. Its last layer starts at
zero, so an untrained controller is exactly the hand-set rule. Its cost is per tensor
(a few reductions and one small matmul over the group's tensors), so a step stays close to Adam's.

:func:`relative_update` is the one home of this math; both rules, the batched meta-training
engine (``learned_opt.meta.population``, through ``torch.func.vmap``) and the optimizer off the CPU
call it. On the CPU the optimizer runs :func:`relative_move`: the same steps fused in place over
the parameters (:mod:`learned_opt.rules.relative_fused`), tested against it to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.rules.base import Rule, RuleState, check_bool, check_in_range, check_nonnegative, scalar_like
from learned_opt.rules.controller import (
    SCALARS, TRAVEL_SCALARS, ControllerNet, controller_step,
)
from learned_opt.rules.hparam_base import check_betas, log_param, logit_param
from learned_opt.rules.horizon import (  # noqa: F401  (schedule, HORIZON_FREE_STEPS: public here too)
    HORIZON_FREE_STEPS, check_total_steps, horizon_tensor, schedule, warn_past_horizon,
)
from learned_opt.rules.relative_fused import can_fuse, fused_apply, fused_constants, fused_statistics
from learned_opt.rules.relative_scale import anchor_factor, relative_directions, rms_scale
from learned_opt.rules.schedule_free import (
    schedule_free_eval_point, schedule_free_train_point, sf_coefficients, sf_updates,
)


def relative_update(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    state: RuleState,
    *,
    alpha: Tensor | float,
    warmup: Tensor | float,
    floor: Tensor | float,
    betas: Sequence[Tensor | float],
    eps: Tensor | float,
    lr: Tensor | float,
    total_steps: int | Tensor | None,
    controller: Mapping[str, Tensor] | None = None,
    floor_vec: Tensor | float | None = None,
    final: Tensor | float = 0.0,
    schedule_free: bool = False,
    anchor: Tensor | float | None = None,
    told_free: bool = False,
    decay_start: Tensor | float | None = None,
) -> tuple[list[Tensor], RuleState]:
    """Additive updates and new state for one group (see the module docstring). Pure.

    ``final`` is where the told schedule's cosine ends, as a fraction of its peak (0: at 0).
    ``schedule_free``: the schedule-free form (state ``z``, ``sf_weight`` and no ``exp_avg``).
    ``anchor`` a (learned rule, untold runs): the scale is ``(RMS(p) + floor)^(1−a) · (RMS(p₀) + floor)^a``;
    at a = 0 norm growth compounds over a long run with no cosine to end it.
    ``told_free``: a told run keeps the untold form (no cosine, the anchor kept; the schedule-free
    form evaluates at ``x``) and the horizon reaches only the controller's inputs.

    ``total_steps``: None or 0 when unknown. ``controller`` is the θ dict holding ``ctrl.*`` entries,
    or None for the hand-set rule. The optimizer on the CPU takes :func:`relative_move` instead.
    """
    group_state, per_param = state
    step = group_state["step"] + 1
    dirs, moments, stats, norms = relative_directions(grads, params, per_param, step, betas, eps,
                                                      controller is not None, schedule_free=schedule_free)
    if schedule_free:
        new_per_param = [{"exp_avg_sq": v} for _, v in moments]
    else:
        new_per_param = [{"exp_avg": m, "exp_avg_sq": v} for m, v in moments]
    if not dirs:
        return [], ({**group_state, "step": step}, new_per_param)
    factors, mults = _step_factors(params, per_param, new_per_param, stats, norms, step, total_steps, alpha=alpha,
                                   warmup=warmup, floor=floor, lr=lr, controller=controller, floor_vec=floor_vec,
                                   final=final, anchor=anchor, told_free=told_free, decay_start=decay_start)
    if schedule_free:
        updates = sf_updates(dirs, params, per_param, new_per_param, factors, (lr * mults) ** 2, betas[0])
    else:
        updates = [d * f for d, f in zip(dirs, factors.unbind(0))]
    return updates, ({**group_state, "step": step}, new_per_param)


def relative_move(grads: Sequence[Tensor], params: Sequence[Tensor], state: RuleState,
                  settings: Mapping[str, float], **kwargs: Any) -> RuleState | None:
    """:func:`relative_update` for the optimizer on the CPU: ``params`` (its own tensors) and the
    state move in place (:mod:`learned_opt.rules.relative_fused`), and the new state is returned.
    ``settings`` holds the step transforms as numbers (see :meth:`Rule.move_inplace`); ``kwargs``
    are ``relative_update``'s. None, with nothing changed, when the tensors cannot be sliced as
    views or the gradient fails the guard."""
    group_state, per_param = state
    if not can_fuse(grads, params, per_param):
        return None
    step = group_state["step"] + 1
    schedule_free, controller, betas = kwargs.get("schedule_free", False), kwargs.get("controller"), kwargs["betas"]
    consts = fused_constants(sign=settings["sign"], coupled=settings["coupled"], decoupled=settings["decoupled"],
                             betas=betas, eps=kwargs["eps"], step=float(step), schedule_free=schedule_free)
    found = fused_statistics(grads, params, per_param, consts, controller is not None, settings["bound"])
    if found is None:
        return None
    keys = ("exp_avg_sq", "z", "sf_weight") if schedule_free else ("exp_avg", "exp_avg_sq")
    new_per_param = [{k: st[k] for k in keys} for st in per_param]
    stats, norms, kept = found
    factors, mults = _step_factors(params, per_param, new_per_param, stats, norms, step, kwargs["total_steps"],
                                   **{k: v for k, v in kwargs.items() if k not in ("betas", "eps", "schedule_free",
                                                                                   "total_steps")})
    lerps = keeps = None
    if schedule_free:
        total, lerp, keep = sf_coefficients(per_param, (kwargs["lr"] * mults) ** 2, betas[0])
        for new_st, weight in zip(new_per_param, total.unbind(0)):
            new_st["sf_weight"] = weight
        lerps, keeps = lerp.tolist(), keep.tolist()
    fused_apply(grads, params, per_param, consts, kept, factors.tolist(), lerps, keeps)
    return {**group_state, "step": step}, new_per_param


def _step_factors(params: Sequence[Tensor], per_param: Sequence[Mapping[str, Tensor]],
                  new_per_param: list[dict[str, Tensor]], stats: Tensor | None, norms: Tensor, step: Tensor,
                  total_steps: int | Tensor | None, *, alpha: Tensor | float, warmup: Tensor | float,
                  floor: Tensor | float, lr: Tensor | float, controller: Mapping[str, Tensor] | None = None,
                  floor_vec: Tensor | float | None = None, final: Tensor | float = 0.0,
                  anchor: Tensor | float | None = None, told_free: bool = False,
                  decay_start: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Per tensor: the factor ``−lr·α·s(t)·exp(c)·scale`` of its direction and the multiplier
    ``s(t)·exp(c)``; writes the controller's state into ``new_per_param``."""
    total_steps = horizon_tensor(total_steps, step)
    form_total = torch.zeros_like(total_steps) if told_free else total_steps  # the horizon the form sees
    s = schedule(step, form_total, warmup, final, decay_start)
    numel = torch.tensor([float(max(p.numel(), 1)) for p in params], dtype=step.dtype, device=step.device)
    is_vector = torch.tensor([float(p.dim() <= 1) for p in params], dtype=step.dtype, device=step.device)
    floor_t = floor if floor_vec is None else torch.where(is_vector > 0, scalar_like(floor_vec, step),
                                                          scalar_like(floor, step))
    scales = rms_scale(norms, numel, floor_t)
    if controller is None:
        mults = s.expand(len(params))
        return scales * mults * (-lr * alpha), mults
    scalars = torch.stack([st["controller"] for st in per_param])
    mults, new_scalars = controller_step(controller, stats, scalars, numel, is_vector, step, total_steps, floor_t)
    mults = s * mults
    if anchor is not None:
        used = torch.where(form_total > 0, 0.0, anchor)
        scales = scales * anchor_factor(norms[:, 0], scalars[:, SCALARS.index("p0_norm")], numel, floor_t, used)
    factors = scales * mults * (-lr * alpha)  # one multiply per tensor: relative scale, schedule, controller
    if scalars.shape[-1] > len(SCALARS):  # the travel input's path: add this step's length ||factor · u||
        path = scalars[:, len(SCALARS)] + factors.abs() * norms[:, 1]
        new_scalars = torch.cat([new_scalars, path.unsqueeze(-1)], dim=-1)
    for new_st, st, row in zip(new_per_param, per_param, new_scalars.unbind(0)):
        new_st.update(p0=st["p0"], controller=row)
    return factors, mults


def _step_counter(params: Sequence[Tensor]) -> dict[str, Tensor]:
    like = params[0] if params else torch.zeros(())
    return {"step": torch.zeros((), dtype=like.dtype, device=like.device)}


class _RelativeRule(Rule):
    """``update`` (pure) and ``move_inplace`` (the optimizer's fused CPU step) of both relative
    rules, through their ``_kwargs``, and the schedule-free form's two points."""

    schedule_free: bool = False
    told_free: bool = False  # told runs keep the untold form (the learned rule's option)

    def _moments_state(self, p: Tensor) -> dict[str, Tensor]:
        """Fresh per-parameter moments: Adam's two, or (schedule-free) ``v``, ``z = p`` and ``Σw = 0``."""
        if self.schedule_free:
            return {"exp_avg_sq": torch.zeros_like(p), "z": p.detach().clone(),
                    "sf_weight": torch.zeros((), dtype=p.dtype, device=p.device)}
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def eval_point(self, params: Sequence[Tensor], state: RuleState,
                   hparams: Mapping[str, Any]) -> list[Tensor] | None:
        """The parameters to evaluate at (schedule-free: the average ``x``), or None: the parameters."""
        if not self.schedule_free:
            return None
        return schedule_free_eval_point(params, state[1], self._beta1(hparams), self._eval_horizon(hparams))

    def train_point(self, params: Sequence[Tensor], state: RuleState,
                    hparams: Mapping[str, Any]) -> list[Tensor] | None:
        """Inverse of :meth:`eval_point` (None where that is None)."""
        if not self.schedule_free:
            return None
        return schedule_free_train_point(params, state[1], self._beta1(hparams), self._eval_horizon(hparams))

    def _eval_horizon(self, hparams: Mapping[str, Any]) -> int | Tensor | None:
        """The horizon that picks the evaluation point: none for a rule whose told runs keep the untold form."""
        return None if self.told_free else hparams.get("total_steps")

    def _beta1(self, hparams: Mapping[str, Any]) -> float:
        """β₁ of the schedule-free interpolation (the first of the betas)."""
        raise NotImplementedError

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        return relative_update(grads, params, state, **self._kwargs(grads, state, hparams))

    def move_inplace(self, grads: Sequence[Tensor], params: Sequence[Tensor], state: RuleState,
                     hparams: Mapping[str, Tensor | float], settings: Mapping[str, float]) -> RuleState | None:
        with torch.no_grad():
            return relative_move(grads, params, state, settings, **self._kwargs(grads, state, hparams))

    def _kwargs(self, grads: Sequence[Tensor], state: RuleState, hparams: Mapping[str, Tensor | float]) -> dict[str, Any]:
        """:func:`relative_update`'s keyword arguments for this rule and step (warns past the horizon)."""
        raise NotImplementedError


class RelativeAdamRule(_RelativeRule):
    """The hand-set parameter-relative Adam (no θ): every hyperparameter comes from the param group."""

    name: ClassVar[str] = "relative-adam"
    hyperparameters: ClassVar[dict[str, Any]] = {
        "lr": 1.0, "alpha": 0.03, "warmup": 0.05, "floor": 1e-3, "floor_vec": None, "betas": (0.9, 0.999),
        "eps": 1e-8, "total_steps": None, "final": 0.0,
    }

    def __init__(self, schedule_free: bool = False) -> None:
        super().__init__()
        self.schedule_free = check_bool("schedule_free", schedule_free)

    def config(self) -> dict[str, Any]:
        return {"schedule_free": True} if self.schedule_free else {}

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        return _step_counter(params), [self._moments_state(p) for p in params]

    def _beta1(self, hparams: Mapping[str, Any]) -> float:
        return float(hparams["betas"][0])

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        super().validate_hparams(hparams)
        check_total_steps(hparams.get("total_steps"))
        if hparams.get("floor_vec") is not None:
            check_nonnegative("floor_vec", hparams["floor_vec"])
        for key in ("alpha", "floor", "eps"):
            if key in hparams:
                check_nonnegative(key, hparams[key])
        for key in ("warmup", "final"):
            if key in hparams:
                check_in_range(key, hparams[key], 0.0, 1.0)
        if "betas" in hparams:
            check_betas(hparams["betas"])

    def _kwargs(self, grads: Sequence[Tensor], state: RuleState, hparams: Mapping[str, Tensor | float]) -> dict[str, Any]:
        warn_past_horizon(self, state[0]["step"], hparams["total_steps"], lambda: hparams.get("final", 0.0))
        return dict(alpha=hparams["alpha"], warmup=hparams["warmup"], floor=hparams["floor"], betas=hparams["betas"],
                    eps=hparams["eps"], lr=hparams["lr"], total_steps=hparams["total_steps"],
                    floor_vec=hparams.get("floor_vec"), final=hparams.get("final", 0.0),
                    schedule_free=self.schedule_free)


class LearnedRelativeAdamRule(_RelativeRule):
    """Parameter-relative Adam with a learned per-tensor controller (the flagship ``default``).

    θ: ``log_alpha``, ``logit_warmup``, ``log_floor``, ``log_floor_vec`` (with ``init_floor_vec`` set;
    older weights without it use ``floor`` for vectors too), ``logit_final`` (with ``init_final`` set;
    without it the told cosine ends at 0), ``logit_decay_start`` (with ``init_decay_start`` set: the
    told cosine starts that fraction of the way after the warm-up; without it, at once),
    ``logit_anchor`` (with ``init_anchor`` set: see :func:`relative_update`; without it the scale is
    the current RMS) and the controller net (``ctrl.*``;
    ``init_cos_gain``, ``init_steady_gain``, ``init_travel_gain``: see :class:`ControllerNet`).
    ``told_time`` gives the controller the log-step feature a second time, for told runs only, so that a
    decay over the steps that suits untold runs need not apply where the told cosine already decays.
    ``told_free``: told runs keep the untold form (no cosine to the horizon, the anchor kept, a
    schedule-free rule evaluated at its average ``x``); ``total_steps`` reaches only the controller's
    progress inputs, so any decay to the horizon is the controller's, learned (``logit_final``, if
    present, is then unused: it stays so that weights of the other form can warm-start this one).
    ``hparams``: ``lr`` (a multiplier, 1.0 = as meta-trained) and ``total_steps`` (None: unknown).
    State per parameter: Adam's two moments, the initial value ``p0`` (12 bytes per float32
    parameter in all) and ``controller``, the tensor's five scalars (:data:`SCALARS`; six with the
    travel input, :data:`TRAVEL_SCALARS`); per group: ``step``.
    """

    name: ClassVar[str] = "learned-relative-adam"
    hyperparameters: ClassVar[dict[str, Any]] = {"lr": 1.0, "total_steps": None}
    # θ rows of optional controller inputs: weights without them may warm-start a rule with them
    # (learned_opt.weights.copy_weights; the rows keep their starting values)
    input_rows: ClassVar[tuple[str, ...]] = ("ctrl.ws_steady", "ctrl.ws_travel", "logit_decay_start")
    form_options: ClassVar[tuple[str, ...]] = ("told_free",)  # may differ from the weights a search starts from
    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, init_alpha: float = 0.03, init_warmup: float = 0.05, init_floor: float = 1e-3,
                 hidden: int = 8, seed: int = 0, init_floor_vec: float | None = None,
                 init_final: float | None = None, told_time: bool = False, schedule_free: bool = False,
                 init_anchor: float | None = None, init_cos_gain: float = 0.0,
                 init_steady_gain: float | None = None, init_travel_gain: float | None = None,
                 told_free: bool = False, init_decay_start: float | None = None) -> None:
        super().__init__()
        self.schedule_free = check_bool("schedule_free", schedule_free)
        self.told_free = check_bool("told_free", told_free)
        self.log_alpha = log_param(init_alpha, "init_alpha")
        self.logit_warmup = logit_param(init_warmup, "init_warmup")
        self.log_floor = log_param(init_floor, "init_floor")
        if init_floor_vec is not None:
            self.log_floor_vec = log_param(init_floor_vec, "init_floor_vec")
        if init_final is not None:
            self.logit_final = logit_param(init_final, "init_final")
        if init_anchor is not None:
            self.logit_anchor = logit_param(init_anchor, "init_anchor")
        if init_decay_start is not None:
            self.logit_decay_start = logit_param(init_decay_start, "init_decay_start")
        if not isinstance(told_time, bool):
            raise ValueError(f"invalid told_time: {told_time!r} (must be true or false)")
        self.ctrl = ControllerNet(hidden, seed, told_time, init_cos_gain, init_steady_gain, init_travel_gain)
        self.hidden, self.seed, self.told_time = int(hidden), int(seed), told_time

    def config(self) -> dict[str, Any]:
        return {
            "init_alpha": float(self.log_alpha.detach().exp()),
            "init_warmup": float(torch.sigmoid(self.logit_warmup.detach())),
            "init_floor": float(self.log_floor.detach().exp()),
            **({"init_floor_vec": float(self.log_floor_vec.detach().exp())} if hasattr(self, "log_floor_vec") else {}),
            **({"init_final": float(torch.sigmoid(self.logit_final.detach()))} if hasattr(self, "logit_final") else {}),
            **({"init_anchor": float(torch.sigmoid(self.logit_anchor.detach()))} if hasattr(self, "logit_anchor") else {}),
            **({"init_decay_start": float(torch.sigmoid(self.logit_decay_start.detach()))}
               if hasattr(self, "logit_decay_start") else {}),
            "hidden": self.hidden,
            "seed": self.seed,
            **({"told_time": True} if self.told_time else {}),
            **({"init_steady_gain": float(self.ctrl.ws_steady.detach()[0, 0])} if hasattr(self.ctrl, "ws_steady") else {}),
            **({"init_travel_gain": float(self.ctrl.ws_travel.detach()[0, 0])} if hasattr(self.ctrl, "ws_travel") else {}),
            **({"schedule_free": True} if self.schedule_free else {}),
            **({"told_free": True} if self.told_free else {}),
        }

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        per_param = []
        names = TRAVEL_SCALARS if hasattr(self.ctrl, "ws_travel") else SCALARS
        for p in params:
            scalars = torch.zeros(len(names), dtype=p.dtype, device=p.device)
            scalars[SCALARS.index("p0_norm")] = torch.linalg.vector_norm(p.detach())
            per_param.append({**self._moments_state(p), "p0": p.detach().clone(), "controller": scalars})
        return _step_counter(params), per_param

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        super().validate_hparams(hparams)
        check_total_steps(hparams.get("total_steps"))

    def theta(self) -> dict[str, Tensor]:
        """θ by name: what :meth:`theta_kwargs` takes (the batched engine passes stacked copies)."""
        return dict(self.named_parameters())

    def _kwargs(self, grads: Sequence[Tensor], state: RuleState, hparams: Mapping[str, Tensor | float]) -> dict[str, Any]:
        theta = {k: v.to(grads[0].dtype) for k, v in self.theta().items()} if grads else self.theta()
        if not self.told_free:  # a told_free run has no schedule to end at the horizon
            warn_past_horizon(self, state[0]["step"], hparams.get("total_steps"),
                              lambda: torch.sigmoid(self.logit_final.detach()) if hasattr(self, "logit_final") else 0.0)
        return self.theta_kwargs(theta, hparams["lr"], hparams.get("total_steps"), schedule_free=self.schedule_free,
                                 told_free=self.told_free)

    def _beta1(self, hparams: Mapping[str, Any]) -> float:
        return float(self.betas[0])

    def with_theta(self, theta: Mapping[str, Tensor]) -> ThetaRule:
        """This rule with θ replaced by ``theta`` (one member of a batched population)."""
        return ThetaRule(theta, schedule_free=self.schedule_free, told_free=self.told_free)

    @classmethod
    def theta_kwargs(cls, theta: Mapping[str, Tensor], lr: Tensor | float, total_steps: int | Tensor | None,
                     *, schedule_free: bool = False, told_free: bool = False) -> dict[str, Any]:
        """:func:`relative_update`'s keyword arguments with θ passed in (tensors: vmappable over θ)."""
        return dict(
            alpha=theta["log_alpha"].exp(), warmup=torch.sigmoid(theta["logit_warmup"]),
            floor=theta["log_floor"].exp(), betas=cls.betas, eps=cls.eps, lr=lr, total_steps=total_steps,
            controller=theta, floor_vec=theta["log_floor_vec"].exp() if "log_floor_vec" in theta else None,
            final=torch.sigmoid(theta["logit_final"]) if "logit_final" in theta else 0.0,
            schedule_free=schedule_free,
            anchor=torch.sigmoid(theta["logit_anchor"]) if "logit_anchor" in theta else None, told_free=told_free,
            decay_start=torch.sigmoid(theta["logit_decay_start"]) if "logit_decay_start" in theta else None,
        )


class ThetaRule:
    """A learned relative Adam whose θ is given (a vmapped population member), for
    :func:`learned_opt.rules.transforms.apply_update`: the engine's runs take the shipped step path."""

    def __init__(self, theta: Mapping[str, Tensor], *, schedule_free: bool = False, told_free: bool = False) -> None:
        self.theta, self.schedule_free, self.told_free = theta, schedule_free, told_free

    def update(self, grads: Sequence[Tensor], params: Sequence[Tensor], state: RuleState,
               hparams: Mapping[str, Any]) -> tuple[list[Tensor], RuleState]:
        return relative_update(grads, params, state, **LearnedRelativeAdamRule.theta_kwargs(
            self.theta, hparams["lr"], hparams.get("total_steps"), schedule_free=self.schedule_free,
            told_free=self.told_free))
