"""Learning-rate tuning on a log grid (1e-4 … 1 in half-decade steps), extended past its edges.

Grid points are ``10 ** (k / 2)`` for integer k, so extensions land on the same lattice and the
grid holds 1e-3 exactly (the Adam(lr=1e-3) reference reuses that run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

GRID_LOW, GRID_HIGH = -8, 0  # half-decade exponents: 1e-4 … 1
MAX_EXTENSION = 8  # at most four decades past either edge


def grid_lr(k: int) -> float:
    """The k-th half-decade learning rate, 10 ** (k / 2) (exact for even k)."""
    return 10.0 ** (k // 2) if k % 2 == 0 else 10.0 ** (k / 2)


@dataclass
class TuneResult:
    """The chosen lr, every lr tried with its score (lower is better; inf = diverged), extensions made."""

    best_lr: float
    scores: dict[float, float] = field(default_factory=dict)
    extended: int = 0

    @property
    def on_edge(self) -> bool:
        """True if extension stopped at MAX_EXTENSION with the best still on the edge."""
        return self.best_lr in (min(self.scores), max(self.scores))


def tune_lr(
    score: Callable[[float], float],
    *,
    low: int = GRID_LOW,
    high: int = GRID_HIGH,
    max_extension: int = MAX_EXTENSION,
    on_extend: Callable[[], None] | None = None,
    score_many: Callable[[list[float]], list[float]] | None = None,
) -> TuneResult:
    """Minimise ``score(lr)`` over the half-decade grid ``[10**(low/2), 10**(high/2)]``.

    ``score`` is the mean final training loss over seeds, ``inf`` when any seed diverged (so
    diverged settings rank worst). Ties go to the smaller lr. ``on_extend`` is called before each
    extension (progress bars use it to grow their total). While the best sits on an edge, the
    grid extends one half-decade step past it, up to ``max_extension`` steps per side.
    ``score_many`` (optional) scores the initial grid in one call (e.g. one batched run of all its lrs).
    """
    if low > high:
        raise ValueError(f"empty grid: low={low} > high={high}")
    scores: dict[int, float] = {}

    def record(k: int, value: float) -> None:
        scores[k] = math.inf if math.isnan(value) else float(value)

    def evaluate(k: int) -> None:
        record(k, score(grid_lr(k)))

    grid = list(range(low, high + 1))
    if score_many is None:
        for k in grid:
            evaluate(k)
    else:
        for k, value in zip(grid, score_many([grid_lr(k) for k in grid]), strict=True):
            record(k, value)
    extended = 0
    while True:
        best = min(scores, key=lambda k: (scores[k], k))
        lo, hi = min(scores), max(scores)
        # a tie with its neighbour (e.g. both at zero loss) is not a reason to keep going down
        strictly_best_low = lo == hi or scores[lo] < scores[lo + 1] or math.isinf(scores[lo])
        if best == lo and strictly_best_low and lo > low - max_extension:
            k = lo - 1
        elif best == hi and best != lo and hi < high + max_extension:
            k = hi + 1
        else:
            break
        if on_extend is not None:
            on_extend()
        evaluate(k)
        extended += 1
    return TuneResult(grid_lr(best), {grid_lr(k): scores[k] for k in sorted(scores)}, extended)
