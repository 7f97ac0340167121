"""Resuming: which checkpoint an output directory holds, and whether this run may continue it.

A run continues a checkpoint only with the same settings (but those in :data:`RESUMABLE_CHANGES`),
rule, estimator and suite contents; every difference is named in one error line.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from learned_opt.lockfile import LOCK_NAME
from learned_opt.meta.checkpoint import CHECKPOINT_NAME, CheckpointError
from learned_opt.meta.config import MetaTrainConfig
from learned_opt.meta.estimators import GradientEstimator
from learned_opt.rules.base import Rule
from learned_opt.suites import Suite

# Settings that may change when resuming (the suite is compared by its contents, suite_identity, not its path).
RESUMABLE_CHANGES = ("meta_steps", "checkpoint_every", "device", "suite")
UNSET = "<unset>"  # how a suite entry key present on one side only reads in a resume mismatch


def checkpoint_to_resume(out: Path | None, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh); ValueError for unsafe combinations."""
    if out is None:
        if resume:
            raise ValueError("resume needs an output directory (--out) holding a checkpoint")
        return None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    # Temp files of an interrupted atomic write and the lock file do not count as output.
    nonempty = out.is_dir() and any(not (p.name == LOCK_NAME or p.name.startswith(".") and p.name.endswith(".tmp"))
                                    for p in out.iterdir())
    ckpt = out / CHECKPOINT_NAME
    if not resume:
        if nonempty:
            raise ValueError(f"--out {out} is not empty; pass --resume to continue the run there, or choose a new directory")
        return None
    if ckpt.is_file():
        return ckpt
    if nonempty:
        raise ValueError(f"--resume: {out} holds no {CHECKPOINT_NAME}; refusing to start a fresh run over existing output")
    return None


def run_identity(rule: Rule, estimator: GradientEstimator, suite: Suite) -> dict[str, Any]:
    """What a checkpoint must share with the run resuming it, besides the config (JSON-able)."""
    return jsonish({"rule": rule.name, "rule_config": rule.config(), "estimator": estimator.name,
                    "estimator_config": estimator.config(), "suite": suite_identity(suite)})


def suite_identity(suite: Suite) -> dict[str, Any]:
    """Everything of ``suite`` that decides a run's tasks (its file's location does not): the seed
    splits and, per entry in order, its family, steps, weight and resolved settings (defaults included)."""
    return jsonish({
        "seeds": {split: [r.start, r.stop] for split, r in suite.seeds.items()},
        "entries": [{"label": e.label, "family": e.family.name, "steps": e.steps, "weight": e.weight,
                     **{f"settings.{k}": v for k, v in e.family.settings.items()}} for e in suite.entries],
    })


def _suite_diffs(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """One line per difference of two :func:`suite_identity` values, naming the entry and key."""
    labels = [e["label"] for e in saved["entries"]], [e["label"] for e in now["entries"]]
    if labels[0] != labels[1]:
        return [f"suite entries: checkpoint {labels[0]!r} vs now {labels[1]!r}"]
    diffs = [] if saved["seeds"] == now["seeds"] else [f"suite seeds: checkpoint {saved['seeds']!r} vs now {now['seeds']!r}"]
    for old, new in zip(saved["entries"], now["entries"]):
        diffs += [f"suite entry {old['label']!r}, {k}: checkpoint {old.get(k, UNSET)!r} vs now {new.get(k, UNSET)!r}"
                  for k in sorted(set(old) | set(new)) if old.get(k, UNSET) != new.get(k, UNSET)]
    return diffs


def check_compatible(payload: Mapping[str, Any], config: MetaTrainConfig, identity: Mapping[str, Any],
                     source: Path) -> None:
    """CheckpointError listing every setting that differs from the checkpoint's (one line)."""
    saved, now = payload["config"], config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
    saved_identity = payload["identity"]
    diffs += [f"{k}: checkpoint {saved_identity.get(k)!r} vs now {v!r}"
              for k, v in identity.items() if k != "suite" and saved_identity.get(k) != v]
    diffs += _suite_diffs(saved_identity["suite"], identity["suite"])
    if diffs:
        raise CheckpointError(f"{source} does not match this run's settings: {'; '.join(diffs)} "
                              f"(resume with the same settings and suite, or use a new --out)")


def jsonish(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists; other objects their repr)."""
    if isinstance(value, Mapping):
        return {str(k): jsonish(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonish(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
