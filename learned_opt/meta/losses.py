"""Meta-losses: how one truncation of an inner run is scored, normalised so no task dominates.

Each inner loss is mapped to ``log(loss / initial_loss)``, capped at ``cap`` (a diverging task
contributes at most ``cap``, with zero gradient); a non-finite loss counts as ``cap``. The
log-ratio makes a 10x improvement worth the same on a task whose losses are 1e-3 and on one whose
losses are 1e3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

META_LOSS_KINDS = ("mean", "final", "heldout")


def normalized_loss(loss: Tensor, initial_loss: Tensor | float, cap: float) -> Tensor:
    """``min(log(loss / initial_loss), cap)``; a non-finite ``loss`` gives the constant ``cap``.

    Losses are assumed positive (floored at a tiny fraction of the initial loss before the log).
    """
    initial = torch.as_tensor(initial_loss, dtype=loss.dtype, device=loss.device).abs().clamp_min(1e-30)
    if not bool(torch.isfinite(loss)):
        return torch.full((), cap, dtype=loss.dtype, device=loss.device)
    ratio = (loss / initial).clamp_min(1e-12)
    return torch.log(ratio).clamp_max(cap)


@dataclass(frozen=True)
class MetaLoss:
    """Scores one truncation of ``length`` inner steps.

    kind: ``"mean"`` — mean over the unroll of the loss after each step (the paper's objective);
    ``"final"`` — the loss after the last step; ``"heldout"`` — the loss after the last step on a
    batch the unroll did not train on. ``cap`` bounds each normalised loss.
    """

    kind: str = "mean"
    cap: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in META_LOSS_KINDS:
            raise ValueError(f"invalid meta_loss: {self.kind!r} (choose from {list(META_LOSS_KINDS)})")
        if not self.cap > 0:
            raise ValueError(f"invalid loss_cap: {self.cap!r} (must be > 0)")

    def __call__(self, losses: Sequence[Tensor], heldout: Tensor | None, length: int, initial_loss: Tensor) -> Tensor:
        """The truncation's meta-loss.

        ``losses``: the loss after each completed step (fewer than ``length`` when the run diverged:
        the missing steps count as ``cap``); ``heldout``: the held-out loss after the last step.
        """
        diverged = len(losses) < length
        if self.kind == "mean":
            terms = [normalized_loss(loss, initial_loss, self.cap) for loss in losses]
            total = torch.stack(terms).sum() if terms else torch.zeros((), dtype=initial_loss.dtype)
            return (total + self.cap * (length - len(terms))) / length
        last = heldout if self.kind == "heldout" else (losses[-1] if losses else None)
        if diverged or last is None:
            return torch.full((), self.cap, dtype=initial_loss.dtype, device=initial_loss.device)
        return normalized_loss(last, initial_loss, self.cap)
