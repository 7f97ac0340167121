"""Meta-gradient estimators behind one interface: truncated BPTT, antithetic ES and PES.

An estimator advances one :class:`~learned_opt.meta.unroll.InnerRun` by one truncation and returns
the truncation's meta-loss and an estimate of its gradient with respect to the rule's parameters θ.
The training loop only calls :meth:`GradientEstimator.estimate`; whatever an estimator needs to
carry between truncations lives in ``run.extra`` (checkpointed with the run).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.meta.losses import MetaLoss
from learned_opt.meta.unroll import InnerRun, UnrollOutput, detach_state, unroll
from learned_opt.rules.base import Rule


@dataclass
class Estimate:
    """One truncation's meta-loss (detached scalar), gradient estimate (one tensor per θ tensor,
    in ``rule.parameters()`` order) and the number of optimizee steps the run advanced."""

    meta_loss: Tensor
    grads: list[Tensor]
    steps: int


class GradientEstimator(abc.ABC):
    """Turns truncations of inner runs into meta-gradients."""

    name: ClassVar[str] = ""

    def config(self) -> dict[str, Any]:
        """JSON-able constructor kwargs (recorded in checkpoints and weight cards)."""
        return {}

    @abc.abstractmethod
    def estimate(self, rule: Rule, run: InnerRun, steps: int, objective: MetaLoss, noise: torch.Generator) -> Estimate:
        """Advance ``run`` by ``steps`` optimizee steps and estimate d(meta-loss)/dθ.

        ``noise`` is the only source of randomness an estimator may use (ES/PES perturbations).
        """


def _zeros_like_theta(rule: Rule) -> list[Tensor]:
    return [torch.zeros_like(p) for p in rule.parameters()]


def _initial(run: InnerRun, out: UnrollOutput) -> Tensor:
    return run.initial_loss if run.initial_loss is not None else out.first_loss


class TruncatedBPTT(GradientEstimator):
    """Backpropagation through one truncation; ``second_order`` also differentiates through the
    optimizee gradients (the paper drops those: first-order)."""

    name: ClassVar[str] = "bptt"

    def __init__(self, second_order: bool = False) -> None:
        self.second_order = bool(second_order)

    def config(self) -> dict[str, Any]:
        return {"second_order": self.second_order}

    def estimate(self, rule: Rule, run: InnerRun, steps: int, objective: MetaLoss, noise: torch.Generator) -> Estimate:
        data = run.draw_data(steps, heldout=objective.kind == "heldout")
        mode = "second" if self.second_order else "first"
        out = unroll(rule, run.task, run.params, run.state, data, mode=mode, track_losses=objective.kind == "mean")
        loss = objective(out.losses, out.heldout, steps, _initial(run, out))
        theta = list(rule.parameters())
        if loss.requires_grad:
            raw = torch.autograd.grad(loss, theta, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(theta, raw)]
        else:
            grads = _zeros_like_theta(rule)
        run.advance(out, steps)
        return Estimate(loss.detach(), grads, steps)


@contextmanager
def perturbed(rule: Rule, deltas: Sequence[Tensor]) -> Iterator[None]:
    """Temporarily set θ to θ + deltas (restored bit for bit afterwards)."""
    params = list(rule.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def sample_noise(rule: Rule, noise: torch.Generator) -> list[Tensor]:
    """Standard normal directions shaped like θ, drawn from the CPU generator ``noise``."""
    return [torch.randn(p.shape, generator=noise, dtype=p.dtype).to(p.device) for p in rule.parameters()]


class _PerturbationEstimator(GradientEstimator):
    """Shared settings of the evolution-strategies estimators: ``sigma`` (perturbation scale) and
    ``pairs`` (antithetic pairs per truncation)."""

    def __init__(self, sigma: float = 0.01, pairs: int = 1) -> None:
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"invalid es_sigma: {sigma!r} (must be > 0)")
        if not (isinstance(pairs, int) and pairs >= 1):
            raise ValueError(f"invalid es_pairs: {pairs!r} (must be an int >= 1)")
        self.sigma = float(sigma)
        self.pairs = pairs

    def config(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "pairs": self.pairs}

    def _score(self, rule: Rule, run: InnerRun, start: dict[str, Any], data: Any, delta: list[Tensor],
               steps: int, objective: MetaLoss) -> tuple[Tensor, UnrollOutput]:
        with perturbed(rule, delta):
            out = unroll(rule, run.task, start["params"], start["state"], data, mode="none")
        return objective(out.losses, out.heldout, steps, _initial(run, out)), out


class AntitheticES(_PerturbationEstimator):
    """Antithetic evolution strategies over one truncation: the gradient of the Gaussian-smoothed
    truncation loss, ``E[ε (L(θ+σε) − L(θ−σε))] / 2σ``. The run itself advances with the unperturbed θ."""

    name: ClassVar[str] = "es"

    def estimate(self, rule: Rule, run: InnerRun, steps: int, objective: MetaLoss, noise: torch.Generator) -> Estimate:
        data = run.draw_data(steps, heldout=objective.kind == "heldout")
        start = {"params": run.params, "state": run.state}
        grads = _zeros_like_theta(rule)
        for _ in range(self.pairs):
            eps = sample_noise(rule, noise)
            plus, _ = self._score(rule, run, start, data, [self.sigma * e for e in eps], steps, objective)
            minus, _ = self._score(rule, run, start, data, [-self.sigma * e for e in eps], steps, objective)
            coef = (plus - minus) / (2 * self.sigma * self.pairs)
            grads = [g + coef * e for g, e in zip(grads, eps)]
        center = unroll(rule, run.task, run.params, run.state, data, mode="none")
        loss = objective(center.losses, center.heldout, steps, _initial(run, center))
        run.advance(center, steps)
        return Estimate(loss.detach(), grads, steps)


class PES(_PerturbationEstimator):
    """Persistent evolution strategies (Vicol et al., 2021), antithetic.

    Each pair keeps its own ± trajectories for the whole inner run and accumulates its
    perturbations ``ξ = Σ ε``; a truncation's estimate ``ξ (L₊ − L₋) / 2σ`` is then unbiased for the
    gradient of that truncation's loss through the *entire* run so far, not just the truncation.
    """

    name: ClassVar[str] = "pes"

    def _start(self, rule: Rule, run: InnerRun) -> None:
        run.extra = {
            "particles": [
                [{"params": list(run.params), "state": run.state} for _sign in (1, -1)] for _ in range(self.pairs)
            ],
            "xi": [_zeros_like_theta(rule) for _ in range(self.pairs)],
        }

    def estimate(self, rule: Rule, run: InnerRun, steps: int, objective: MetaLoss, noise: torch.Generator) -> Estimate:
        if not run.extra:
            self._start(rule, run)
        if len(run.extra["particles"]) != self.pairs:
            raise ValueError(f"run holds {len(run.extra['particles'])} PES pairs, estimator has {self.pairs}")
        data = run.draw_data(steps, heldout=objective.kind == "heldout")
        grads = _zeros_like_theta(rule)
        total = torch.zeros(())
        lead: UnrollOutput | None = None
        for pair, xi in zip(run.extra["particles"], run.extra["xi"]):
            eps = sample_noise(rule, noise)
            xi[:] = [x + e for x, e in zip(xi, eps)]
            scores = []
            for k, sign in enumerate((1.0, -1.0)):
                score, out = self._score(rule, run, pair[k], data, [sign * self.sigma * e for e in eps], steps, objective)
                pair[k] = {"params": [p.detach() for p in out.params], "state": detach_state(out.state)}
                run.diverged = run.diverged or out.diverged
                scores.append(score)
                lead = lead or out
            coef = (scores[0] - scores[1]) / (2 * self.sigma * self.pairs)
            grads = [g + coef * x for g, x in zip(grads, xi)]
            total = total + (scores[0] + scores[1]).detach().cpu() / (2 * self.pairs)
        assert lead is not None
        run.advance(lead, steps)
        return Estimate(total, grads, steps)


ESTIMATORS: dict[str, type[GradientEstimator]] = {cls.name: cls for cls in (TruncatedBPTT, AntitheticES, PES)}


def build_estimator(name: str, *, second_order: bool = False, sigma: float = 0.01, pairs: int = 1) -> GradientEstimator:
    """The estimator called ``name`` with the settings that apply to it."""
    if name == "bptt":
        return TruncatedBPTT(second_order=second_order)
    if name in ("es", "pes"):
        return ESTIMATORS[name](sigma=sigma, pairs=pairs)
    raise ValueError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}")
