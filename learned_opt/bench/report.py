"""report.md and results.json from a benchmark's results dict (so a report can be rebuilt from JSON)."""

from __future__ import annotations

from pathlib import Path
from statistics import median
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
        "its final loss before the last step.) Test loss (tasks with a held-out split): the same win and "
        "ratio on the mean held-out loss after the last step, which shows the model, not just the fit.",
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
            *_test_summary(s.get("test_loss")),
            _num(s["step_time_ratio_to_adam"], ".2f"),
        ])
    lines += _table(["optimizer", f"wins vs {TUNED_ADAM}", f"wins vs {ADAM_1E3}", "loss ratio to tuned Adam",
                     "median speedup", "diverged tasks", "test-loss wins vs tuned Adam", "test-loss ratio",
                     "step time × Adam"], rows)
    lines += _pairs_section(results)
    lines += ["", "## Final loss ÷ initial loss, per task (mean over seeds; lower is better)", ""]
    rows = []
    for t in tasks:
        row = [t["label"], str(t["steps"])]
        for label in labels:
            rec = t["results"][label]
            row.append("diverged" if rec["n_diverged"] else _num(rec["normalised_mean"]))
        rows.append(row)
    lines += _table(["task", "steps", *labels], rows)
    lines += _test_loss_section(tasks, labels)
    for label in labels:
        lines += ["", f"## {label}", ""]
        rows = []
        for t in tasks:
            rec = t["results"][label]
            timing = t.get("timing", {}).get(label)
            rows.append([
                t["label"], _lr(rec), _final(rec), _num(rec["ratio_to_tuned_adam"]),
                "—" if rec["speedup"] is None else rec["speedup"]["text"],
                _yes(rec["win_vs_tuned_adam"]), _yes(rec["win_vs_adam_1e-3"]),
                _num(_held_out(rec, "test_loss")), _num(_held_out(rec, "test_accuracy"), ".3f"),
                "—" if timing is None else f"{timing['step_ms']:.3g} (×{_num(timing['ratio_to_adam'], '.2f')})",
                "—" if timing is None else _num(timing["state_bytes_per_param"], ".3g"),
            ])
        lines += _table(["task", "lr", "final loss", "ratio to tuned Adam", "speedup", "win tuned Adam",
                         "win Adam 1e-3", "test loss", "test acc", "step ms (× Adam)", "state B/param"], rows)
    lines += _state_section(tasks, labels)
    lines += ["", "Plots: `plots/summary.png` and one `plots/<task>.png` per task (loss curves).", ""]
    return "\n".join(lines)


def _held_out(rec: dict[str, Any], key: str) -> float | None:
    """A run record's mean held-out metric ``key`` (None without a held-out split)."""
    return (rec["test"] or {}).get(key)


def _test_loss_section(tasks: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """Mean held-out loss after the last step, per task with a held-out split."""
    rows = []
    for t in tasks:
        values = [_held_out(t["results"][lb], "test_loss") for lb in labels]
        if any(v is not None for v in values):
            rows.append([t["label"], str(t["steps"]), *("diverged" if t["results"][lb]["n_diverged"] else _num(v)
                                                        for lb, v in zip(labels, values))])
    if not rows:
        return []
    return ["", "## Test loss, per task (held-out split, mean over seeds; lower is better)", "",
            *_table(["task", "steps", *labels], rows)]


def _test_summary(test: dict[str, Any] | None) -> list[str]:
    """The summary's two test-loss cells ("—" where no task has a held-out split)."""
    if not test or not test["tasks"]:
        return ["—", "—"]
    return [f"{test['wins_vs_tuned_adam']}/{test['tasks']}", _num(test["geomean_ratio_to_tuned_adam"])]


def _pairs_section(results: dict[str, Any]) -> list[str]:
    """Head-to-head rows of the suite's ``pairs`` (an adaptive rule against the rule it decorates, a
    shipped optimizer against another baseline): wins and loss ratio of the candidate against that
    baseline, then per task."""
    pairs = results.get("pairs") or []
    if not pairs:
        return []
    rows = [[p["candidate"], p["baseline"], f"{p['wins']}/{p['tasks']}", _num(p["geomean_ratio"]),
             _interval_cell(p.get("ratio_interval")), _seed_wins_cell(p, "seed_runs")] for p in pairs]
    lines = ["", "## Head to head: the suite's pairs", "",
             "Each candidate against the baseline the suite pairs it with (an adaptive rule against the rule "
             "it decorates; a shipped optimizer against another strong baseline). "
             "Wins and loss ratio as above, with the second optimizer as the baseline. Seed wins: the same "
             "rule applied seed by seed to runs that share initial parameters and batches; a task whose "
             "seeds split is within the noise of its verdict. 90% interval: the loss ratio's spread when each "
             "task's seeds are resampled (both runs of a seed together); a pair whose interval holds 1 is "
             "not separated by these seeds.", "",
             *_table(["optimizer", "against", "wins", "loss ratio", "90% interval", "seed wins"], rows), ""]
    names = [f"{p['candidate']} vs {p['baseline']}" for p in pairs]
    per_task = [[t["label"], *(f"{_yes(t['pairs'][n]['win'])} {_num(t['pairs'][n]['ratio'])} "
                               f"({_seed_wins_cell(t['pairs'][n], 'seeds')})" for n in names)]
                for t in results["tasks"]]
    return lines + _table(["task", *names], per_task)


def _interval_cell(interval: Any) -> str:
    """"lo–hi", or "—" where there is none (results saved before it was kept)."""
    return "—" if not interval else f"{_num(interval[0])}–{_num(interval[1])}"


def _seed_wins_cell(row: dict[str, Any], total: str) -> str:
    """"k/n" seed wins, or "—" for results saved before they were counted."""
    return f"{row['seed_wins']}/{row[total]}" if "seed_wins" in row else "—"


STATE_COLUMNS = {"decay_count": "decay fired (steps)", "first_decay_step": "first firing (step)",
              "lr_factor": "final lr factor"}


def _state_values(rec: dict[str, Any], key: str) -> list[float]:
    """A run record's end-of-run group state ``key`` over its seeds (None: non-finite, left out)."""
    return [run["extra"]["state"][key] for run in rec["runs"]
            if run.get("extra", {}).get("state", {}).get(key) is not None]


def _state_cell(values: list[float], key: str) -> str:
    """Mean over seeds; the first firing is the median over the seeds that fired, with how many
    fired (0 is "never")."""
    if not values:
        return "—"
    if key != "first_decay_step":
        return _num(sum(values) / len(values))
    fired = [v for v in values if v > 0]
    return f"{_num(median(fired)) if fired else 'never'} ({len(fired)}/{len(values)})"


def _state_section(tasks: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """How the adaptive-rate rules adapted: their end-of-run group state per task (mean over seeds;
    the step of the first firing), and the final factor's distribution over every task and seed."""
    cols = [(label, key, name) for label in labels for key, name in STATE_COLUMNS.items()
            if any(_state_values(t["results"][label], key) for t in tasks)]
    if not cols:
        return []
    rows = [[t["label"], str(t["steps"]), *(_state_cell(_state_values(t["results"][label], key), key)
                                            for label, key, _ in cols)] for t in tasks]
    lines = ["", "## Adaptive rules: end-of-run state (mean over seeds, runs at the reported lr; first firing: "
             "median over the seeds that fired, with how many did)", "",
             *_table(["task", "steps", *(f"{label}: {name}" for label, _, name in cols)], rows)]
    spread = []
    for label in dict.fromkeys(label for label, key, _ in cols if key == "lr_factor"):
        values = [v for t in tasks for v in _state_values(t["results"][label], "lr_factor")]
        fired = sum(1 for t in tasks if any(v > 0 for v in _state_values(t["results"][label], "first_decay_step")))
        has_decay = any(key == "decay_count" and lab == label for lab, key, _ in cols)
        spread.append([label, _num(median(values)), _num(min(values)), _num(max(values)), str(len(values)),
                       f"{fired}/{len(tasks)}" if has_decay else "—"])
    if spread:
        lines += ["", "Final lr factor over every task and seed:", "",
                  *_table(["optimizer", "median", "min", "max", "runs", "tasks where it fired"], spread)]
    return lines


def write_outputs(results: dict[str, Any], report: str, out: Path, *, plots: bool = True) -> list[Path]:
    """Write results.json, report.md and (with matplotlib installed) the plots under ``out``."""
    files = [atomic_write_json(out / "results.json", results), atomic_write_text(out / "report.md", report)]
    if plots:
        files += write_plots(results, out / "plots")
    return files
