"""report.md and results.json from a benchmark's results dict (so a report can be rebuilt from JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from learned_opt.bench.baselines import ADAM_1E3, TUNED_ADAM
from learned_opt.bench.metrics import SPEEDUP_CAP, WIN_TOLERANCE
from learned_opt.bench.plots import write_plots
from learned_opt.fileio import atomic_write_json, atomic_write_text


def _num(x: Any, fmt: str = ".3g") -> str:
    return "—" if x is None else format(x, fmt)


def _yes(flag: bool) -> str:
    return "✓" if flag else "✗"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _lr(rec: dict[str, Any]) -> str:
    text = _num(rec["lr"]) if rec["lr"] is not None else "default"
    if rec["tuned"]:
        text += " (tuned" + (", edge" if rec["tuning"] and rec["tuning"]["on_edge"] else "") + ")"
    return text


def _final(rec: dict[str, Any]) -> str:
    if rec["n_diverged"] == rec["n_seeds"]:
        return f"diverged ({rec['n_diverged']}/{rec['n_seeds']})"
    text = f"{_num(rec['final_mean'])} ± {_num(rec['final_std'], '.2g')}"
    return text + (f" ({rec['n_diverged']}/{rec['n_seeds']} diverged)" if rec["n_diverged"] else "")


def render_report(results: dict[str, Any]) -> str:
    """The markdown report: suite summary, normalised losses per task, per-optimizer details."""
    labels = [o["label"] for o in results["optimizers"]]
    tasks = results["tasks"]
    n_tasks = len(tasks)
    lines = [
        f"# Benchmark: {results['suite']}",
        "",
        f"`{results['command']}`",
        "",
        f"{n_tasks} tasks × {len(results['seeds'])} seeds ({results.get('split', 'test')} split: {results['seeds']}); "
        f"baselines tuned: {'yes' if results['tune'] else 'no (tuned Adam only)'}; device {results['device']}; "
        f"learned_opt {results['version']}, torch {results['torch']}.",
        "",
        f"Win: final full-data training loss ≤ the baseline's + {WIN_TOLERANCE:g} × initial loss (mean over seeds). "
        f"Loss ratio: geometric mean over tasks of (final/initial + {WIN_TOLERANCE:g}) ÷ (tuned Adam's + "
        f"{WIN_TOLERANCE:g}); below 1 is better. Speedup: steps tuned Adam needs to reach the optimizer's final "
        f"loss ÷ the optimizer's steps (\"> {SPEEDUP_CAP}\": not within {SPEEDUP_CAP}× the horizon). A run "
        "diverges when its loss is non-finite or above 10× the initial loss; diverged runs are counted, "
        "never averaged in. (Tuned Adam's speedup over itself is below 1 when its noisy mean curve touched "
        "its final loss before the last step.)",
        "",
        "## Summary",
        "",
    ]
    rows = []
    for label in labels:
        s = results["summary"][label]
        med = s["median_speedup"]
        rows.append([
            label,
            f"{s['wins_vs_tuned_adam']}/{s['tasks']}",
            f"{s['wins_vs_adam_1e-3']}/{s['tasks']}",
            _num(s["geomean_ratio_to_tuned_adam"]),
            "—" if med is None else med["text"],
            f"{s['diverged_tasks']} ({s['diverged_runs']} runs)",
            _num(s["step_time_ratio_to_adam"], ".2f"),
        ])
    lines += _table(["optimizer", f"wins vs {TUNED_ADAM}", f"wins vs {ADAM_1E3}", "loss ratio to tuned Adam",
                     "median speedup", "diverged tasks", "step time × Adam"], rows)
    lines += ["", "## Final loss ÷ initial loss, per task (mean over seeds; lower is better)", ""]
    rows = []
    for t in tasks:
        row = [t["label"], str(t["steps"])]
        for label in labels:
            rec = t["results"][label]
            row.append("diverged" if rec["n_diverged"] else _num(rec["normalised_mean"]))
        rows.append(row)
    lines += _table(["task", "steps", *labels], rows)
    for label in labels:
        lines += ["", f"## {label}", ""]
        rows = []
        for t in tasks:
            rec = t["results"][label]
            timing = t.get("timing", {}).get(label)
            acc = rec["test"].get("test_accuracy") if rec["test"] else None
            rows.append([
                t["label"], _lr(rec), _final(rec), _num(rec["ratio_to_tuned_adam"]),
                "—" if rec["speedup"] is None else rec["speedup"]["text"],
                _yes(rec["win_vs_tuned_adam"]), _yes(rec["win_vs_adam_1e-3"]),
                _num(acc, ".3f"),
                "—" if timing is None else f"{timing['step_ms']:.3g} (×{_num(timing['ratio_to_adam'], '.2f')})",
                "—" if timing is None else _num(timing["state_bytes_per_param"], ".3g"),
            ])
        lines += _table(["task", "lr", "final loss", "ratio to tuned Adam", "speedup", "win tuned Adam",
                         "win Adam 1e-3", "test acc", "step ms (× Adam)", "state B/param"], rows)
    lines += _state_section(tasks, labels)
    lines += ["", "Plots: `plots/summary.png` and one `plots/<task>.png` per task (loss curves).", ""]
    return "\n".join(lines)


STATE_KEYS = {"decay_count": "decay fired (steps)", "lr_factor": "final lr factor"}


def _state_section(tasks: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """How the adaptive-rate rules adapted: mean over seeds of their end-of-run group state."""
    cols = []
    for label in labels:
        for key, name in STATE_KEYS.items():
            if any(key in run.get("extra", {}).get("state", {}) for t in tasks for run in t["results"][label]["runs"]):
                cols.append((label, key, name))
    if not cols:
        return []
    rows = []
    for t in tasks:
        row = [t["label"], str(t["steps"])]
        for label, key, _ in cols:
            values = [run["extra"]["state"][key] for run in t["results"][label]["runs"]
                      if run.get("extra", {}).get("state", {}).get(key) is not None]  # None: non-finite
            row.append(_num(sum(values) / len(values)) if values else "—")
        rows.append(row)
    return ["", "## Adaptive rules: end-of-run state (mean over seeds, runs at the reported lr)", "",
            *_table(["task", "steps", *(f"{label}: {name}" for label, _, name in cols)], rows)]


def write_outputs(results: dict[str, Any], report: str, out: Path, *, plots: bool = True) -> list[Path]:
    """Write results.json, report.md and (with matplotlib installed) the plots under ``out``."""
    files = [atomic_write_json(out / "results.json", results), atomic_write_text(out / "report.md", report)]
    if plots:
        files += write_plots(results, out / "plots")
    return files
