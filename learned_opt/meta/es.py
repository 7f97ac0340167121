"""Full-horizon antithetic ES on the benchmark's own verdict, with batched population runs.

The meta-objective is what the benchmark measures: each inner run trains a sampled task for its
whole horizon (no truncation bias), and is scored by its final full-data loss relative to
**tuned Adam's** final loss on the same task (the half-decade grid of the benchmark, computed once
per task and cached), ``clamp(log((L_T/L_0 + 1e-4) / (A_T/L_0 + 1e-4)), lo, hi)`` — the log of the
benchmark's loss ratio, capped so that no one task dominates and a divergence costs ``hi``.

A meta-step draws ``tasks_per_step`` tasks from a fixed pool of training tasks (the suite's train
seeds, horizons log-uniform in ``horizon``, a share reparameterised per tensor by log-uniform
scales), and runs the whole population — ``pairs`` antithetic perturbations of θ — on each task in
one batched run (:mod:`learned_opt.meta.population`). Half the pairs are told the horizon, half are
not, so one θ learns both modes. Scores are turned into centered ranks per task (every task weighs
the same), and θ moves by Adam on the antithetic ES gradient of the mean shaped score.

Long runs are where a rule's slow failures show (weights whose norm compounds, a schedule that
never settles), and log-uniform horizons rarely draw them on the networks that fail. So a recipe
may add draws from ``long_labels`` with horizons in ``long_horizon``: one from a pool of
``long_pool`` every ``long_every`` meta-steps, and ``long_val`` of them to the validation tasks
(counted in the totals, and reported apart as ``val_long_ratio_*``).

``train_rows`` restricts the search to the named θ entries (the rest keep their start, e.g. shipped
weights loaded by ``init_weights`` while one added input's row is learned): the perturbations are
zero elsewhere, so the ES gradient and Adam's step are too.

``weight_decay`` (0 by default) meta-trains and scores the rule with that coupled weight decay
(the optimizer's ``weight_decay``: ``wd · p`` added to the gradient the rule reads), for weights
meant to ship with it as their default.

Every ``eval_every`` steps θ is scored on validation tasks (the suite's validation seeds) with and
without the horizon, counted as the benchmark counts: wins against tuned Adam (final ≤ Adam's +
1e-4 × initial) and the geometric-mean loss ratio. ``best`` is chosen on that summary: wins told
plus untold, then the product of the two ratios; a recipe that never (always) tells the horizon,
``horizon_known`` 0 (1), for weights meant for untold (told) runs, is scored and chosen in that
mode alone (the other mode's runs would only cost time).

``entry_weights`` (suite label -> weight) draws those entries of the suite with other weights, so a
recipe can reweight a shared distribution without a copy of its file.

All randomness derives from ``(seed, step)``, so a run killed and resumed from its last
checkpoint ends bitwise equal to one that never stopped (same machine, same threads).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from learned_opt.bench.metrics import WIN_TOLERANCE
from learned_opt.fileio import atomic_write_text
from learned_opt.lockfile import lock_directory
from learned_opt.meta.checkpoint import load_checkpoint, save_checkpoint
from learned_opt.meta.es_config import ESConfig
from learned_opt.meta.metrics import rows_csv
from learned_opt.meta.population import run_population, tuned_adam_final
from learned_opt.meta.references import SharedReferences
from learned_opt.rules.base import Rule, build_rule
from learned_opt.rules.relative import LearnedRelativeAdamRule
from learned_opt.rules.transforms import apply_update
from learned_opt.suites import Suite, load_suite
from learned_opt.weights import copy_weights, save_weights

CHECKPOINT = "checkpoint.safetensors"


@dataclass(frozen=True)
class TaskDraw:
    """One inner problem: a suite entry, a task seed, a horizon and optional per-tensor scales."""

    label: str
    seed: int
    steps: int
    augment_seed: int | None = None

    @property
    def key(self) -> str:
        return f"{self.label}|{self.seed}|{self.steps}"


def draw_tasks(suite: Suite, split: str, n: int, cfg: ESConfig, rng: np.random.Generator, augment: bool, *,
               long: bool = False) -> list[TaskDraw]:
    """``n`` task draws from ``split``: weighted entries, log-uniform horizons, augmentation with prob
    ``cfg.augment``; ``long`` draws from ``cfg.long_labels`` with horizons in ``cfg.long_horizon``."""
    lo, hi = cfg.long_horizon if long else cfg.horizon
    out = []
    for _ in range(n):
        entry, seed = suite.sample(split, rng, cfg.long_labels if long else None)
        steps = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        aug = int(rng.integers(2**31)) if augment and rng.random() < cfg.augment else None
        out.append(TaskDraw(entry.label, seed, steps, aug))
    return out


def log_ratio(final: Tensor, initial: float, reference: float, diverged: Tensor, clip: tuple[float, float]) -> Tensor:
    """The log loss ratio to the reference, softly capped (``c · tanh(r / c)`` on each side, so capped
    tasks still give ES a gradient); a diverged run scores the upper cap."""
    ratio = (final / initial + WIN_TOLERANCE) / (reference / initial + WIN_TOLERANCE)
    r = torch.log(torch.clamp(ratio, min=1e-30))
    lo, hi = clip
    soft = torch.where(r > 0, hi * torch.tanh(r / hi), -lo * torch.tanh(r / -lo))
    return torch.where(diverged | ~torch.isfinite(r), torch.full_like(r, hi), soft)


def centered_ranks(x: Tensor) -> Tensor:
    """Ranks of ``x`` mapped to [-0.5, 0.5] (ties share their mean rank): per-task fitness shaping, so
    every task weighs the same in the ES gradient whatever the spread of its scores."""
    n = len(x)
    if n < 2:
        return torch.zeros_like(x)
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(n, dtype=x.dtype)
    for value in x.unique():  # ties: the mean of their ranks
        tie = x == value
        ranks[tie] = ranks[tie].mean()
    return ranks / (n - 1) - 0.5


class PopulationESTrainer:
    """Owns θ, the meta-optimizer, the task pools, the reference cache, checkpoints and logs."""

    def __init__(self, cfg: ESConfig, out: str | Path, *, suite: Suite | None = None, command: str = "",
                 init_from: str | Path | None = None, shared_refs: str | Path | None = None) -> None:
        """``init_from``: where to read ``cfg.init_weights`` instead (a candidate's export of that name),
        so the run's settings still name the weights as shipped. ``shared_refs``: a JSON file of
        references shared with other runs (:class:`~learned_opt.meta.references.SharedReferences`)."""
        cfg.validate()
        self.cfg, self.out, self.command = cfg, Path(out), command
        self.suite = (suite if suite is not None else load_suite(cfg.suite)).reweighted(cfg.entry_weights)
        self.rule = es_rule(cfg.rule)
        self.init_sha256 = ""  # the file θ started from: a resumed run refuses a start that has changed since
        if cfg.init_weights:
            self.init_sha256 = copy_weights(self.rule, init_from or cfg.init_weights)
        self.theta = torch.nn.utils.parameters_to_vector(self.rule.parameters()).detach().clone().requires_grad_(True)
        self.mask = train_mask(self.rule, cfg.train_rows)
        self.meta_opt = torch.optim.Adam([self.theta], lr=cfg.meta_lr)
        pool_rng = np.random.default_rng([cfg.seed, 0x9001])
        self.pool = draw_tasks(self.suite, "train", cfg.pool, cfg, pool_rng, augment=True)
        self.val = draw_tasks(self.suite, "validation", cfg.val_tasks, cfg, np.random.default_rng([cfg.seed, 0x9002]),
                              augment=False)
        self.long_pool = draw_tasks(self.suite, "train", cfg.long_pool, cfg, np.random.default_rng([cfg.seed, 0x9003]),
                                    augment=True, long=True)
        self.val += draw_tasks(self.suite, "validation", cfg.long_val, cfg, np.random.default_rng([cfg.seed, 0x9004]),
                               augment=False, long=True)
        self.refs: dict[str, list[float]] = {}
        self.shared: SharedReferences | None = (SharedReferences(shared_refs, self.suite)
                                                if shared_refs is not None else None)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.best_theta: Tensor | None = None
        self.wall = 0.0
        self._tasks: dict[tuple[str, int], Any] = {}

    @property
    def horizon_aware(self) -> bool:
        """Whether the rule takes ``total_steps`` (else "told" and "free" runs are the same run)."""
        return "total_steps" in self.rule.hyperparameters

    # --- tasks and references ------------------------------------------------------------------
    def task(self, draw: TaskDraw) -> Any:
        key = (draw.label, draw.seed)
        if key not in self._tasks:
            self._tasks[key] = self.suite.entry(draw.label).task(draw.seed)
        return self._tasks[key]

    def scales(self, draw: TaskDraw) -> list[float] | None:
        if draw.augment_seed is None:
            return None
        rng = np.random.default_rng(draw.augment_seed)
        lo, hi = (math.log(x) for x in self.cfg.augment_range)
        n = len(self.task(draw).init_params(torch.Generator().manual_seed(0)))
        return [float(math.exp(rng.uniform(lo, hi))) for _ in range(n)]

    def reference(self, draw: TaskDraw) -> tuple[float, float]:
        """(tuned Adam's final loss, the initial loss) on the un-augmented task, cached by task and horizon
        (and read from, and added to, the shared references file when the run has one)."""
        if draw.key not in self.refs:
            found = self.shared.get(draw.key) if self.shared is not None else None
            if found is None:
                found = list(tuned_adam_final(self.task(draw), draw.seed, draw.steps))
                if self.shared is not None:
                    self.shared.put(draw.key, found)
            self.refs[draw.key] = found
        final, _, initial = self.refs[draw.key]
        return final, initial

    # --- population runs -----------------------------------------------------------------------
    def members(self, thetas: Tensor) -> dict[str, Tensor]:
        return stack_members(self.rule, thetas)

    def score(self, draw: TaskDraw, thetas: Tensor, horizons: Tensor) -> tuple[Tensor, Tensor]:
        """(capped log ratio, win flag) of each member θ on one task run; ``horizons`` 0 = not told."""
        ref, _ = self.reference(draw)
        task = self.task(draw)

        def update(member: tuple[dict[str, Tensor], Tensor], grads: Any, params: Any, state: Any, *,
                   checked: bool = False) -> Any:
            theta, horizon = member  # through the optimizer's own step path (guard and bound included)
            hparams = {"lr": 1.0, "weight_decay": self.cfg.weight_decay}
            if self.horizon_aware:
                hparams["total_steps"] = horizon
            result = apply_update(self.rule.with_theta(theta), grads, params, state, hparams, checked=checked)
            return result.updates, result.state

        eval_point = getattr(self.rule, "eval_point", None)
        result = run_population(task, draw.seed, draw.steps, (self.members(thetas), horizons), len(thetas),
                                update, self.rule.init_state, scales=self.scales(draw),
                                eval_point=None if eval_point is None else
                                lambda m, p, st: eval_point(p, st, {"total_steps": m[1]}))
        r = log_ratio(result.final_losses, result.initial_loss, ref, result.diverged, self.cfg.ratio_clip)
        win = (~result.diverged) & (result.final_losses / result.initial_loss
                                    <= ref / result.initial_loss + WIN_TOLERANCE)
        return r, win

    # --- the loop ------------------------------------------------------------------------------
    def meta_step(self) -> dict[str, Any]:
        """One ES update of θ; returns the step's log row."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.step, 1])
        picks = rng.choice(len(self.pool), size=min(cfg.tasks_per_step, len(self.pool)), replace=False)
        draws = [self.pool[int(i)] for i in picks]
        if cfg.long_every and self.step % cfg.long_every == cfg.long_every - 1:
            draws.append(self.long_pool[int(np.random.default_rng([cfg.seed, self.step, 2]).integers(cfg.long_pool))])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        eps = torch.randn(cfg.pairs, self.theta.numel(), generator=gen) * self.mask
        told = torch.from_numpy(rng.random(cfg.pairs) < cfg.horizon_known)
        center = self.theta.detach()
        thetas = torch.cat([center + cfg.sigma * eps, center - cfg.sigma * eps])
        fitness = torch.zeros(2 * cfg.pairs)
        shaped = torch.zeros(2 * cfg.pairs)
        for draw in draws:
            horizons = torch.where(told, float(draw.steps), 0.0).repeat(2)
            r, _ = self.score(draw, thetas, horizons)
            fitness += r / len(draws)
            shaped += centered_ranks(r) / len(draws)
        diff = shaped[: cfg.pairs] - shaped[cfg.pairs:]
        grad = (diff / (2 * cfg.sigma)) @ eps / cfg.pairs
        self.meta_opt.zero_grad(set_to_none=True)
        self.theta.grad = grad
        self.meta_opt.step()
        self.step += 1
        return {"train_log_ratio": float(fitness.mean()), "grad_norm": float(grad.norm())}

    def validation_runs(self, thetas: Tensor, told: Sequence[bool]) -> Iterator[tuple[TaskDraw, Tensor, Tensor]]:
        """Per validation task, ``(draw, capped log ratio, win flag)`` of each θ row, run told its
        horizon where ``told`` says so (one batched run per task)."""
        for draw in self.val:
            yield (draw, *self.score(draw, thetas, torch.tensor([float(draw.steps) if t else 0.0 for t in told])))

    @property
    def modes(self) -> tuple[str, ...]:
        """The validation modes ``best`` is chosen on: weights never (always) told the horizon,
        ``horizon_known`` 0 (1), are judged untold (told) alone, since they serve no other runs."""
        known = self.cfg.horizon_known
        return ("free",) if known == 0 else ("told",) if known == 1 else ("told", "free")

    def evaluate(self) -> dict[str, Any]:
        """The benchmark's summary of the current θ on the validation tasks in each of :attr:`modes`
        (told the horizon, "told", and not, "free"; one run serves both for a rule without one)."""
        modes = self.modes
        told = [m == "told" for m in modes] if self.horizon_aware else [False]
        wins = {m: 0 for m in modes}
        logs: dict[str, list[float]] = {m: [] for m in modes}
        thetas = self.theta.detach().unsqueeze(0).repeat(len(told), 1)
        for _, r, win in self.validation_runs(thetas, told):
            for j, mode in enumerate(modes):
                wins[mode] += int(win[min(j, len(told) - 1)])
                logs[mode].append(float(r[min(j, len(told) - 1)]))
        row: dict[str, Any] = {}
        n_long = self.cfg.long_val
        for mode in modes:
            row[f"val_wins_{mode}"] = wins[mode]
            row[f"val_ratio_{mode}"] = math.exp(sum(logs[mode]) / len(logs[mode]))
            if n_long:  # the long draws (the last ``long_val``) again on their own: they are in the totals too
                row[f"val_long_ratio_{mode}"] = math.exp(sum(logs[mode][-n_long:]) / n_long)
        return row

    def _better(self, row: Mapping[str, Any]) -> bool:
        if self.best is None:
            return True
        modes = self.modes
        key = lambda r: (sum(r[f"val_wins_{m}"] for m in modes), -math.prod(r[f"val_ratio_{m}"] for m in modes))
        return key(row) > key(self.best)

    def run(self, progress: bool = True) -> dict[str, Any]:
        """Meta-train to ``cfg.meta_steps`` (resuming from ``out`` if a checkpoint is there); returns the
        best row. ``out`` is locked for the run's life: a second run on it is refused."""
        with lock_directory(self.out):
            return self._run(progress)

    def _run(self, progress: bool) -> dict[str, Any]:
        if (self.out / CHECKPOINT).exists():
            self.restore()
        bar = tqdm(total=self.cfg.meta_steps, initial=self.step, desc="meta-train (ES)", disable=not progress)
        while not (self.history and self.history[-1]["step"] == self.cfg.meta_steps):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"step": self.step}
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.meta_steps:
                row.update(self.evaluate())
                if self._better(row):
                    self.best, self.best_theta = dict(row), self.theta.detach().clone()
                    self.export("best", self.best_theta, row)
            if self.step < self.cfg.meta_steps:
                row.update(self.meta_step())
                bar.update(1)
            self.wall += time.perf_counter() - t0
            row["wall_s"] = round(self.wall, 2)
            self.history.append(row)
            bar.set_postfix_str(f"ratio {row.get('train_log_ratio', float('nan')):+.3f}", refresh=False)
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.meta_steps:
                self.checkpoint()
        bar.close()
        self.export("final", self.theta.detach(), self.history[-1])
        return dict(self.best or {})

    # --- persistence ---------------------------------------------------------------------------
    def checkpoint(self) -> None:
        payload = {
            "config": asdict(self.cfg), "step": self.step, "theta": self.theta.detach(),
            "meta_opt": self.meta_opt.state_dict(), "refs": self.refs, "history": self.history,
            "best": self.best, "best_theta": self.best_theta, "wall": self.wall, "init_sha256": self.init_sha256,
        }
        save_checkpoint(self.out / CHECKPOINT, payload)
        atomic_write_text(self.out / "metrics.csv", rows_csv(self.history))

    def restore(self) -> None:
        payload = load_checkpoint(self.out / CHECKPOINT)
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()}
        mine, defaults = asdict(self.cfg), asdict(ESConfig())  # a key added since the checkpoint: its default
        changed = sorted(k for k in mine if k not in ("meta_steps",) and saved.get(k, defaults[k]) != mine[k])
        if changed:
            raise ValueError(f"{self.out / CHECKPOINT}: settings differ from the checkpoint's: {changed}")
        started = payload.get("init_sha256") or ""  # absent from checkpoints written before it was kept
        if started and started != self.init_sha256:
            raise ValueError(f"{self.out / CHECKPOINT}: the run started from weights {started[:12]}…, but "
                             f"init_weights {self.cfg.init_weights!r} are now {self.init_sha256[:12] or 'none'}…; "
                             "move the run directory away to train from the new weights")
        if int(payload["step"]) > self.cfg.meta_steps:
            raise ValueError(f"{self.out / CHECKPOINT}: the run is at step {int(payload['step'])}, past meta_steps = "
                             f"{self.cfg.meta_steps}; give meta_steps >= {int(payload['step'])} (its best.* holds the "
                             "selection so far)")
        with torch.no_grad():
            self.theta.copy_(payload["theta"])
        self.meta_opt.load_state_dict(payload["meta_opt"])
        self.refs = {k: list(v) for k, v in payload["refs"].items()}
        self.step, self.history, self.wall = int(payload["step"]), list(payload["history"]), float(payload["wall"])
        if self.history and self.history[-1]["step"] == self.step < self.cfg.meta_steps:
            self.history.pop()  # a run's closing evaluation-only row: redone when a longer run continues it
        self.best, self.best_theta = payload["best"], payload["best_theta"]

    def export(self, name: str, theta: Tensor, row: Mapping[str, Any]) -> Path:
        """θ as ``out/NAME.safetensors`` + card (loadable with ``learned_opt.load_optimizer``)."""
        rule = es_rule(self.cfg.rule)
        torch.nn.utils.vector_to_parameters(theta.detach().clone(), rule.parameters())
        meta = {"engine": "population-es", "config": asdict(self.cfg), "steps": self.step,
                "wall_time_s": round(self.wall, 1), "command": self.command, "selected": dict(row)}
        return save_weights(rule, self.out / name, name=name, meta_training=meta)


def stack_members(rule: torch.nn.Module, thetas: Tensor) -> dict[str, Tensor]:
    """Stacked θ vectors ``[P, D]`` (``parameters_to_vector`` order) as a stacked θ dict by name:
    what a population run vmaps over, one member per row."""
    out, i = {}, 0
    for name, p in rule.named_parameters():
        out[name] = thetas[:, i:i + p.numel()].reshape(len(thetas), *p.shape)
        i += p.numel()
    return out


def es_rule(table: Mapping[str, Any]) -> Rule:
    """The rule a ``rule = {...}`` table names: ``name`` (default the learned relative Adam) and its
    config. It must offer ``with_theta`` (a θ-given proxy for the batched runs)."""
    config = dict(table)
    rule = build_rule(config.pop("name", LearnedRelativeAdamRule.name), config)
    if not callable(getattr(rule, "with_theta", None)):
        raise ValueError(f"rule {rule.name!r} cannot be meta-trained by population ES (it has no with_theta)")
    return rule


def train_mask(rule: torch.nn.Module, rows: Sequence[str]) -> Tensor:
    """1 on the θ entries ES trains (``rows``; none named: all of θ), 0 elsewhere, in
    ``parameters_to_vector`` order; a name the rule lacks is a ValueError."""
    entries = dict(rule.named_parameters())
    unknown = sorted(set(rows) - set(entries))
    if unknown:
        raise ValueError(f"[population_es] train_rows {unknown}: not θ entries of this rule ({sorted(entries)})")
    return torch.cat([torch.full((p.numel(),), float(not rows or name in rows)) for name, p in entries.items()])


def train_es(cfg: ESConfig, out: str | Path, *, suite: Suite | None = None, progress: bool = True,
             command: str = "", init_from: str | Path | None = None,
             shared_refs: str | Path | None = None) -> dict[str, Any]:
    """Meta-train the learned relative Adam with full-horizon ES (resumes from ``out``); the best row.
    ``shared_refs``: a references file shared with other runs (as ``ship_pretrained.py`` gives its runs)."""
    return PopulationESTrainer(cfg, out, suite=suite, command=command, init_from=init_from,
                               shared_refs=shared_refs).run(progress)
