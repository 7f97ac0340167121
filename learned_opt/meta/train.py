"""``meta_train(rule, tasks, estimator=...)``: resolve the inputs, then run a :class:`MetaTrainer`.

The data flow: :func:`~learned_opt.meta.config.resolve` (config, suite, rule, estimator) →
:class:`~learned_opt.meta.trainer.MetaTrainer` (θ, meta-optimizer, task slots, outputs) → per
meta-step and slot :meth:`~learned_opt.meta.estimators.GradientEstimator.estimate` (draw → unroll
and score → advance an :class:`~learned_opt.meta.unroll.InnerRun`) → the rule's update through
:func:`~learned_opt.rules.transforms.apply_update` → checkpoints (:mod:`learned_opt.meta.checkpoint`).
"""

from __future__ import annotations

import os
import shlex
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from learned_opt.lockfile import lock_directory
from learned_opt.meta.checkpoint import load_checkpoint
from learned_opt.meta.config import ConfigFile, ConfigSource, TasksSource, check_runnable, resolve
from learned_opt.meta.distributed import init_distributed
from learned_opt.meta.estimators import GradientEstimator
from learned_opt.meta.resume import check_compatible, checkpoint_to_resume, run_identity
from learned_opt.meta.trainer import MetaTrainer, MetaTrainingInterrupted, MetaTrainResult
from learned_opt.rules.base import Rule

__all__ = ["MetaTrainResult", "MetaTrainingInterrupted", "meta_train"]


def meta_train(
    rule: Rule | str | None = None,
    tasks: TasksSource = None,
    *,
    estimator: GradientEstimator | str | None = None,
    config: ConfigSource = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    **overrides: Any,
) -> MetaTrainResult:
    """Meta-train ``rule`` on ``tasks`` (a Suite, a suite name/path, or a TaskFamily).

    ``config`` is a :class:`~learned_opt.meta.config.MetaTrainConfig`, a ``[meta_train]``-style
    mapping, or a TOML file whose ``[meta_train]`` table is used (and whose ``[suite]``, if any, is
    the default ``tasks``); by default the suite file's own table; ``overrides`` are config fields
    (``meta_steps=200``...). With ``out``, writes ``metrics.csv``, checkpoints, ``best.*``/``final.*``
    weights and ``curves.png`` there; ``resume`` continues from its checkpoint (the settings must
    match). Raises :class:`MetaTrainingInterrupted` after checkpointing when stopped by SIGINT/SIGTERM.
    """
    out_dir = Path(out) if out is not None else None
    if isinstance(config, (str, os.PathLike)):
        config = ConfigFile.read(config)  # read once; its errors come before any about --out
    with _output_lock(out_dir):
        ckpt = checkpoint_to_resume(out_dir, resume)
        payload = load_checkpoint(ckpt) if ckpt is not None else None
        inputs = resolve(rule, tasks, estimator=estimator, config=config,
                         saved=payload["config"] if payload is not None else None, **overrides)
        if payload is not None:
            assert ckpt is not None
            check_compatible(payload, inputs.config, run_identity(inputs.rule, inputs.estimator, inputs.suite), ckpt)
        check_runnable(inputs)
        ctx = init_distributed(inputs.config.device)
        try:
            return MetaTrainer(inputs, ctx, out_dir, payload, command or _command()).run(progress)
        finally:
            ctx.close()


def _output_lock(out: Path | None) -> AbstractContextManager[Any]:
    """The exclusive lock on ``out`` for the process that writes there (rank 0; other ranks only read)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))
    return lock_directory(out) if out is not None and rank == 0 else nullcontext()


def _command() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
