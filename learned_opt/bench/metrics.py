"""The benchmark's measures, defined once: wins, normalised losses, speedups, aggregates.

- **Win** against a baseline: final loss ≤ baseline's + ``WIN_TOLERANCE`` × the task's initial loss,
  so two runs at a noise floor (or at zero) count as even. Over seeds it compares the means of
  final / initial per seed (seeds share initial losses across optimizers), the same normalised
  losses the ratio uses, so a ratio below 1 is always a win. A diverged run never wins; a run beats a
  baseline that diverged.
- **Normalised loss** = loss / initial loss. The ratio to a baseline is
  ``(n + WIN_TOLERANCE) / (n_base + WIN_TOLERANCE)``: never a raw ratio of two tiny numbers.
- **Speedup over tuned Adam** = (steps tuned Adam's mean curve needs to reach this optimizer's mean
  final loss, interpolated between evaluations) ÷ (this optimizer's steps). If Adam does not reach
  it within ``SPEEDUP_CAP`` × the horizon, the speedup is censored: reported as "> 10". No
  tolerance here: a tolerance would let Adam "reach" a better optimizer's loss early.
- **Test loss** (tasks with a held-out split): the same win and ratio on the mean held-out loss at
  the end of training, normalised by the task's initial *training* loss. Training loss alone rewards
  a rule that keeps growing the weights once the data are fitted; the held-out loss shows the model.
- Divergence is flagged and counted; diverged runs are never averaged into losses or ratios.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from learned_opt.bench.runner import RunResult

WIN_TOLERANCE = 1e-4
SPEEDUP_CAP = 10


@dataclass(frozen=True)
class Speedup:
    """A speedup; ``censored`` means "more than ``value``" (Adam never got there)."""

    value: float
    censored: bool = False

    def __str__(self) -> str:
        return f"> {self.value:.3g}" if self.censored else f"{self.value:.3g}"

    def sort_key(self) -> float:
        return math.inf if self.censored else self.value


@dataclass(frozen=True)
class Aggregate:
    """Per task × optimizer summary over seeds (diverged seeds excluded from the means)."""

    n_seeds: int
    n_diverged: int
    initial_mean: float
    final_mean: float  # nan if every seed diverged
    final_std: float
    normalised_mean: float  # mean over seeds of final / initial
    test: dict[str, float]  # mean test metrics over non-diverged seeds

    @property
    def diverged(self) -> bool:
        return self.n_diverged > 0


def aggregate(runs: Sequence[RunResult]) -> Aggregate:
    """Mean and spread of final losses over seeds; diverged runs counted, not averaged."""
    if not runs:
        raise ValueError("aggregate needs at least one run")
    ok = [r for r in runs if not r.diverged]
    finals = [r.final_loss for r in ok]
    test_keys = sorted({k for r in ok if r.test for k in r.test})
    test = {k: float(np.mean([r.test[k] for r in ok if r.test and k in r.test])) for k in test_keys}
    return Aggregate(
        n_seeds=len(runs),
        n_diverged=len(runs) - len(ok),
        initial_mean=float(np.mean([r.initial_loss for r in runs])),
        final_mean=float(np.mean(finals)) if finals else math.nan,
        final_std=float(np.std(finals)) if finals else math.nan,
        normalised_mean=float(np.mean([r.final_loss / r.initial_loss for r in ok])) if ok else math.nan,
        test=test,
    )


def wins(candidate: Aggregate, baseline: Aggregate, tolerance: float = WIN_TOLERANCE) -> bool:
    """Normalised final loss ≤ baseline's + tolerance; divergence loses (or wins, if the baseline's)."""
    if candidate.diverged:
        return False
    if baseline.diverged:
        return True
    return candidate.normalised_mean <= baseline.normalised_mean + tolerance


def _check_paired(candidate: Sequence[RunResult], baseline: Sequence[RunResult]) -> None:
    if [r.seed for r in candidate] != [r.seed for r in baseline]:
        raise ValueError(f"paired runs need the same seeds, got {[r.seed for r in candidate]} and "
                         f"{[r.seed for r in baseline]}")


def paired_seed_wins(candidate: Sequence[RunResult], baseline: Sequence[RunResult],
                     tolerance: float = WIN_TOLERANCE) -> int:
    """Seeds on which the candidate's run wins against the baseline's run of the same seed (same
    initial parameters and batches): the verdict's rule per seed, which shows how much of a task's
    mean verdict is noise. Both lists must hold runs of the same seeds in the same order."""
    _check_paired(candidate, baseline)
    return sum(not c.diverged and (b.diverged or c.final_loss / c.initial_loss <= b.final_loss / b.initial_loss
                                    + tolerance) for c, b in zip(candidate, baseline))


def paired_normalised(candidate: Sequence[RunResult], baseline: Sequence[RunResult]) -> list[list[float]]:
    """Per seed ``[candidate's, baseline's]`` final / initial loss (nan for a diverged run): what
    :func:`ratio_interval` resamples. Both lists must hold runs of the same seeds in the same order."""
    _check_paired(candidate, baseline)
    return [[math.nan if r.diverged else r.final_loss / r.initial_loss for r in pair]
            for pair in zip(candidate, baseline)]


def ratio_interval(tasks: Sequence[Sequence[Sequence[float]]], level: float = 0.9, resamples: int = 2000,
                   seed: int = 0, tolerance: float = WIN_TOLERANCE) -> tuple[float, float] | None:
    """A bootstrap interval of the geometric-mean loss ratio of a pair over tasks.

    Each task's seeds are resampled with replacement, both runs of a seed together (they share initial
    parameters and batches), and the ratio is recomputed from the resampled means as
    :func:`normalised_ratio` does. It measures how much of the pair's verdict is seed noise: an
    interval that holds 1 does not separate the two. To compare two candidates, bootstrap the pair of
    the two directly, not one pair's interval against another's ratio. It is conditional on the
    tasks and the tuned rates, and with 3-5 seeds a percentile bootstrap is too narrow (few distinct
    resamples, variance biased by (n-1)/n): read it as a lower bound on the noise. Tasks with a
    diverged run are left out, as from the ratio; None when none is left. ``seed`` fixes the
    resampling, so a report is reproducible."""
    if not 0 < level < 1:
        raise ValueError(f"invalid level: {level!r} (must be in (0, 1))")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"invalid resamples: {resamples!r} (must be a whole number >= 1)")
    rng = np.random.default_rng(seed)
    logs, used = np.zeros(resamples), 0
    for pairs in tasks:
        arr = np.asarray(pairs, dtype=float).reshape(-1, 2)
        if len(arr) == 0 or not np.isfinite(arr).all():
            continue
        means = arr[rng.integers(0, len(arr), size=(resamples, len(arr)))].mean(axis=1)
        logs += np.log((means[:, 0] + tolerance) / (means[:, 1] + tolerance))
        used += 1
    if used == 0:
        return None
    lo, hi = np.quantile(np.exp(logs / used), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def normalised_ratio(candidate: Aggregate, baseline: Aggregate, tolerance: float = WIN_TOLERANCE) -> float:
    """(normalised loss + tol) / (baseline's + tol); nan when either diverged (never averaged)."""
    if candidate.diverged or baseline.diverged:
        return math.nan
    return (candidate.normalised_mean + tolerance) / (baseline.normalised_mean + tolerance)


def test_loss_verdict(candidate: Aggregate, baseline: Aggregate,
                      tolerance: float = WIN_TOLERANCE) -> tuple[bool, float] | None:
    """(win, ratio) on the held-out loss, both normalised by the baseline's initial training loss;
    None without a held-out loss or where either diverged."""
    if candidate.diverged or baseline.diverged:
        return None
    a, b = candidate.test.get("test_loss"), baseline.test.get("test_loss")
    if a is None or b is None:
        return None
    floor = tolerance * baseline.initial_mean
    return a <= b + floor, (a + floor) / (b + floor)


def mean_curve(runs: Sequence[RunResult]) -> tuple[list[int], list[float]]:
    """Mean loss over seeds at each evaluated step; a diverged seed counts as +inf from where it stopped."""
    finished = [r for r in runs if not r.diverged] or list(runs)
    grid = max(finished, key=lambda r: len(r.steps)).steps
    rows = []
    for r in runs:
        if not r.diverged and r.steps != grid:
            raise ValueError("runs were evaluated at different steps; cannot average their curves")
        at = dict(zip(r.steps, r.losses))
        last = r.steps[-1] if r.diverged else math.inf
        rows.append([at[s] if s in at and s < last and math.isfinite(at[s]) else math.inf for s in grid])
    return list(grid), [float(x) for x in np.mean(np.array(rows), axis=0)]


def steps_to_reach(steps: Sequence[int], losses: Sequence[float], target: float) -> float | None:
    """First (linearly interpolated) step at which ``losses`` falls to ``target``; None if never."""
    for i, (step, loss) in enumerate(zip(steps, losses)):
        if loss <= target:
            if i == 0:
                return float(step)
            prev_step, prev_loss = steps[i - 1], losses[i - 1]
            if not math.isfinite(prev_loss):
                return float(step)
            frac = (prev_loss - target) / (prev_loss - loss)
            return float(prev_step + frac * (step - prev_step))
    return None


def speedup(
    target_loss: float,
    horizon: int,
    adam_steps: Sequence[int],
    adam_losses: Sequence[float],
    initial_loss: float,
    *,
    cap: float = SPEEDUP_CAP,
    tolerance: float = 0.0,
) -> Speedup:
    """Steps Adam needs to reach ``target_loss`` (+ tolerance × initial), divided by ``horizon``.

    ``adam_steps``/``adam_losses`` must cover ``cap × horizon`` steps for an uncensored answer
    beyond the horizon; a curve that stops earlier without reaching the target yields a censored
    speedup at the ratio it covers.
    """
    if horizon <= 0:
        raise ValueError(f"horizon must be positive, got {horizon}")
    if not math.isfinite(target_loss):
        raise ValueError(f"speedup of a diverged run is undefined (target loss {target_loss})")
    reached = steps_to_reach(adam_steps, adam_losses, target_loss + tolerance * abs(initial_loss))
    if reached is None or reached > cap * horizon:
        return Speedup(min(cap, adam_steps[-1] / horizon), censored=True)
    return Speedup(reached / horizon)


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of the finite positive values (nan if none)."""
    ok = [v for v in values if math.isfinite(v) and v > 0]
    return float(math.exp(statistics.fmean(math.log(v) for v in ok))) if ok else math.nan


def median_speedup(values: Sequence[Speedup]) -> Speedup | None:
    """Median with censored values ordered above every uncensored one; censored if it lands on one."""
    if not values:
        return None
    ordered = sorted(values, key=Speedup.sort_key)
    n = len(ordered)
    lo, hi = ordered[(n - 1) // 2], ordered[n // 2]
    if hi.censored:  # "> x": both middle values censored, or the mean of a value and a bound
        return hi if lo.censored else Speedup((lo.value + hi.value) / 2, censored=True)
    return Speedup((lo.value + hi.value) / 2)
