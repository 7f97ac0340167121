"""Meta-training's logs: ``metrics.csv`` (one row per meta-step), TensorBoard events, ``curves.png``."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from learned_opt.fileio import atomic_write_bytes, atomic_write_text
from learned_opt.meta.checkpoint import output_write_errors

log = logging.getLogger(__name__)

METRIC_FIELDS = ("step", "meta_loss", "grad_norm", "skipped", "inner_steps", "runs_finished", "val_loss", "wall_s")


def rows_csv(rows: list[Mapping[str, Any]], fieldnames: tuple[str, ...] = ()) -> str:
    """``rows`` as CSV text; columns ``fieldnames``, else every key in order of first appearance."""
    keys = list(fieldnames)
    if not keys:
        for row in rows:
            keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


class MetricsLog:
    """``metrics.csv`` (one row per meta-step, flushed) and TensorBoard events when available.

    On resume (``resume_step``), rows written after the checkpoint are dropped first, so the file
    holds each step once."""

    def __init__(self, out: Path, resume_step: int | None) -> None:
        self.path = out / "metrics.csv"
        if resume_step is not None and self.path.exists():
            self._trim(resume_step)
        new = not self.path.exists()
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=METRIC_FIELDS)
        if new:
            self.writer.writeheader()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard is not installed: no event files (metrics.csv has everything)")
        else:
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)

    def _trim(self, step: int) -> None:
        """Drop rows written after the checkpoint (and any torn last line)."""
        kept = []
        with open(self.path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                try:
                    if None not in row.values() and int(row["step"]) <= step:
                        kept.append(row)
                except (TypeError, ValueError):
                    continue
        atomic_write_text(self.path, rows_csv(kept, METRIC_FIELDS))

    def write(self, row: Mapping[str, Any]) -> None:
        with output_write_errors(self.path):
            self.writer.writerow(row)
            self.file.flush()
        if self.tb is not None:
            for key in ("meta_loss", "grad_norm", "val_loss"):
                if row.get(key) not in (None, ""):
                    self.tb.add_scalar(key, float(row[key]), int(row["step"]))

    def close(self) -> None:
        with output_write_errors(self.path):
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_curves(metrics_csv: Path, png: Path) -> Path | None:
    """A PNG of meta-loss and validation loss against meta-step; None (logged) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: skipping %s", png)
        return None
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    meta = [float(r["meta_loss"]) for r in rows]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, meta, lw=0.6, alpha=0.4, label="meta-loss (train truncations)")
    if len(meta) >= 10:
        w = max(len(meta) // 50, 5)
        smooth = np.convolve(meta, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.5, label=f"meta-loss, {w}-step mean")
    if val:
        ax.plot(*zip(*val), "o-", label="validation (whole runs)")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("log(loss / initial loss)")
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(png, buf.getvalue())
