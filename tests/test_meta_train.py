"""The meta-training loop: outputs, config errors before work, stability, checkpoints and resume."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file, save

import learned_opt
from learned_opt.meta.checkpoint import CHECKPOINT_NAME, CheckpointError
from learned_opt.meta.estimators import Estimate, GradientEstimator, TruncatedBPTT
from learned_opt.lockfile import LOCK_NAME, DirectoryLockError, lock_directory
from learned_opt.meta.train import meta_train
from learned_opt.suites import load_suite
from meta_toys import ToyFamily, ToyMomentum

ROOT = Path(__file__).resolve().parents[1]
QUAD = ROOT / "tasks" / "l2l_quadratic.toml"
SMALL = {"meta_steps": 4, "tasks_per_step": 2, "unroll": 5, "horizon": 10, "eval_every": 2, "eval_tasks": 2,
         "checkpoint_every": 2}


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_paper_config_runs_and_writes_everything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = meta_train(config=QUAD, out=out, progress=False, rule_config={"hidden_size": 4, "num_layers": 1}, **SMALL)
    assert result.step == 4 and len(result.history) == 4
    for name in ("final.safetensors", "final.json", "best.safetensors", "best.json", "metrics.csv", CHECKPOINT_NAME):
        assert (out / name).is_file(), name
    rows = _rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [bool(r["val_loss"]) for r in rows] == [False, True, False, True]
    card = json.loads((out / "final.json").read_text())
    assert card["rule"] == "lstm" and card["meta_training"]["steps"] == 4
    assert card["meta_training"]["config"]["unroll"] == 5 and "command" in card["meta_training"]
    assert card["meta_training"]["machine"]["torch_threads"] == torch.get_num_threads()
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = learned_opt.load_optimizer(str(out / "final.safetensors"), params)
    params[0].sum().backward()
    before = params[0].detach().clone()
    opt.step()
    assert not torch.equal(before, params[0].detach())
    trained = load_file(out / "final.safetensors")
    assert all(torch.equal(v, result.rule.state_dict()[k].cpu()) for k, v in trained.items())
    assert card["meta_training"]["inner_steps"] == result.inner_steps == 4 * 2 * 5  # steps x tasks x unroll
    if _has("matplotlib"):
        assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if _has("tensorboard"):
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_meta_training_improves_the_toy_rule(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rule = ToyMomentum(log_lr=-4.0, logit_beta=0.0)
    result = meta_train(rule, ToyFamily(noise=0.1), estimator=TruncatedBPTT(), progress=False, meta_steps=40,
                        tasks_per_step=4, unroll=10, horizon=30, meta_lr=0.05, eval_every=40, eval_tasks=4)
    first = sum(r["meta_loss"] for r in result.history[:5]) / 5
    last = sum(r["meta_loss"] for r in result.history[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert rule.log_lr.item() > -3.5  # it learned to take bigger steps on a well-conditioned problem


class _PoisonedBPTT(TruncatedBPTT):
    """Truncated BPTT whose gradient is NaN on chosen calls (stands in for a blown-up unroll)."""

    def __init__(self, bad_calls: set[int]) -> None:
        super().__init__()
        self.calls, self.bad = 0, bad_calls

    def estimate(self, rule, run, steps, objective, noise) -> Estimate:  # type: ignore[no-untyped-def]
        est = super().estimate(rule, run, steps, objective, noise)
        self.calls += 1
        if self.calls in self.bad:
            est.grads = [torch.full_like(g, float("nan")) for g in est.grads]
        return est


def test_nonfinite_meta_gradient_skips_update_and_is_counted(tmp_path: Path) -> None:
    rule = ToyMomentum()
    snapshots = []
    est = _PoisonedBPTT({3})  # one slot per step: step 3 is poisoned
    result = meta_train(rule, ToyFamily(), estimator=est, out=tmp_path / "o", progress=False, meta_steps=4,
                        tasks_per_step=1, unroll=3, horizon=9, eval_tasks=0, meta_lr=0.1)
    rows = _rows(tmp_path / "o")
    assert [int(r["skipped"]) for r in rows] == [0, 0, 1, 1]
    assert math.isnan(float(rows[2]["grad_norm"]))
    assert result.skipped == 1 and all(torch.isfinite(p).all() for p in rule.parameters())
    snapshots.append(rule.log_lr.item())
    assert math.isfinite(snapshots[0])


def test_meta_gradient_is_clipped_to_its_norm_limit() -> None:
    moved = {}
    for clip in (0.0, 1e-3):
        rule = ToyMomentum()
        before = torch.stack([p.detach().clone() for p in rule.parameters()])
        result = meta_train(rule, ToyFamily(), estimator="bptt", progress=False, meta_steps=1, tasks_per_step=1,
                            unroll=5, horizon=5, eval_tasks=0, meta_optimizer="sgd", meta_lr=1.0, grad_clip=clip)
        step = torch.linalg.vector_norm(torch.stack([p.detach() for p in rule.parameters()]) - before).item()
        moved[clip] = (step, result.history[0]["grad_norm"])
    step, raw = moved[0.0]
    assert raw > 1e-2 and step == pytest.approx(raw, rel=1e-5)  # unclipped: SGD(lr=1) moves by the gradient
    step, raw_again = moved[1e-3]
    assert raw_again == pytest.approx(raw) and step == pytest.approx(1e-3, rel=1e-4)  # logged norm is pre-clip


def _truncations(random_start: bool) -> tuple[list[int], int]:
    """Truncation lengths of one slot, and the steps its first run took (log-uniform unrolls, horizon 40)."""
    result = meta_train(ToyMomentum(), ToyFamily(), estimator="bptt", progress=False, meta_steps=12, tasks_per_step=1,
                        unroll={"log_int": [2, 16]}, horizon=40, random_start=random_start, eval_tasks=0, seed=1)
    totals = [r["inner_steps"] for r in result.history]
    lengths = [b - a for a, b in zip([0, *totals], totals)]
    first_run = next(t for t, r in zip(totals, result.history) if r["runs_finished"] == 1)
    return lengths, first_run


def test_log_uniform_unrolls_and_random_starting_iterations() -> None:
    lengths, first_run = _truncations(random_start=False)
    assert len(set(lengths)) >= 4 and all(1 <= n <= 16 for n in lengths), lengths
    assert first_run == 40  # the whole horizon, in truncations of varying length
    lengths, first_run = _truncations(random_start=True)
    assert first_run < 40  # the first run started part-way (its first steps were trained without a graph)


def test_missing_data_is_reported_before_any_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    suite = tmp_path / "mnist.toml"
    suite.write_text((ROOT / "tasks" / "l2l_mnist.toml").read_text())
    monkeypatch.setenv("LEARNED_OPT_DATA", str(tmp_path / "no-data"))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="entry 'mnist-mlp-20-sigmoid'.*MNIST not found"):
        meta_train(config=suite, out=out, progress=False)
    assert not out.exists()


def test_cli_names_the_bad_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from learned_opt.meta.cli import main

    for flag, value, message in [("--unroll", "abc", "argument --unroll: invalid value 'abc'"),
                                 ("--horizon", "5:x", "argument --horizon: invalid range '5:x'"),
                                 ("--rule-config", "[1]", "argument --rule-config: expected a JSON object")]:
        with pytest.raises(SystemExit) as exc:
            main(["--config", str(QUAD), "--out", str(tmp_path / "o"), flag, value])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_errors_are_reported_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(QUAD.read_text() + "\n")
    bad.write_text(bad.read_text().replace("[meta_train]", "[meta_train]\nunrol = 20"))
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"bad\.toml.*unrol.*allowed keys"):
        meta_train(config=bad, out=out, progress=False)
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        meta_train("nope", config=QUAD, out=out, progress=False)
    with pytest.raises(ValueError, match="invalid tasks_per_step = 0"):
        meta_train(config=QUAD, out=out, progress=False, tasks_per_step=0)
    with pytest.raises(ValueError, match="choose from"):
        meta_train(config=QUAD, out=out, progress=False, estimator="sgd")
    assert not out.exists()
    rc = subprocess.run([sys.executable, str(ROOT / "scripts" / "meta_train.py"), "--config", str(bad), "--out",
                         str(out)], capture_output=True, text=True, cwd=ROOT)
    assert rc.returncode == 2 and "unrol" in rc.stderr and not out.exists()


def test_output_directory_safety(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        meta_train(config=QUAD, out=out, progress=False, **SMALL)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        meta_train(config=QUAD, out=out, resume=True, progress=False, **SMALL)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_a_second_run_on_the_same_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from learned_opt.meta.cli import main

    out = tmp_path / "run"
    with lock_directory(out):  # as a first run holds it for its whole life
        with pytest.raises(DirectoryLockError, match=f"^{out} is in use by another run \\(PID {os.getpid()} "):
            meta_train(config=QUAD, out=out, progress=False, **SMALL)
        assert main(["--config", str(QUAD), "--out", str(out), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"learned-opt meta-train: error: {out} is in use by another run") and err.count("\n") == 1
        assert os.listdir(out) == [LOCK_NAME]
    result = meta_train(config=QUAD, out=out, progress=False, **{**SMALL, "meta_steps": 1})
    assert result.step == 1 and not (out / LOCK_NAME).exists()


def test_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    out = tmp_path / "run"
    small = {**SMALL, "rule_config": {"hidden_size": 3, "num_layers": 1}}
    meta_train(config=QUAD, out=out, progress=False, **small)
    with pytest.raises(CheckpointError, match="unroll: checkpoint 5 vs now 7"):
        meta_train(config=QUAD, out=out, resume=True, progress=False, **{**small, "unroll": 7})
    more = meta_train(config=QUAD, out=out, resume=True, progress=False, **{**small, "meta_steps": 6})
    assert more.step == 6 and [int(r["step"]) for r in _rows(out)] == [1, 2, 3, 4, 5, 6]
    good = (out / CHECKPOINT_NAME).read_bytes()
    meta = json.loads(good[8:8 + int.from_bytes(good[:8], "little")])["__metadata__"]
    tree = json.loads(meta["tree"])
    tree["counters"]["skipped"] += 1  # a well-formed edit of the JSON metadata, tensors untouched
    (out / CHECKPOINT_NAME).write_bytes(save(load(good), metadata={**meta, "tree": json.dumps(tree)}))
    with pytest.raises(CheckpointError, match=f"{out / CHECKPOINT_NAME}: checkpoint checksum mismatch"):
        meta_train(config=QUAD, out=out, resume=True, progress=False, **small)
    data = bytearray(good)
    data[-5] ^= 0xFF
    (out / CHECKPOINT_NAME).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        meta_train(config=QUAD, out=out, resume=True, progress=False, **small)
    (out / CHECKPOINT_NAME).write_bytes(bytes(data[:1000]))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        meta_train(config=QUAD, out=out, resume=True, progress=False, **small)


def test_resume_refuses_changed_family_settings_naming_entry_and_key(tmp_path: Path) -> None:
    suite = tmp_path / "quad.toml"
    suite.write_text(QUAD.read_text())
    out = tmp_path / "run"
    small = {**SMALL, "meta_steps": 2, "rule_config": {"hidden_size": 3, "num_layers": 1}}
    meta_train(config=suite, out=out, progress=False, **small)
    edits = [("dim = 10", "dim = 10\ninit_scale = 2.0", r"suite entry 'quadratic-10d', settings.init_scale: checkpoint 1.0 vs now 2.0"),
             ("dim = 10", "dim = 10\ncondition = 100", r"settings.condition: checkpoint 0.0 vs now 100"),
             ("dim = 10", "dim = 12", r"suite entry 'quadratic-10d', settings.dim: checkpoint 10 vs now 12"),
             ("steps = 100", "steps = 50", r"suite entry 'quadratic-10d', steps: checkpoint 100 vs now 50"),
             ("train = [0, 100000]", "train = [0, 90000]", r"suite seeds: checkpoint"),
             ('label = "quadratic-10d"', 'label = "quad"', r"suite entries: checkpoint \['quadratic-10d'\] vs now \['quad'\]")]
    for old, new, message in edits:
        moved = tmp_path / "moved" / "quad.toml"  # the file's location may change, its contents may not
        moved.parent.mkdir(exist_ok=True)
        moved.write_text(QUAD.read_text().replace(old, new, 1))
        with pytest.raises(CheckpointError, match=message) as err:
            meta_train(config=moved, out=out, resume=True, progress=False, **{**small, "meta_steps": 3})
        assert "\n" not in str(err.value) and str(out / CHECKPOINT_NAME) in str(err.value)
    moved.write_text(QUAD.read_text())
    assert meta_train(config=moved, out=out, resume=True, progress=False, **{**small, "meta_steps": 3}).step == 3


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import learned_opt.meta.checkpoint as ckpt_module
    from learned_opt.meta.cli import main

    real_write, calls = ckpt_module.atomic_write_bytes, []

    def full_disk_on_third_checkpoint(path: Path, data: bytes) -> Path:  # checkpoints at steps 0, 2, 4
        calls.append(path)
        if len(calls) < 3:
            return real_write(path, data)
        with monkeypatch.context() as m:
            m.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, os.strerror(28))))
            return real_write(path, data)

    monkeypatch.setattr(ckpt_module, "atomic_write_bytes", full_disk_on_third_checkpoint)
    out = tmp_path / "run"
    args = ["--config", str(QUAD), "--out", str(out), "--rule-config", '{"hidden_size": 3, "num_layers": 1}',
            "--tasks-per-step", "2", "--unroll", "5", "--horizon", "10", "--eval-tasks", "0", "--meta-steps", "4",
            "--checkpoint-every", "2", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"learned-opt meta-train: error: cannot write {out / CHECKPOINT_NAME}: No space left on device")
    assert err.count("\n") == 1 and "--resume" in err
    assert ckpt_module.load_checkpoint(out / CHECKPOINT_NAME)["step"] == 2 and not list(out.glob(".*.tmp"))
    monkeypatch.setattr(ckpt_module, "atomic_write_bytes", real_write)
    assert main([*args, "--resume"]) == 0


def test_temp_file_of_a_killed_checkpoint_write_is_ignored(tmp_path: Path) -> None:
    out = tmp_path / "run"
    small = {**SMALL, "rule_config": {"hidden_size": 3, "num_layers": 1}}
    out.mkdir()  # killed while writing the very first checkpoint: only its temp file is there
    (out / f".{CHECKPOINT_NAME}.a1b2c3.tmp").write_bytes(b"torn")
    meta_train(config=QUAD, out=out, resume=True, progress=False, **{**small, "meta_steps": 2})
    # killed while overwriting a later checkpoint: the old checkpoint and a torn temp file
    (out / f".{CHECKPOINT_NAME}.d4e5f6.tmp").write_bytes((out / CHECKPOINT_NAME).read_bytes()[:500])
    result = meta_train(config=QUAD, out=out, resume=True, progress=False, **{**small, "meta_steps": 3})
    assert result.step == 3 and [int(r["step"]) for r in _rows(out)] == [1, 2, 3]
    assert not list(out.glob(".*.tmp"))


def test_resume_of_a_finished_run_keeps_its_final_meta_loss(tmp_path: Path) -> None:
    out = tmp_path / "run"
    small = {**SMALL, "meta_steps": 2, "rule_config": {"hidden_size": 3, "num_layers": 1}}
    done = meta_train(config=QUAD, out=out, progress=False, **small)
    again = meta_train(config=QUAD, out=out, resume=True, progress=False, **small)  # e.g. killed after the last checkpoint
    assert again.step == 2 and not again.history and again.final_meta_loss == done.final_meta_loss is not None
    assert json.loads((out / "final.json").read_text())["metrics"]["final_meta_loss"] == done.final_meta_loss


def test_resume_alone_reuses_the_runs_settings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    small = {**SMALL, "rule_config": {"hidden_size": 3, "num_layers": 1}}
    meta_train(config=QUAD, out=out, progress=False, **{**small, "meta_steps": 2})
    result = meta_train(out=out, resume=True, progress=False, meta_steps=4)
    assert result.step == 4 and result.config.unroll == 5 and result.config.rule_config["hidden_size"] == 3


# --------------------------------------------------------------------------------------------
# Killed at any moment, resumed, bitwise equal (real processes, SIGKILL).

CLI_ARGS = ["--config", str(QUAD), "--rule-config", '{"hidden_size": 4, "num_layers": 1}', "--tasks-per-step", "2",
            "--unroll", "3:8", "--horizon", "12", "--random-start", "--meta-steps", "20", "--checkpoint-every", "4",
            "--eval-every", "10", "--eval-tasks", "2", "--threads", "1", "--no-progress", "--seed", "3"]


def _cli(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / "meta_train.py"), *CLI_ARGS, "--out", str(out),
                             *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _logged_steps(out: Path) -> int:
    """Rows in a run's metrics.csv so far (0 before it exists); read while the run writes it."""
    try:
        return max((out / "metrics.csv").read_text().count("\n") - 1, 0)
    except OSError:
        return 0


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final.safetensors")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bitwise_equal(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    t = time.perf_counter()
    assert _cli(ref).wait() == 0
    duration = time.perf_counter() - t
    rng = random.Random(os.getpid())
    out, kills = tmp_path / "killed", 0
    proc = _cli(out)
    # The first kill lands mid-run for sure: once a random number of meta-steps is logged (a fixed
    # timeout could outlast a run that is faster than the reference, e.g. with warm caches).
    logged = rng.randint(1, 15)
    while proc.poll() is None and _logged_steps(out) < logged:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills += 1
    proc = _cli(out, "--resume")
    while True:
        try:  # then up to two more kills at random moments (startup, mid-interval, mid-write), then finish
            proc.wait(timeout=rng.uniform(0.3, duration) if kills < 3 else None)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        else:
            if proc.returncode == 0:
                break
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else proc.returncode)
        proc = _cli(out, "--resume")
    assert kills >= 1
    a, b = _final(ref), _final(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_rows, rows = _rows(ref), _rows(out)
    assert [r["step"] for r in rows] == [str(i) for i in range(1, 21)]
    assert [(r["meta_loss"], r["grad_norm"], r["val_loss"]) for r in rows] == \
        [(r["meta_loss"], r["grad_norm"], r["val_loss"]) for r in ref_rows]
    assert load_file(ref / "best.safetensors").keys() == load_file(out / "best.safetensors").keys()


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_matches(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert _cli(ref).wait() == 0
    out = tmp_path / "term"
    proc = _cli(out)
    while not (out / "metrics.csv").exists() or len(_rows(out)) < 3:
        time.sleep(0.05)
        assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait() == 128 + signal.SIGTERM
    assert b"--resume" in proc.stderr.read()
    assert _cli(out, "--resume").wait() == 0
    a, b = _final(ref), _final(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_meta_train_on_suite_object_with_es_and_pes(tmp_path: Path) -> None:
    suite = load_suite(QUAD)
    for name in ("es", "pes"):
        result = meta_train("learnable-sgd", suite, estimator=name, progress=False, meta_steps=3, tasks_per_step=2,
                            unroll=4, horizon=8, eval_tasks=0, es_pairs=2)
        assert result.step == 3 and all(math.isfinite(r["meta_loss"]) for r in result.history)
        assert result.config.estimator == name


def test_cli_help_and_subcommand_registered() -> None:
    from learned_opt.cli import SUBCOMMANDS, main

    assert SUBCOMMANDS["meta-train"][0] == "learned_opt.meta.cli"
    with pytest.raises(SystemExit) as exc:
        main(["meta-train", "--help"])
    assert exc.value.code == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_meta_train_on_cuda(tmp_path: Path) -> None:
    result = meta_train(config=QUAD, out=tmp_path / "gpu", progress=False, device="cuda",
                        rule_config={"hidden_size": 4, "num_layers": 1}, **SMALL)
    assert result.step == 4 and all(p.is_cuda for p in result.rule.parameters())
    assert all(math.isfinite(r["meta_loss"]) for r in result.history)
    resumed = meta_train(config=QUAD, out=tmp_path / "gpu", resume=True, progress=False, device="cuda",
                         rule_config={"hidden_size": 4, "num_layers": 1}, **{**SMALL, "meta_steps": 6})
    assert resumed.step == 6
