"""Benchmark plots: one colour per optimizer, and a summary chart whose size does not explode."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from learned_opt.bench.baselines import ADAM_1E3, TUNED_ADAM


def _fake_results(n_tasks: int, labels: list[str]) -> dict:
    tasks = []
    for j in range(n_tasks):
        results = {}
        for i, label in enumerate(labels):
            diverged = (i + j) % 7 == 3
            results[label] = {"ratio_to_tuned_adam": None if diverged else 10 ** ((i - j) / 5), "runs": [],
                              "lr": None, "tuned": False, "n_diverged": int(diverged), "n_seeds": 1}
        tasks.append({"label": f"task-{j}", "results": results, "initial_loss": 1.0})
    summary = {label: {"wins_vs_tuned_adam": i % 5, "wins_vs_adam_1e-3": i % 7, "diverged_tasks": i % 2}
               for i, label in enumerate(labels)}
    return {"suite": "fake", "optimizers": [{"label": lb} for lb in labels], "tasks": tasks, "summary": summary,
            "seeds": [0]}


def test_every_optimizer_gets_its_own_colour():
    pytest.importorskip("matplotlib")
    from learned_opt.bench.plots import _styles

    labels = [TUNED_ADAM, ADAM_1E3] + [f"opt{i}" for i in range(22)]
    styles = _styles(labels)
    looks = [(s["color"], str(s["linestyle"])) for s in styles.values()]
    assert len(set(looks)) == len(labels)
    assert len({styles[f"opt{i}"]["color"] for i in range(20)}) == 20


def test_summary_plot_stays_a_readable_size(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from learned_opt.bench.plots import _pyplot, _save, plot_summary

    plt = _pyplot()
    labels = [TUNED_ADAM, ADAM_1E3] + [f"opt{i}" for i in range(16)]
    fig = plot_summary(plt, _fake_results(14, labels))
    path = _save(fig, tmp_path / "summary.png")
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    assert width <= 2000 and height <= 1000, (width, height)  # was 1333 x 4666 for this table
