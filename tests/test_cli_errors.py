"""Bad input reaches the user as one line naming what is wrong, exit status 2, before any output is
written; optimizer specs (tuples, quoted text, a display name) are checked before any run; a
corrupt run-cache entry is rerun, never a crash."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

import learned_opt
from learned_opt.bench.baselines import parse_spec_string, resolve_optimizer, spec_from_factory
from learned_opt.bench.harness import BenchmarkConfigError

TINY = """
[suite]
name = "tiny"
steps = 5
seeds = { train = [0, 10], validation = [10, 20], test = [20, 30] }

[[suite.family]]
label = "q"
family = "quadratic"
settings = { dim = 3 }

[benchmark]
optimizers = ["sgd"]
seeds = 1
timing_steps = 0
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _argparse_error(capsys: pytest.CaptureFixture[str], main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage first


@pytest.mark.parametrize("spec, message", [
    ("sgd[foo=1]", "optimizer 'sgd[foo=1]': cannot build it: TypeError: SGD.__init__() got an unexpected keyword "
                   "argument 'foo'"),
    ("default[bogus=1]", "optimizer 'default[bogus=1]': cannot build it: ValueError: unknown hyperparameters ['bogus']"),
])
def test_bad_optimizer_keys_fail_before_any_run(spec: str, message: str, tiny: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.bench.cli import main

    out = tmp_path / "out"
    assert main(["--suite", str(tiny), "--optimizers", spec, "--out", str(out), "--quiet"]) == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_a_bad_spec_in_the_suite_table_names_the_file(tiny: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.bench.cli import main

    tiny.write_text(TINY.replace('optimizers = ["sgd"]', 'optimizers = ["sgd", "adam[nope=1]"]'))
    assert main(["--suite", str(tiny), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert f"{tiny}: [benchmark] optimizers: optimizer 'adam[nope=1]'" in line and "'nope'" in line


def _raises(params: list[Tensor], lr: float = 0.1) -> torch.optim.Optimizer:
    raise RuntimeError("no optimizer for you")


def _returns_none(params: list[Tensor], lr: float = 0.1) -> None:
    return None


def _returns_text(params: list[Tensor], lr: float = 0.1) -> str:
    return "sgd"


@pytest.mark.parametrize("factory, message", [
    (_raises, "optimizer 'mine': cannot build it: RuntimeError: no optimizer for you"),
    (_returns_none, "optimizer 'mine': its factory returned NoneType None, not a torch.optim.Optimizer"),
    (_returns_text, "optimizer 'mine': its factory returned str 'sgd', not a torch.optim.Optimizer"),
])
def test_broken_factories_are_config_errors_naming_the_spec(factory, message: str, tmp_path: Path) -> None:
    from learned_opt.suites import load_suite

    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY)
    with pytest.raises(BenchmarkConfigError) as exc:
        learned_opt.benchmark(load_suite(suite), {"mine": factory}, progress=False, out=tmp_path / "out")
    assert str(exc.value) == message
    assert not (tmp_path / "out").exists()


def test_broken_factory_files_are_one_line_errors(tiny: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.bench.cli import main

    factories = tmp_path / "factories.py"
    factories.write_text("def none(params, lr=0.1):\n    return None\n")
    crashing = tmp_path / "crashing.py"
    crashing.write_text("x = 1 / 0\n")
    binary = tmp_path / "binary.py"
    binary.write_bytes(b"\xff\xfe = 1\n")
    for spec, message in [(f"{factories}:none", "its factory returned NoneType None"),
                          (f"{crashing}:f", f"optimizer factory file '{crashing}' failed to load: ZeroDivisionError"),
                          (f"{binary}:f", f"optimizer factory file '{binary}' failed to load: SyntaxError")]:
        assert main(["--suite", str(tiny), "--optimizers", spec, "--out", str(tmp_path / "out"), "--quiet"]) == 2
        assert message in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_out_under_a_regular_file_is_a_clear_error(tiny: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.bench.cli import main as bench_main
    from learned_opt.meta.cli import main as meta_main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out in (blocker, blocker / "sub"):
        line = _argparse_error(capsys, bench_main, ["--suite", str(tiny), "--out", str(out), "--quiet"])
        assert f"argument --out: output directory {out}" in line and f"{blocker} is a file" in line
        line = _argparse_error(capsys, meta_main, ["--config", str(tiny), "--out", str(out)])
        assert f"argument --out: output directory {out}" in line and f"{blocker} is a file" in line
    with pytest.raises(BenchmarkConfigError, match=f"{blocker} is a file, not a directory"):
        learned_opt.benchmark(str(tiny), progress=False, out=blocker / "sub")


def test_non_utf8_suite_and_config_files_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.bench.cli import main as bench_main
    from learned_opt.meta.cli import main as meta_main

    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[suite]\nname = "caf\xe9"\n'.encode("latin-1"))
    expected = f"{bad} is not UTF-8 text (byte 0xe9 at offset 19); save it as UTF-8"
    out = tmp_path / "out"
    assert f"argument --suite: {expected}" in _argparse_error(capsys, bench_main, ["--suite", str(bad), "--out", str(out)])
    assert f"argument --config: {expected}" in _argparse_error(capsys, meta_main, ["--config", str(bad), "--out", str(out)])
    assert f"argument --suite: {expected}" in _argparse_error(
        capsys, meta_main, ["--suite", str(bad), "--rule", "learnable-sgd", "--out", str(out)])
    assert not out.exists()


# --- optimizer specs: tuples, quoted text, a display name; checked before any run ----------------


def test_spec_values_take_tuples_and_quoted_text() -> None:
    assert parse_spec_string("adamw[betas=(0.9,0.99), weight_decay=0.1]") == (
        "adamw", {"betas": (0.9, 0.99), "weight_decay": 0.1})
    assert parse_spec_string("f.py:make[pair=(1, (2, 3),), tag='a, b (c)', on=true]") == (
        "f.py:make", {"pair": (1, (2, 3)), "tag": "a, b (c)", "on": True})
    spec = resolve_optimizer("adamw[betas=(0.9,0.99)]")
    opt = spec.build([torch.zeros(2, requires_grad=True)], 0.01)
    assert opt.defaults["betas"] == (0.9, 0.99) and spec.key["kwargs"] == {"betas": (0.9, 0.99)}
    for bad, message in [("adam[betas=(0.9,0.99]", r"unclosed \("), ("adam[x=a)]", r"unbalanced '\)'"),
                         ("adam[x='a]", "unclosed '"), ("adam[x=1,x=2]", "given twice")]:
        with pytest.raises(ValueError, match=message):
            parse_spec_string(bad)


def test_spec_name_sets_the_report_label_and_nothing_else(tiny: Path) -> None:
    named = resolve_optimizer("adamw[betas=(0.9,0.99),name=adamw-0.99]")
    plain = resolve_optimizer("adamw[betas=(0.9,0.99)]")
    assert named.label == "adamw-0.99" and plain.label == "adamw[betas=(0.9,0.99)]"
    assert named.key == plain.key  # same runs, same cache entries
    assert resolve_optimizer("sgd[name='sgd, slow', lr=0.01]").label == "sgd, slow"
    with pytest.raises(ValueError, match="name must be non-empty text"):
        resolve_optimizer("sgd[name=1]")
    res = learned_opt.benchmark(str(tiny), ["sgd[lr=0.1,name=plain-sgd]"], progress=False)
    assert "plain-sgd" in res.results["tasks"][0]["results"] and "| plain-sgd |" in res.report


def test_bad_spec_values_are_reported_before_any_run(tiny: Path, tmp_path: Path) -> None:
    built = []

    def counting(params: list[Tensor], lr: float = 0.1) -> torch.optim.Optimizer:
        built.append(lr)
        return torch.optim.SGD(params, lr=lr)

    with pytest.raises(BenchmarkConfigError, match=r"'adamw\[betas=\(0.9,\)\]': cannot build it"):
        learned_opt.benchmark(str(tiny), [spec_from_factory("ok", counting), "adamw[betas=(0.9,)]"],
                              progress=False, out=tmp_path / "out")
    assert len(built) <= 1 and not (tmp_path / "out").exists()  # at most the up-front check, no run


# --- the run cache -------------------------------------------------------------------------------


def _entries(out: Path) -> dict[Path, dict]:
    return {f: json.loads(f.read_text()) for f in sorted((out / "cache").rglob("*.json"))}


def _sgd_curve_entry(out: Path) -> Path:
    """The cache file of sgd[lr=0.1]'s curve run (the one the report reads)."""
    return next(f for f, d in _entries(out).items()
                if d["key"]["optimizer"] == {"torch": "SGD", "kwargs": {}} and d["key"]["lr"] == "0.1")


def test_cache_entry_with_nan_losses_is_rerun_not_a_crash(tmp_path: Path) -> None:
    from learned_opt.bench.runner import RunResult

    suite = tmp_path / "tiny.toml"
    suite.write_text(TINY)
    kwargs = dict(seeds=1, progress=False, timing_steps=0, plots=False, out=tmp_path / "out")
    first = learned_opt.benchmark(str(suite), ["sgd[lr=0.1]"], **kwargs)
    entry = _sgd_curve_entry(tmp_path / "out")
    data = json.loads(entry.read_text())
    good = data["result"]
    for corrupt in ({"losses": [math.nan] * len(good["losses"])},        # NaN, yet not flagged diverged
                    {"losses": [None] * len(good["losses"])},            # null (NaN as strict JSON writes it)
                    {"losses": good["losses"][:-1], "steps": good["steps"][:-1]},  # a curve cut short
                    {"losses": [], "steps": []}):
        entry.write_text(json.dumps({**data, "result": {**good, **corrupt}}))
        with pytest.warns(UserWarning, match="unreadable or inconsistent; rerunning it"):
            again = learned_opt.benchmark(str(suite), ["sgd[lr=0.1]"], **kwargs)
        assert again.results["cache"]["misses"] == 1
        rerun = again.results["tasks"][0]["results"]["sgd[lr=0.1]"]["runs"][0]
        assert rerun["losses"] == first.results["tasks"][0]["results"]["sgd[lr=0.1]"]["runs"][0]["losses"]
        assert json.loads(entry.read_text())["result"]["losses"] == good["losses"]  # rewritten
    # a run that recorded its divergence stays a (cached) diverged run
    entry.write_text(json.dumps({**data, "result": {**good, "losses": [good["losses"][0], math.nan],
                                                    "steps": [0, 1], "diverged": True}}))
    diverged = learned_opt.benchmark(str(suite), ["sgd[lr=0.1]"], **kwargs)
    assert diverged.results["cache"]["misses"] == 0
    assert diverged.results["tasks"][0]["results"]["sgd[lr=0.1]"]["n_diverged"] == 1
    assert RunResult.from_json(json.loads(entry.read_text())["result"]).diverged
