"""The command line: one torch thread by default (the APIs leave torch alone), --version and list."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

import learned_opt
from learned_opt.bench.harness import BenchmarkConfigError
from learned_opt.tasks.base import Task
from meta_toys import ToyFamily, ToyMomentum


class Bowl(Task):
    """``||x||²`` in 3 dimensions, full batch: the smallest task a benchmark can run."""

    name = "bowl"

    def init_params(self, generator: torch.Generator) -> list[Tensor]:
        return [torch.randn(3, generator=generator)]

    def sample_batch(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        return ()

    def loss(self, params: Sequence[Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        return params[0].pow(2).sum()

    def eval_loss(self, params: Sequence[Tensor]) -> Tensor:
        return self.loss(params, ())


@pytest.fixture
def threads() -> Iterator[None]:
    """Start at 3 torch threads (a count neither CLI default gives); restore the count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_benchmark_cli_uses_one_thread_unless_told(threads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import learned_opt.bench.cli as bench_cli

    seen = []

    def fake_benchmark(*args: object, **kwargs: object) -> None:
        seen.append(torch.get_num_threads())
        raise BenchmarkConfigError("stop here")

    monkeypatch.setattr(bench_cli, "benchmark", fake_benchmark)
    assert bench_cli.main(["--suite", "quickstart"]) == 2
    assert bench_cli.main(["--suite", "quickstart", "--threads", "2"]) == 2
    assert seen == [1, 2]
    assert "--threads N" in bench_cli.build_parser().format_help()
    assert "5-8x slower" in " ".join(bench_cli.build_parser().format_help().split())


def test_meta_train_cli_uses_one_thread_unless_told(threads: None, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    import learned_opt.meta.train as train
    from learned_opt.meta.cli import build_parser, main

    seen = []

    def fake_meta_train(*args: object, **kwargs: object) -> None:
        seen.append(torch.get_num_threads())
        raise ValueError("stop here")

    monkeypatch.setattr(train, "meta_train", fake_meta_train)
    assert main(["--suite", "l2l_quadratic", "--out", str(tmp_path / "a")]) == 2
    assert main(["--suite", "l2l_quadratic", "--out", str(tmp_path / "b"), "--threads", "2"]) == 2
    assert seen == [1, 2]
    assert "5-8x slower" in " ".join(build_parser().format_help().split())


def test_python_apis_leave_torch_threads_alone(threads: None) -> None:
    during = []

    def sgd(params: list[Tensor], lr: float = 0.1) -> torch.optim.Optimizer:
        during.append(torch.get_num_threads())
        return torch.optim.SGD(params, lr=lr)

    learned_opt.benchmark([Bowl()], {"sgd": sgd}, steps=3, seeds=1, progress=False, timing_steps=0)
    assert set(during) == {3} and torch.get_num_threads() == 3
    learned_opt.meta_train(ToyMomentum(), ToyFamily(), estimator="bptt", progress=False, meta_steps=1,
                           tasks_per_step=1, unroll=2, horizon=2, eval_tasks=0)
    assert torch.get_num_threads() == 3


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.cli import main

    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"learned-opt {learned_opt.__version__} (torch ") and "\n" not in out


def test_list_shows_every_shipped_optimizer_with_its_cards_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.cli import main
    from learned_opt.weights import PRETRAINED_DIR, list_pretrained, read_card

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "rule"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert sorted(rows) == list_pretrained() and "default" in rows
    for name, line in rows.items():
        card = read_card(PRETRAINED_DIR / f"{name}.safetensors")
        assert line.split()[1] == card["rule"]
        for suite, row in card["metrics"].items():
            assert f"{suite}: {row['wins_vs_tuned_adam']}/{row['tasks']} wins vs tuned Adam" in line
            assert f"median speedup {row['median_speedup']['text']}" in line
            if "told_the_horizon" in row:  # horizon-aware: the told figures too (the README's usage)
                told = row["told_the_horizon"]
                assert f"{suite}, told total_steps: {told['wins_vs_tuned_adam']}/{told['tasks']} wins" in line
    assert "told total_steps" in rows["default"]
