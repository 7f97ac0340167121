"""The meta-training loop: :class:`MetaTrainer` owns θ, its optimizer, the task slots and the outputs.

Each meta-step advances every task slot this rank owns by one truncation, asks the estimator for
each slot's meta-gradient, averages them (all-reduced across ranks), skips the update if anything
is non-finite, clips, and steps the meta-optimizer; then validates, logs and checkpoints on
schedule. Everything needed to continue bit for bit is checkpointed (:meth:`MetaTrainer.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learned_opt.meta.checkpoint import CHECKPOINT_NAME, output_write_errors, remove_stale_temp_files, save_checkpoint
from learned_opt.meta.config import MetaTrainConfig, Resolved
from learned_opt.meta.distributed import DistContext
from learned_opt.meta.evaluation import evaluate
from learned_opt.meta.losses import MetaLoss
from learned_opt.meta.metrics import MetricsLog, plot_curves
from learned_opt.meta.resume import run_identity
from learned_opt.meta.slots import Slot, map_tensors, new_run, new_slot, restore_slot, slot_payload
from learned_opt.rules.base import Rule
from learned_opt.tasks.base import draw

log = logging.getLogger(__name__)


@dataclass
class MetaTrainResult:
    """What a call to :func:`~learned_opt.meta.train.meta_train` produced (``history``: this call's metric rows)."""

    rule: Rule
    config: MetaTrainConfig
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    skipped: int = 0
    inner_steps: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    out: Path | None = None
    rank: int = 0
    local_slots: list[int] = field(default_factory=list)
    local_inner_steps: int = 0
    last_meta_loss: float | None = None  # of the run's last meta-step (also when this call ran none)

    @property
    def final_meta_loss(self) -> float | None:
        return self.history[-1]["meta_loss"] if self.history else self.last_meta_loss

    @property
    def inner_steps_per_s(self) -> float | None:
        """Meta-training throughput: optimizee steps per second, summed over the task batch (all ranks)."""
        return self.inner_steps / self.wall_s if self.wall_s > 0 else None


class MetaTrainingInterrupted(RuntimeError):
    """Raised when SIGINT/SIGTERM stopped a run (after its checkpoint was written)."""

    def __init__(self, result: MetaTrainResult, signum: int) -> None:
        super().__init__(f"meta-training stopped by signal {signum} at step {result.step}; "
                         f"resume with --resume --out {result.out}")
        self.result, self.signum = result, signum


@dataclass
class Counters:
    """The run's running totals (all ranks), checkpointed: a resumed run continues them."""

    skipped: int = 0
    inner_steps: int = 0
    runs_finished: int = 0
    elapsed_s: float = 0.0
    best_val: float | None = None
    best_step: int | None = None
    last_meta_loss: float | None = None


@dataclass
class StepTotals:
    """One meta-step's sums over the task slots, all-reduced across ranks as one float64 vector."""

    grads: Tensor  # flat, over θ in rule.parameters() order
    meta_loss: float
    steps: int
    finished: int

    def all_reduce(self, ctx: DistContext) -> StepTotals:
        """The sums over ranks (the context moves the vector to its communication device and back)."""
        scalars = torch.tensor([self.meta_loss, self.steps, self.finished], dtype=torch.float64,
                               device=self.grads.device)
        flat = ctx.all_reduce_sum(torch.cat([self.grads, scalars]))
        loss, steps, finished = flat[len(self.grads):].tolist()
        return StepTotals(flat[:len(self.grads)], loss, int(steps), int(finished))


@contextmanager
def stop_on_signals() -> Iterator[dict[str, int | None]]:
    """Turn the first SIGINT/SIGTERM into a flag (checked between meta-steps); a second one interrupts."""
    flag: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: Any) -> None:
        if flag["signum"] is not None:
            raise KeyboardInterrupt
        flag["signum"] = signum
        log.warning("signal %d: finishing this meta-step, then checkpointing (again to abort)", signum)

    for s in previous:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def machine_card(device: torch.device) -> dict[str, Any]:
    """The machine a run trained on, as its weight card records it."""
    info = {"node": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class MetaTrainer:
    """One meta-training run on this rank: θ, the meta-optimizer, this rank's task slots, the
    counters and (rank 0, with ``out``) the outputs. ``payload``: the checkpoint to continue."""

    def __init__(self, inputs: Resolved, ctx: DistContext, out: Path | None, payload: Mapping[str, Any] | None,
                 command: str) -> None:
        cfg, rule = inputs.config, inputs.rule
        self.cfg, self.suite, self.rule, self.estimator = cfg, inputs.suite, rule, inputs.estimator
        self.ctx, self.out, self.resumed = ctx, out, payload is not None
        self.device = ctx.device if ctx.enabled else torch.device(cfg.device)
        rule.to(self.device)
        rule.train()
        self.theta = list(rule.parameters())
        if not self.theta:
            raise ValueError(f"rule {rule.name!r} has no meta-parameters to train")
        self._broadcast_theta()
        self.opt = self._meta_optimizer()
        self.objective = MetaLoss(cfg.meta_loss, cfg.loss_cap)
        self.identity = run_identity(rule, self.estimator, self.suite)
        self.mine = ctx.share(cfg.tasks_per_step)
        self.counters, self.start, self.local_inner_steps = Counters(), 0, 0
        self.slots = self._restore(payload) if payload is not None else [new_slot(cfg.seed, i) for i in self.mine]
        self.writes = ctx.is_main and out is not None  # rank 0 alone writes files
        if self.writes:
            assert out is not None
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(out)
        self.card = self._card(command)
        self.t0 = time.perf_counter()

    # --- setup ---------------------------------------------------------------------------------
    def _broadcast_theta(self) -> None:
        """Every rank starts from rank 0's θ."""
        if self.ctx.enabled:
            import torch.distributed as dist

            for p in self.theta:
                dist.broadcast(p.data, src=0)

    def _meta_optimizer(self) -> torch.optim.Optimizer:
        if self.cfg.meta_optimizer == "adam":
            return torch.optim.Adam(self.theta, lr=self.cfg.meta_lr)
        return torch.optim.SGD(self.theta, lr=self.cfg.meta_lr)

    def _restore(self, payload: Mapping[str, Any]) -> list[Slot]:
        """Continue ``payload``: θ, the meta-optimizer, the global RNG, counters; this rank's slots."""
        with torch.no_grad():
            self.rule.load_state_dict(map_tensors(payload["theta"], lambda t: t.to(self.device)))
        self.opt.load_state_dict(map_tensors(payload["meta_optimizer"], lambda t: t.to(self.device)))
        torch.set_rng_state(payload["torch_rng"])
        self.counters = Counters(**payload["counters"])
        self.start = int(payload["step"])
        saved = {int(s["index"]): s for s in payload["slots"]}
        return [restore_slot(saved[i], self.cfg.seed, self.suite, self.device, self.estimator) for i in self.mine]

    def _card(self, command: str) -> dict[str, Any]:
        """The ``meta_training`` part of the weight cards (without the per-save counts)."""
        from learned_opt.weights import repo_relative

        suite = str(self.suite.path) if self.suite.path is not None else self.suite.name
        return {"config": {**self.cfg.to_dict(), "suite": repo_relative(self.cfg.suite)}, "seed": self.cfg.seed,
                "estimator": {"name": self.estimator.name, **self.estimator.config()},
                "suite": repo_relative(suite), "world_size": self.ctx.world_size,
                "machine": machine_card(self.device), "command": command}

    def elapsed(self) -> float:
        """Wall-clock seconds of the whole run so far (earlier calls' included)."""
        return self.counters.elapsed_s + (time.perf_counter() - self.t0)

    # --- one meta-step -------------------------------------------------------------------------
    def _estimate(self) -> StepTotals:
        """Advance this rank's slots by one truncation each; the sums of their estimates."""
        grads = [torch.zeros_like(p) for p in self.theta]
        loss_sum = torch.zeros((), dtype=torch.float64)
        steps = finished = 0
        for slot in self.slots:
            if slot.run is None or slot.run.finished:
                slot.run = new_run(slot, self.rule, self.suite, self.cfg, self.device)
            length = min(int(draw(self.cfg.unroll, slot.rng)), slot.run.remaining())
            est = self.estimator.estimate(self.rule, slot.run, length, self.objective, slot.noise)
            grads = [g + e for g, e in zip(grads, est.grads)]
            loss_sum += est.meta_loss.double().cpu()
            steps += est.steps
            finished += int(slot.run.finished)
        flat = torch.cat([g.reshape(-1).double() for g in grads])
        return StepTotals(flat, float(loss_sum), steps, finished)

    def _update(self, meta_grad: Tensor, grad_norm: float) -> None:
        """Clip ``meta_grad`` (flat) to ``grad_clip`` and step the meta-optimizer with it."""
        if self.cfg.grad_clip > 0 and grad_norm > self.cfg.grad_clip:
            meta_grad = meta_grad * (self.cfg.grad_clip / grad_norm)
        for p, g in zip(self.theta, meta_grad.split([p.numel() for p in self.theta])):
            p.grad = g.view_as(p).to(p.dtype).to(self.device)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _validate(self, step: int) -> float | str:
        """Validation loss on schedule (saving ``best`` when it improves), else ``""``."""
        cfg, c = self.cfg, self.counters
        if not (cfg.eval_tasks and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.meta_steps)):
            return ""
        v = evaluate(self.rule, self.suite, cfg, self.device, self.ctx)
        if c.best_val is None or v < c.best_val:
            c.best_val, c.best_step = v, step
            self.save("best", step, {"validation_loss": v, "validation_step": step, "validation_tasks": cfg.eval_tasks})
        return v

    def meta_step(self, step: int) -> dict[str, Any]:
        """Meta-step ``step``: estimate, all-reduce, update θ (skipped if non-finite), validate; its log row."""
        local = self._estimate()
        self.local_inner_steps += local.steps
        totals = local.all_reduce(self.ctx)
        n, c = self.cfg.tasks_per_step, self.counters
        meta_grad, meta_loss = totals.grads / n, float(totals.meta_loss / n)
        c.inner_steps += totals.steps
        c.runs_finished += totals.finished
        grad_norm = float(torch.linalg.vector_norm(meta_grad))
        c.last_meta_loss = meta_loss
        if math.isfinite(meta_loss) and math.isfinite(grad_norm):
            self._update(meta_grad, grad_norm)
        else:
            c.skipped += 1
            log.warning("meta-step %d: non-finite meta-loss/gradient, update skipped", step)
        val = self._validate(step)
        return {"step": step, "meta_loss": meta_loss, "grad_norm": grad_norm, "skipped": c.skipped,
                "inner_steps": c.inner_steps, "runs_finished": c.runs_finished, "val_loss": val,
                "wall_s": round(self.elapsed(), 3)}

    # --- outputs -------------------------------------------------------------------------------
    def checkpoint(self, step: int) -> None:
        """Write everything needed to continue after ``step`` bit for bit (slots gathered to rank 0)."""
        gathered = self.ctx.gather_to_main([slot_payload(s, self.estimator) for s in self.slots])
        if not self.writes:
            return
        assert gathered is not None and self.out is not None
        all_slots = sorted((s for part in gathered for s in part), key=lambda s: s["index"])
        save_checkpoint(self.out / CHECKPOINT_NAME, {
            "config": self.cfg.to_dict(), "identity": self.identity, "step": step, "theta": self.rule.state_dict(),
            "meta_optimizer": self.opt.state_dict(), "torch_rng": torch.get_rng_state(), "slots": all_slots,
            "counters": {**asdict(self.counters), "elapsed_s": self.elapsed()},
        })

    def save(self, name: str, step: int, metrics: Mapping[str, Any]) -> None:
        """θ as ``out/NAME.safetensors`` with its card (rank 0, with ``out``)."""
        if not self.writes:
            return
        from learned_opt.weights import save_weights

        assert self.out is not None
        with output_write_errors(self.out / f"{name}.safetensors"):
            save_weights(self.rule, self.out / name, name=f"{self.rule.name} meta-trained on {self.suite.name}",
                         meta_training={**self.card, "steps": step, "wall_time_s": round(self.elapsed(), 3),
                                        "inner_steps": self.counters.inner_steps},
                         metrics=dict(metrics))

    def _due_checkpoint(self, step: int, stopping: bool) -> bool:
        every = self.cfg.checkpoint_every
        return self.out is not None and (stopping or step == self.cfg.meta_steps or bool(every and step % every == 0))

    # --- the loop ------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> MetaTrainResult:
        """Meta-train to ``meta_steps``; raises :class:`MetaTrainingInterrupted` (after checkpointing)
        when SIGINT/SIGTERM stopped it."""
        from tqdm.auto import tqdm

        if not self.resumed and self.out is not None:
            self.checkpoint(0)  # from here on, the directory always holds a checkpoint to resume from
        metrics = None
        if self.writes:
            assert self.out is not None
            with output_write_errors(self.out / "metrics.csv"):
                metrics = MetricsLog(self.out, self.start if self.resumed else None)
        result = MetaTrainResult(self.rule, self.cfg, self.start, out=self.out, rank=self.ctx.rank,
                                 local_slots=list(self.mine))
        bar = tqdm(total=self.cfg.meta_steps, initial=self.start, disable=not (progress and self.ctx.is_main),
                   desc="meta-train", dynamic_ncols=True)
        step, signum = self.start, None
        try:
            with stop_on_signals() as stop:
                for step in range(self.start + 1, self.cfg.meta_steps + 1):
                    row = self.meta_step(step)
                    result.history.append(row)
                    if metrics is not None:
                        metrics.write(row)
                    bar.set_postfix(meta_loss=f"{row['meta_loss']:.4f}", skipped=row["skipped"])
                    bar.update(1)
                    stopping = self.ctx.any(stop["signum"] is not None)
                    if self._due_checkpoint(step, stopping):
                        self.checkpoint(step)
                    if stopping:
                        signum = int(stop["signum"] or signal.SIGTERM)
                        break
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return self._finish(result, step, signum)

    def _finish(self, result: MetaTrainResult, step: int, signum: int | None) -> MetaTrainResult:
        """Fill in ``result``; unless interrupted, write ``final.*`` and ``curves.png``."""
        c = self.counters
        result.step, result.skipped, result.inner_steps = step, c.skipped, c.inner_steps
        result.best_val, result.best_step, result.last_meta_loss = c.best_val, c.best_step, c.last_meta_loss
        result.local_inner_steps, result.wall_s = self.local_inner_steps, self.elapsed()
        if signum is not None:
            result.interrupted = True
            raise MetaTrainingInterrupted(result, signum)
        self.rule.eval()
        if self.writes:
            assert self.out is not None
            self.save("final", step, {"final_meta_loss": result.final_meta_loss, "best_validation_loss": result.best_val,
                                      "best_validation_step": result.best_step})
            with output_write_errors(self.out / "curves.png"):
                plot_curves(self.out / "metrics.csv", self.out / "curves.png")
        self.ctx.barrier()
        return result
