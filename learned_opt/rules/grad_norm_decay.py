"""Gradient-norm-triggered learning-rate decay: the seeds' ``if ||g|| < threshold: lr *= decay``.

The step is ``-lr × init_lr × f_t × d_t``, with ``d_t`` the rule's direction (SGD with optional
heavy-ball momentum, or Adam's ``m̂/(sqrt(v̂)+eps)``) and ``f_t`` the adapted factor (group state
``lr_factor``, starting at 1). The factor decays by ``decay`` at a step that *fires*::

    below_t = ||g_t|| < threshold × ref_t      (relative=True; absolute: ||g_t|| < threshold)
    fires   = below for ``patience`` steps in a row, and no firing in the last ``cooldown`` steps
    f_t     = f_{t-1} × decay when it fires

``relative=True`` makes the rule scale-free: ``threshold`` is a fraction ρ of the run's own
gradient scale, the reference ``ref`` being the group's gradient norm at its first step and, after
each firing, the norm at that firing (so every further decay needs the norm to fall by another
factor ρ: a decay-on-plateau rule in gradient-norm units). ``relative=False`` is the seeds' literal
rule in gradient units; with ``patience=1, cooldown=0`` it fires at every step below the threshold.
The decay is applied at the step that fires.

Four settings change the trigger (their defaults are the rule above, which older weights cards ran):

- ``reference="peak"``: the reference is the largest norm since the start or the last firing, not
  the first norm. Networks' gradient norms often grow for a while after initialisation, so a test
  against the first norm may never pass.
- ``smoothing`` β: the test (and the reference) read the running average
  ``n_t = β n_{t-1} + (1-β) ||g_t||`` instead of the raw minibatch norm, which is noisy.
- ``plateau=True`` (narrows it): a step counts as below only if its tested norm is no new low (not
  below the lowest since the start or the last firing; the first step is always a new low), so
  ``patience`` counts steps without progress and the rule decays on a plateau, not while the norm is
  still falling. Plain gradient descent on a deterministic problem (a quadratic, full-batch
  regression), whose norm falls step after step, then keeps its rate, while a minibatch norm that has
  settled on its noise floor still fires. Heavy-ball momentum makes a quadratic's norm oscillate, so
  there the test still sees stalls and fires. The lowest norm is group state ``norm_best``, tracked
  whether or not the option is on (so switching it on mid-run is exact); any firing, a blow-up's
  included, restarts it at that step's norm.
- ``blowup`` κ > 1 (0 = off): a norm above κ × the previous average fires at once, whatever the
  patience and cool-down; the norm enters the average as any other. A run that starts to diverge,
  its norm outgrowing its own average step after step, has its rate cut at each such step. A norm
  that jumps by r to a level that holds fires until the average has caught up: once when
  κ(1-β) ≥ 1, a few times under heavy smoothing (r = 10 at β 0.9, κ 3: three times). A first-norm
  reference is left as it was; a peak reference takes the spike's average like any other, so a
  transient spike can raise the peak and bring a plateau firing later. ``blowup_recovery`` r > 1
  gives the blow-up's cuts (not the plateau's decays) back by up to r per step without a spike
  (:mod:`learned_opt.rules.blowup`; group state ``guard_debt``).

``soft=True`` relaxes the threshold test for gradient-based meta-training: the firing weight is
``σ((log(threshold·ref) - log n_t) / temperature)`` (tends to the exact test as the temperature
goes to 0), gated by the exact patience/cool-down counters of the previous steps (which count
steps whose weight was above 1/2);
the factor moves by ``1 - weight (1 - decay)`` and the reference towards ``n_t`` by the weight.
The blow-up test and the plateau gate stay exact in soft mode (a step with a new low passes
weight 0, and no meta-gradient to the threshold).

Group state: ``lr_factor``, ``decay_count`` (firings; with ``soft`` the sum of the weights),
``first_decay_step`` (the step of the first firing, 0 while it has not fired), ``step``,
``ref_norm``, ``norm_avg`` (the tested norm ``n_t``), ``norm_best`` (its lowest since the start or
the last firing), ``below`` (consecutive steps below) and ``cooldown_left``. Per parameter: the
direction's state (a momentum buffer when momentum is non-zero; Adam's moments).

Rule defaults are the seeds' rule (a card without ``relative`` was trained as it); the public
optimizers default to the relative form with :data:`RELATIVE_DEFAULTS`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.rules.base import RuleState, check_bool, check_count, check_nonnegative, check_number, scalar_like
from learned_opt.rules.blowup import check_blowup, norm_average, settle, spike
from learned_opt.rules.directions import adam_direction, group_norm, momentum_direction
from learned_opt.rules.hparam_base import HyperparameterRule, log_param, logit_param
from learned_opt.rules.transforms import absolute_rate

# The public optimizers' defaults per form (relative, or the seeds' absolute rule). ρ = 0.3: on noisy
# least squares (3 seeds, 300 steps) ρ = 0.1 rarely fired, 0.3 and 0.5 beat constant SGD/Adam at the
# same rate on every seed (0.5 most); 0.3 decays less on deterministic problems. plateau: on the
# held-out validation seeds (tuned initial lr) it raised wins over tuned SGD from 8/14 to 10/14 (it
# no longer decays on the quadratics) and kept the momentum and Adam pairs' (docs/ablations.md).
RELATIVE_DEFAULTS: dict[str, Any] = {"threshold": 0.3, "decay": 0.5, "patience": 5, "cooldown": 10,
                                     "reference": "first", "smoothing": 0.0, "blowup": 0.0, "plateau": True}
ABSOLUTE_DEFAULTS: dict[str, Any] = {"threshold": 1e-3, "decay": 0.9, "patience": 1, "cooldown": 0,
                                     "reference": "first", "smoothing": 0.0, "blowup": 0.0, "plateau": False}
REFERENCES = ("first", "peak")
STATE_KEYS = ("lr_factor", "decay_count", "first_decay_step", "step", "ref_norm", "norm_avg", "below", "cooldown_left",
              "norm_best")


def firing(norm: Tensor, group_state: Mapping[str, Tensor], hparams: Mapping[str, Any], soft: bool,
           temperature: float) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
    """``(weight, new group state, spiked)`` of one step's trigger (module docstring); weight 1
    fires; ``spiked`` (None with the blow-up trigger off) whether the blow-up fired."""
    step = group_state["step"] + 1
    first = step == 1
    prev_avg = group_state.get("norm_avg", norm)
    avg = norm_average(norm, prev_avg, first, float(hparams.get("smoothing", 0.0)))
    spiked = spike(norm, prev_avg, first, float(hparams.get("blowup", 0.0)))
    ref = torch.where(first, avg.detach(), group_state["ref_norm"])
    if hparams.get("reference", "first") == "peak":
        ref = torch.maximum(ref, avg.detach())
    threshold = hparams["threshold"] * ref if hparams.get("relative", False) else hparams["threshold"]
    if soft:
        tiny = torch.finfo(norm.dtype).tiny
        log_threshold = torch.log(scalar_like(threshold, norm).clamp_min(tiny))
        test = torch.sigmoid((log_threshold - avg.clamp_min(tiny).log()) / temperature)
    else:
        test = (avg < threshold).to(norm.dtype)
    # the lowest tested norm so far (+inf before the first step, and for a state saved without it)
    best = torch.where(first, math.inf, group_state.get("norm_best", torch.full_like(avg, math.inf))).detach()
    if hparams.get("plateau", False):  # only a step that is no new low counts
        test = test * (avg.detach() >= best)
    best = torch.minimum(best, avg.detach())
    # this step's (relaxed) test, where the previous patience - 1 steps were below and no cool-down runs
    ready = (group_state["below"] >= hparams.get("patience", 1) - 1) & (group_state["cooldown_left"] <= 0)
    weight = torch.where(ready, test, 0.0)
    below = torch.where(test.detach() > 0.5, group_state["below"] + 1, 0.0)
    new_ref = ref + weight * (avg - ref)
    if spiked is not None:  # a blow-up fires, and leaves the reference as it was
        weight = torch.where(spiked, 1.0, weight)
        new_ref = torch.where(spiked, ref, new_ref)
    fired = weight.detach() > 0.5
    cooldown = scalar_like(float(hparams.get("cooldown", 0)), norm)
    new_state = {
        "step": step,
        "ref_norm": new_ref,
        "norm_avg": avg,
        "below": torch.where(fired, 0.0, below),
        "cooldown_left": torch.where(fired, cooldown, (group_state["cooldown_left"] - 1).clamp_min(0.0)),
        "decay_count": group_state["decay_count"] + weight,
        "norm_best": torch.where(fired, avg.detach(), best),
        "first_decay_step": torch.where(fired & (group_state["first_decay_step"] == 0), step,
                                        group_state["first_decay_step"]),
    }
    return weight, new_state, spiked


class GradNormDecayRule(HyperparameterRule):
    """The decay on SGD (heavy-ball) directions. θ: log initial lr, logit decay, log threshold;
    momentum, ``relative``, patience, cool-down, ``reference``, smoothing and blow-up are fixed
    config values."""

    name: ClassVar[str] = "grad-norm-decay-sgd"
    hyperparameters: ClassVar[dict[str, Any]] = {
        "lr": 1.0, "init_lr": 0.1, "decay": 0.9, "threshold": 1e-3, "relative": False, "patience": 1, "cooldown": 0,
        "reference": "first", "smoothing": 0.0, "blowup": 0.0, "blowup_recovery": 1.0, "momentum": 0.0,
        "plateau": False,
    }
    added_keys: ClassVar[frozenset[str]] = frozenset({"reference", "smoothing", "blowup", "norm_avg", "blowup_recovery",
                                                      "guard_debt", "plateau", "norm_best"})

    def __init__(
        self,
        init_lr: float = 0.1,
        init_decay: float = ABSOLUTE_DEFAULTS["decay"],
        init_threshold: float = ABSOLUTE_DEFAULTS["threshold"],
        momentum: float = 0.0,
        soft: bool = False,
        temperature: float = 0.1,
        relative: bool = False,
        patience: int = 1,
        cooldown: int = 0,
        reference: str = "first",
        smoothing: float = 0.0,
        blowup: float = 0.0,
        blowup_recovery: float = 1.0,
        plateau: bool = False,
    ) -> None:
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"invalid temperature: {temperature!r} (must be > 0)")
        self.log_lr = log_param(init_lr, "init_lr")
        self.logit_decay = logit_param(init_decay, "init_decay")
        self.log_threshold = log_param(init_threshold, "init_threshold")
        self.soft = check_bool("soft", soft)
        self.temperature = float(temperature)
        self.fixed: dict[str, Any] = {"relative": check_bool("relative", relative), "patience": patience,
                                      "cooldown": cooldown, "reference": reference, "smoothing": smoothing,
                                      "blowup": blowup, "blowup_recovery": float(blowup_recovery),
                                      "momentum": float(momentum), "plateau": check_bool("plateau", plateau)}
        self.validate_hparams(self.fixed)

    def config(self) -> dict[str, Any]:
        return {
            "init_lr": float(self.log_lr.detach().exp()),
            "init_decay": float(torch.sigmoid(self.logit_decay.detach())),
            "init_threshold": float(self.log_threshold.detach().exp()),
            "soft": self.soft,
            "temperature": self.temperature,
            **self.fixed,
        }

    def meta_hparams(self) -> dict[str, Tensor | float]:
        return {
            "init_lr": self.log_lr.exp(),
            "decay": torch.sigmoid(self.logit_decay),
            "threshold": self.log_threshold.exp(),
            **self.fixed,
        }

    def validate_hparams(self, hparams: Mapping[str, Any]) -> None:
        super().validate_hparams(hparams)
        if "decay" in hparams and not (0.0 < check_number("decay", hparams["decay"]) <= 1.0):
            raise ValueError(f"invalid decay: {hparams['decay']!r} (must be in (0, 1])")
        check_nonnegative("threshold", hparams.get("threshold", 0.0))
        check_count("patience", hparams.get("patience", 1), 1)
        check_count("cooldown", hparams.get("cooldown", 0), 0)
        if hparams.get("reference", "first") not in REFERENCES:
            raise ValueError(f"invalid reference: {hparams['reference']!r} (must be one of {REFERENCES})")
        check_blowup(hparams)
        check_bool("plateau", hparams.get("plateau", False))
        if hparams.get("reference") == "peak" and hparams.get("relative") is False:
            raise ValueError("invalid reference: 'peak' (needs relative=True: the absolute rule has no reference)")

    def init_state(self, params: Sequence[Tensor]) -> RuleState:
        like = params[0] if params else torch.zeros(())
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        group = {key: zero.clone() for key in STATE_KEYS}
        group["lr_factor"] = zero + 1
        group["guard_debt"] = zero + 1
        group["norm_best"] = zero + math.inf
        return group, [self._init_direction(p) for p in params]

    def _init_direction(self, p: Tensor) -> dict[str, Tensor]:
        return {}

    def _direction(self, g: Tensor, st: Mapping[str, Tensor], step: Tensor,
                   hparams: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``(d_t, new per-parameter state)``."""
        direction, buf = momentum_direction(g, st.get("momentum_buffer"), hparams.get("momentum", 0.0))
        return direction, {} if buf is None else {"momentum_buffer": buf}

    def update(
        self,
        grads: Sequence[Tensor],
        params: Sequence[Tensor],
        state: RuleState,
        hparams: Mapping[str, Tensor | float],
    ) -> tuple[list[Tensor], RuleState]:
        group_state, per_param = state
        weight, new_group, spiked = firing(group_norm(grads), group_state, hparams, self.soft, self.temperature)
        factor = group_state["lr_factor"] * (1 - weight * (1 - hparams["decay"]))
        recovery = float(hparams.get("blowup_recovery", 1.0))
        if spiked is not None and recovery > 1:  # blow-up cuts are given back; plateau decays are kept
            give, new_group["guard_debt"] = settle(spiked, group_state.get("guard_debt", torch.ones_like(factor)),
                                                   hparams["decay"], recovery)
            factor = torch.where(spiked, factor, factor * give)  # the firing weight already made the cut
        rate = absolute_rate(hparams) * factor
        updates, new_per_param = [], []
        for g, st in zip(grads, per_param):
            direction, new_st = self._direction(g, st, new_group["step"], hparams)
            updates.append(direction * -rate)
            new_per_param.append(new_st)
        return updates, ({**group_state, **new_group, "lr_factor": factor}, new_per_param)


class GradNormDecayAdamRule(GradNormDecayRule):
    """The decay on Adam directions. θ: log initial lr, logit decay, log threshold; betas, eps and
    the trigger's settings are fixed config values."""

    name: ClassVar[str] = "grad-norm-decay-adam"
    hyperparameters: ClassVar[dict[str, Any]] = {
        "lr": 1.0, "init_lr": 1e-3, "decay": 0.9, "threshold": 1e-3, "relative": False, "patience": 1, "cooldown": 0,
        "reference": "first", "smoothing": 0.0, "blowup": 0.0, "blowup_recovery": 1.0, "betas": (0.9, 0.999),
        "eps": 1e-8, "plateau": False,
    }

    def __init__(
        self,
        init_lr: float = 1e-3,
        init_decay: float = ABSOLUTE_DEFAULTS["decay"],
        init_threshold: float = ABSOLUTE_DEFAULTS["threshold"],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        soft: bool = False,
        temperature: float = 0.1,
        relative: bool = False,
        patience: int = 1,
        cooldown: int = 0,
        reference: str = "first",
        smoothing: float = 0.0,
        blowup: float = 0.0,
        blowup_recovery: float = 1.0,
        plateau: bool = False,
    ) -> None:
        super().__init__(init_lr, init_decay, init_threshold, 0.0, soft, temperature, relative, patience, cooldown,
                         reference, smoothing, blowup, blowup_recovery, plateau)
        del self.fixed["momentum"]
        self.fixed.update(betas=tuple(betas), eps=float(eps))
        self.validate_hparams(self.fixed)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "betas": list(self.fixed["betas"])}

    def _init_direction(self, p: Tensor) -> dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def _direction(self, g: Tensor, st: Mapping[str, Tensor], step: Tensor,
                   hparams: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        direction, m, v = adam_direction(g, st["exp_avg"], st["exp_avg_sq"], step, hparams["betas"], hparams["eps"])
        return direction, {"exp_avg": m, "exp_avg_sq": v}
