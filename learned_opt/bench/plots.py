"""PNG plots that read without the table: loss curves per task, and a summary chart."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

from learned_opt.bench.baselines import ADAM_1E3, TUNED_ADAM
from learned_opt.bench.metrics import WIN_TOLERANCE
from learned_opt.bench.report import plot_name
from learned_opt.fileio import atomic_write_bytes


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'learned_opt[plot]'): no plots written",
                      stacklevel=3)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """Fixed colours per optimizer; references dashed so learned/untuned ones stand out."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    out = {}
    for i, label in enumerate(labels):
        style: dict[str, Any] = {"color": cmap(i % 10), "linewidth": 1.8}
        if label in (TUNED_ADAM, ADAM_1E3):
            style["linestyle"] = "--" if label == TUNED_ADAM else ":"
            style["color"] = "black" if label == TUNED_ADAM else "grey"
        out[label] = style
    return out


def _legend_label(label: str, rec: dict[str, Any]) -> str:
    lr = "default lr" if rec["lr"] is None else f"lr={rec['lr']:.3g}"
    text = f"{label}, {lr}" + (" (tuned)" if rec["tuned"] and label != TUNED_ADAM else "")
    if rec["n_diverged"]:
        text += f" — diverged on {rec['n_diverged']}/{rec['n_seeds']} seeds"
    return text


def plot_task(plt: Any, task: dict[str, Any], labels: list[str], n_seeds: int) -> Any:
    """Mean full-data training loss vs step per optimizer, band = min–max over seeds."""
    import numpy as np

    styles = _styles(labels)
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    positive = True
    for label in labels:
        rec = task["results"][label]
        ok = [r for r in rec["runs"] if not r["diverged"]]
        if not ok:
            ax.plot([], [], label=_legend_label(label, rec), **styles[label])
            continue
        steps = ok[0]["steps"]
        losses = np.array([[math.nan if x is None else x for x in r["losses"]] for r in ok], dtype=float)
        positive &= bool(np.nanmin(losses) > 0)
        ax.plot(steps, losses.mean(axis=0), label=_legend_label(label, rec), **styles[label])
        if len(ok) > 1:
            ax.fill_between(steps, losses.min(axis=0), losses.max(axis=0), color=styles[label]["color"], alpha=0.12)
    if positive:
        ax.set_yscale("log")
    else:  # some run reached exactly zero: linear below the win tolerance, log above it
        ax.set_yscale("symlog", linthresh=max(WIN_TOLERANCE * abs(task["initial_loss"] or 1.0), 1e-12))
    ax.set_xlabel("step")
    ax.set_ylabel("full-data training loss (log scale)")
    ax.set_title(f"{task['label']}: mean over {n_seeds} seeds (band: min–max)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def plot_summary(plt: Any, results: dict[str, Any]) -> Any:
    """Left: each optimizer's final loss relative to tuned Adam per task. Right: wins per optimizer."""
    import numpy as np

    labels = [o["label"] for o in results["optimizers"] if o["label"] != TUNED_ADAM]
    all_labels = [o["label"] for o in results["optimizers"]]
    styles = _styles(all_labels)
    tasks = results["tasks"]
    n = len(tasks)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 2.5 + 0.22 * n * max(len(labels), 2)),
                                  gridspec_kw={"width_ratios": [2.2, 1]})
    height = 0.8 / max(len(labels), 1)
    ratios = [t["results"][lb]["ratio_to_tuned_adam"] for t in tasks for lb in labels]
    finite = [r for r in ratios if r is not None and r > 0]
    hi = max([*finite, 1.0]) * 2
    lo = min([*finite, 1.0]) / 2
    for j, label in enumerate(labels):
        ys = np.arange(n) + (j - (len(labels) - 1) / 2) * height
        vals = [t["results"][label]["ratio_to_tuned_adam"] for t in tasks]
        ends = [v if v is not None else hi for v in vals]
        # bars grow from 1 (= tuned Adam): left means better, right means worse
        bars = ax.barh(ys, [e - 1.0 for e in ends], height=height * 0.9, color=styles[label]["color"],
                       label=label, left=1.0)
        ax.plot([v for v in vals if v is not None], [y for y, v in zip(ys, vals) if v is not None], "o",
                color=styles[label]["color"], markersize=4, markeredgecolor="black", markeredgewidth=0.5)
        for bar, v in zip(bars, vals):
            if v is None:
                bar.set_hatch("xx")
                bar.set_alpha(0.4)
                ax.text(hi * 0.95, bar.get_y() + bar.get_height() / 2, "diverged", ha="right", va="center",
                        fontsize=7)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(np.arange(n), [t["label"] for t in tasks], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("final loss relative to tuned Adam (normalised, log scale)\n← better than tuned Adam   |   worse →")
    ax.set_title(f"{results['suite']}: final loss vs tuned Adam, per task")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x", which="both")

    summary = results["summary"]
    x = np.arange(len(labels))
    w = 0.38
    ax2.bar(x - w / 2, [summary[lb]["wins_vs_tuned_adam"] for lb in labels], w, label="wins vs tuned Adam",
            color="tab:blue")
    ax2.bar(x + w / 2, [summary[lb]["wins_vs_adam_1e-3"] for lb in labels], w, label="wins vs Adam(lr=1e-3)",
            color="tab:orange")
    for i, lb in enumerate(labels):
        div = summary[lb]["diverged_tasks"]
        if div:
            ax2.text(i, n + 0.1, f"{div} diverged", ha="center", fontsize=7, color="red")
    ax2.axhline(n, color="grey", linewidth=0.8)
    ax2.set_ylim(0, n * 1.15 + 0.5)
    ax2.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel(f"tasks won (of {n})")
    ax2.set_title("wins (final loss ≤ baseline + 1e-4 × initial)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """plots/summary.png and plots/<task>.png; nothing (with a warning) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    labels = [o["label"] for o in results["optimizers"]]
    files = []
    fig = plot_summary(plt, results)
    files.append(_save(fig, out / "summary.png"))
    plt.close(fig)
    for task in results["tasks"]:
        fig = plot_task(plt, task, labels, len(results["seeds"]))
        files.append(_save(fig, out / f"{plot_name(task['label'])}.png"))
        plt.close(fig)
    return files
