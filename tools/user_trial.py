"""A new user's check of the shipped optimizers on a model of their own, judged on held-out data.

A 3-layer ReLU MLP (64-128-128-10) on sklearn's digits (70/30 split, inputs / 16), minibatches of
64 drawn with replacement, trained the way a user's loop would (``zero_grad``, ``backward``,
``step``). Each optimizer is reported by training loss, held-out loss and accuracy, and the weights'
norm, which shows the growth that the training loss rewards and the held-out loss punishes; for
an optimizer that adapts its rate, the final ``lr_factor``.

    python tools/user_trial.py --steps 3000 adamw default 'default[horizon=true]' 'default[weight_decay=0.001]'

An optimizer is a benchmark spec (:func:`learned_opt.bench.baselines.resolve_optimizer`): ``adamw``
is torch's AdamW at its default lr 1e-3, a shipped name or ``.safetensors`` path runs untuned,
``[horizon=true]`` tells it the run's length, other ``[key=value]`` pairs are constructor
arguments. Before the held-out evaluation each optimizer's ``eval()`` is called where it has one
(a schedule-free rule's average, as the README's loop does). docs/ablations.md ("Held-out loss")
reports its figures.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from learned_opt.bench.runner import set_eval_mode


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of sklearn's digits, 70/30, the split fixed by seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.3, random_state=0)
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)
    return as_x(xtr), torch.tensor(ytr), as_x(xte), torch.tensor(yte)


def make_optimizer(spec: str, params: Any, steps: int) -> torch.optim.Optimizer:
    """The optimizer a benchmark spec names, built as the benchmark builds it for a ``steps``-step run."""
    from learned_opt.bench.baselines import resolve_optimizer

    resolved = resolve_optimizer(spec)
    return resolved.factory(resolved.fixed_lr, steps)(list(params))


def trial(specs: Sequence[str], steps: int = 3000, seeds: Sequence[int] = (0, 1, 2)) -> list[dict[str, Any]]:
    """One row per (optimizer, seed): training loss, held-out loss and accuracy, weight norm."""
    xtr, ytr, xte, yte = digits_split()
    rows = []
    for spec in specs:
        for seed in seeds:
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                        torch.nn.ReLU(), torch.nn.Linear(128, 10))
            opt = make_optimizer(spec, model.parameters(), steps)
            batches = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                idx = torch.randint(0, len(xtr), (64,), generator=batches)
                opt.zero_grad()
                F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
                opt.step()
            set_eval_mode(opt, True)  # as the README says: a schedule-free rule evaluates at its average
            with torch.no_grad():
                out = model(xte)
                rows.append({"optimizer": spec, "seed": seed, "steps": steps,
                             "train_loss": float(F.cross_entropy(model(xtr), ytr)),
                             "test_loss": float(F.cross_entropy(out, yte)),
                             "test_accuracy": float((out.argmax(1) == yte).float().mean()),
                             "weight_norm": float(torch.cat([p.flatten() for p in model.parameters()]).norm()),
                             "lr_factor": _lr_factor(opt)})
    return rows


def _lr_factor(opt: torch.optim.Optimizer) -> float | None:
    """The first group's adapted rate factor, for the optimizers that keep one."""
    state = opt.group_state(0) if hasattr(opt, "group_state") else {}
    return float(state["lr_factor"]) if "lr_factor" in state else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="user_trial.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("optimizers", nargs="+", help="benchmark specs: adamw, a shipped name or .safetensors path, "
                        "with [horizon=true] to tell the run's length and [key=value] constructor arguments "
                        "(e.g. 'default[horizon=true,weight_decay=0.001]')")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be at least 1")
    torch.set_num_threads(1)
    try:
        rows = trial(args.optimizers, args.steps, range(args.seeds))
    except ValueError as exc:
        print(f"user_trial.py: error: {exc}", file=sys.stderr)
        return 2
    print("| optimizer | seed | train loss | test loss | test accuracy | weight norm | lr factor |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        factor = "—" if r["lr_factor"] is None else f"{r['lr_factor']:.3g}"
        print(f"| {r['optimizer']} | {r['seed']} | {r['train_loss']:.3g} | {r['test_loss']:.3g} | "
              f"{r['test_accuracy']:.3f} | {r['weight_norm']:.1f} | {factor} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
