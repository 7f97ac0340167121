"""Meta-gradient estimators behind one interface: truncated BPTT, antithetic ES and PES.

Every estimator goes through one protocol, :meth:`GradientEstimator.estimate`: draw the
truncation's batches from the run, unroll and score from the run's current point
(:meth:`GradientEstimator.step`, the one method an estimator implements), advance the run to the
end point. ``step`` is pure: it reads the run and the estimator's typed per-run state and returns
the estimate, the end point and the new state, changing neither. The state (None for BPTT and ES,
a :class:`PESState` for PES) is kept on the run it belongs to (``run.estimator_state``) and
checkpointed with it through :meth:`GradientEstimator.state_tree` / :meth:`GradientEstimator.load_state`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from learned_opt.meta.losses import MetaLoss
from learned_opt.meta.unroll import InnerRun, TruncationData, UnrollOutput, detach_state, unroll
from learned_opt.rules.base import Rule, RuleState


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

    def init_state(self, rule: Rule, run: InnerRun) -> Any:
        """The estimator's state for a run it has not advanced yet (None: stateless)."""
        return None

    @abc.abstractmethod
    def step(self, rule: Rule, run: InnerRun, data: TruncationData, objective: MetaLoss, noise: torch.Generator,
             state: Any) -> tuple[Estimate, UnrollOutput, Any]:
        """Unroll and score one truncation on ``data`` from the run's current point: (the estimate,
        the end point the run advances to, the new state). Changes neither ``run`` nor ``state``.

        ``noise`` is the only source of randomness an estimator may use (ES/PES perturbations).
        """

    def estimate(self, rule: Rule, run: InnerRun, steps: int, objective: MetaLoss, noise: torch.Generator) -> Estimate:
        """Advance ``run`` by ``steps`` optimizee steps and estimate d(meta-loss)/dθ: draw → :meth:`step` → advance."""
        data = run.draw_data(steps, heldout=objective.kind == "heldout")
        state = run.estimator_state if run.estimator_state is not None else self.init_state(rule, run)
        est, end, state = self.step(rule, run, data, objective, noise, state)
        run.advance(end, steps)
        run.estimator_state = state
        return est

    def state_tree(self, state: Any) -> dict[str, Any]:
        """``state`` as a checkpointable tree of dicts, lists and tensors (``{}`` for None)."""
        return {}

    def load_state(self, tree: Mapping[str, Any]) -> Any:
        """Inverse of :meth:`state_tree`."""
        return None


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

    def step(self, rule: Rule, run: InnerRun, data: TruncationData, objective: MetaLoss, noise: torch.Generator,
             state: None) -> tuple[Estimate, UnrollOutput, None]:
        steps = len(data.batches)
        mode = "second" if self.second_order else "first"
        out = unroll(rule, run.task, run.params, run.state, data, mode=mode, track_losses=objective.kind == "mean")
        loss = objective(out.losses, out.heldout, steps, _initial(run, out))
        theta = list(rule.parameters())
        if loss.requires_grad:
            raw = torch.autograd.grad(loss, theta, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(theta, raw)]
        else:
            grads = _zeros_like_theta(rule)
        return Estimate(loss.detach(), grads, steps), out, None


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

    def _score(self, rule: Rule, run: InnerRun, start: Trajectory, data: TruncationData, delta: list[Tensor],
               objective: MetaLoss) -> tuple[Tensor, UnrollOutput]:
        """The meta-loss of θ + ``delta`` unrolled on ``data`` from ``start`` (no graph), and the unroll."""
        with perturbed(rule, delta):
            out = unroll(rule, run.task, start.params, start.state, data, mode="none")
        return objective(out.losses, out.heldout, len(data.batches), _initial(run, out)), out


@dataclass(frozen=True)
class Trajectory:
    """A point of an inner run: its parameters and rule state (detached)."""

    params: list[Tensor]
    state: RuleState

    def tree(self) -> dict[str, Any]:
        return {"params": self.params, "state": self.state}


class AntitheticES(_PerturbationEstimator):
    """Antithetic evolution strategies over one truncation: the gradient of the Gaussian-smoothed
    truncation loss, ``E[ε (L(θ+σε) − L(θ−σε))] / 2σ``. The run itself advances with the unperturbed θ."""

    name: ClassVar[str] = "es"

    def step(self, rule: Rule, run: InnerRun, data: TruncationData, objective: MetaLoss, noise: torch.Generator,
             state: None) -> tuple[Estimate, UnrollOutput, None]:
        steps = len(data.batches)
        start = Trajectory(run.params, run.state)
        grads = _zeros_like_theta(rule)
        for _ in range(self.pairs):
            eps = sample_noise(rule, noise)
            plus, _ = self._score(rule, run, start, data, [self.sigma * e for e in eps], objective)
            minus, _ = self._score(rule, run, start, data, [-self.sigma * e for e in eps], objective)
            coef = (plus - minus) / (2 * self.sigma * self.pairs)
            grads = [g + coef * e for g, e in zip(grads, eps)]
        center = unroll(rule, run.task, run.params, run.state, data, mode="none")
        loss = objective(center.losses, center.heldout, steps, _initial(run, center))
        return Estimate(loss.detach(), grads, steps), center, None


@dataclass(frozen=True)
class PESPair:
    """One antithetic pair of PES: its + and − trajectories and its accumulated perturbation ξ = Σ ε."""

    plus: Trajectory
    minus: Trajectory
    xi: list[Tensor]


@dataclass(frozen=True)
class PESState:
    """PES's state for one inner run: one :class:`PESPair` per antithetic pair."""

    pairs: tuple[PESPair, ...]


class PES(_PerturbationEstimator):
    """Persistent evolution strategies (Vicol et al., 2021), antithetic.

    Each pair keeps its own ± trajectories for the whole inner run and accumulates its
    perturbations ``ξ = Σ ε``; a truncation's estimate ``ξ (L₊ − L₋) / 2σ`` is then unbiased for the
    gradient of that truncation's loss through the *entire* run so far, not just the truncation.
    The run advances along the first pair's + trajectory, and is diverged when any trajectory is.
    """

    name: ClassVar[str] = "pes"

    def init_state(self, rule: Rule, run: InnerRun) -> PESState:
        start = Trajectory(list(run.params), run.state)
        return PESState(tuple(PESPair(start, start, _zeros_like_theta(rule)) for _ in range(self.pairs)))

    def step(self, rule: Rule, run: InnerRun, data: TruncationData, objective: MetaLoss, noise: torch.Generator,
             state: PESState) -> tuple[Estimate, UnrollOutput, PESState]:
        if len(state.pairs) != self.pairs:
            raise ValueError(f"run holds {len(state.pairs)} PES pairs, estimator has {self.pairs}")
        grads = _zeros_like_theta(rule)
        total = torch.zeros(())
        pairs, ends = [], []
        for pair in state.pairs:
            eps = sample_noise(rule, noise)
            xi = [x + e for x, e in zip(pair.xi, eps)]
            scores, points = [], []
            for sign, start in ((1.0, pair.plus), (-1.0, pair.minus)):
                score, out = self._score(rule, run, start, data, [sign * self.sigma * e for e in eps], objective)
                scores.append(score)
                points.append(Trajectory([p.detach() for p in out.params], detach_state(out.state)))
                ends.append(out)
            pairs.append(PESPair(points[0], points[1], xi))
            coef = (scores[0] - scores[1]) / (2 * self.sigma * self.pairs)
            grads = [g + coef * x for g, x in zip(grads, xi)]
            total = total + (scores[0] + scores[1]).detach().cpu() / (2 * self.pairs)
        end = replace(ends[0], diverged=any(out.diverged for out in ends))
        return Estimate(total, grads, len(data.batches)), end, PESState(tuple(pairs))

    def state_tree(self, state: PESState | None) -> dict[str, Any]:
        if state is None:
            return {}
        return {"particles": [[pair.plus.tree(), pair.minus.tree()] for pair in state.pairs],
                "xi": [pair.xi for pair in state.pairs]}

    def load_state(self, tree: Mapping[str, Any]) -> PESState | None:
        if not tree:
            return None
        point = lambda t: Trajectory(list(t["params"]), t["state"])  # noqa: E731
        return PESState(tuple(PESPair(point(plus), point(minus), list(xi))
                              for (plus, minus), xi in zip(tree["particles"], tree["xi"])))


ESTIMATORS: dict[str, type[GradientEstimator]] = {cls.name: cls for cls in (TruncatedBPTT, AntitheticES, PES)}


def build_estimator(name: str, *, second_order: bool = False, sigma: float = 0.01, pairs: int = 1) -> GradientEstimator:
    """The estimator called ``name`` with the settings that apply to it."""
    if name == "bptt":
        return TruncatedBPTT(second_order=second_order)
    if name in ("es", "pes"):
        return ESTIMATORS[name](sigma=sigma, pairs=pairs)
    raise ValueError(f"unknown estimator {name!r}; choose from {sorted(ESTIMATORS)}")
