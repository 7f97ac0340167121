"""PNG plots that read without the table: loss curves per task, and a summary chart."""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import Any

from learned_opt.bench.baselines import ADAM_1E3, TUNED_ADAM
from learned_opt.bench.metrics import WIN_TOLERANCE
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


LINESTYLES = ("-", "-.", (0, (5, 1.5)), (0, (1, 1)))


def _styles(labels: list[str]) -> dict[str, dict[str, Any]]:
    """A colour of its own per optimizer (tab20: 20 distinct; past 20 the line style changes too);
    the references black/grey and dashed/dotted so learned/untuned ones stand out."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    out = {}
    others = [label for label in labels if label not in (TUNED_ADAM, ADAM_1E3)]
    for i, label in enumerate(others):
        out[label] = {"color": cmap((2 * i) % 20 + (i // 10) % 2), "linewidth": 1.8,
                      "linestyle": LINESTYLES[(i // 20) % len(LINESTYLES)]}
    out[TUNED_ADAM] = {"color": "black", "linewidth": 1.8, "linestyle": "--"}
    out[ADAM_1E3] = {"color": "grey", "linewidth": 1.8, "linestyle": ":"}
    return {label: out[label] for label in labels}


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
    """Left: a heatmap of each optimizer's final loss relative to tuned Adam per task (blue better,
    red worse; the number in each cell). Right: tasks won per optimizer. Its size grows with the
    table, a few inches per dozen rows, never with rows × columns."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    labels = [o["label"] for o in results["optimizers"] if o["label"] != TUNED_ADAM]
    tasks = results["tasks"]
    n, m = len(tasks), len(labels)
    ratios = np.array([[t["results"][lb]["ratio_to_tuned_adam"] or math.nan for t in tasks] for lb in labels],
                      dtype=float)
    logs = np.clip(np.log10(ratios), -2.0, 2.0)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(3.0 + 0.62 * n + 3.2, 1.6 + 0.32 * m),
                                  gridspec_kw={"width_ratios": [0.62 * n + 3.0, 3.2]})
    image = ax.imshow(np.where(np.isnan(logs), 0.0, logs), cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -2.0, 2.0),
                      aspect="auto")
    for i in range(m):
        for j in range(n):
            text = "div" if math.isnan(ratios[i, j]) else f"{ratios[i, j]:.2g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                    color="white" if abs(logs[i, j]) > 1.2 else "black")
    ax.set_xticks(np.arange(n), [t["label"] for t in tasks], rotation=40, ha="right", fontsize=7.5)
    ax.set_yticks(np.arange(m), labels, fontsize=8)
    ax.set_title(f"{results['suite']}: final loss ÷ tuned Adam's (normalised; <1 better, div = diverged)",
                 fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, label="log10 ratio (clipped at ±2)")

    summary = results["summary"]
    ys = np.arange(m)
    ax2.barh(ys - 0.2, [summary[lb]["wins_vs_tuned_adam"] for lb in labels], 0.4, label="vs tuned Adam",
             color="tab:blue")
    ax2.barh(ys + 0.2, [summary[lb]["wins_vs_adam_1e-3"] for lb in labels], 0.4, label="vs Adam(lr=1e-3)",
             color="tab:orange")
    for i, lb in enumerate(labels):
        div = summary[lb]["diverged_tasks"]
        if div:
            ax2.text(n + 0.2, i, f"{div} div.", va="center", fontsize=7, color="red")
    ax2.set_yticks(ys, [""] * m)
    ax2.set_ylim(m - 0.5, -0.5)
    ax2.set_xlim(0, n * 1.25)
    ax2.axvline(n, color="grey", linewidth=0.8)
    ax2.set_xlabel(f"tasks won (of {n})", fontsize=8)
    ax2.set_title("wins (final ≤ baseline + 1e-4 × initial)", fontsize=9)
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18 - 1.2 / max(m, 1)), ncol=2)
    fig.tight_layout()
    return fig


def plot_name(label: str) -> str:
    """A file-system-safe name for a task's plot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "task"


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
