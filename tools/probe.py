"""Probe θ variants of an ES-trained rule on the validation split, the way the ES trainer scores them.

Each member is a shipped (or given) θ with some entries set or shifted; all members run as one
batched population per validation task, told the horizon and not, and each is summarised as the
trainer's selection row (wins against tuned Adam, geometric-mean loss ratio), overall and per task
family. This is how the ablations in ``docs/ablations.md`` were measured; it reads no test seeds.

    python tools/probe.py --weights learned_opt/pretrained/default.safetensors --modes told \\
        --member 'shipped:' --member 'cosine to 0: logit_final=-11.5' --member 'alpha x 2: log_alpha+=0.693'
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from learned_opt.cli import add_threads_flag, apply_threads  # noqa: E402
from learned_opt.meta.es import ESConfig, PopulationESTrainer  # noqa: E402
from learned_opt.weights import copy_weights, read_card  # noqa: E402

Edit = tuple[str, str, float]  # (θ entry, "=" or "+=", value); an index "name[i,j]" edits one element


def parse_member(text: str) -> tuple[str, list[Edit]]:
    """``'label: a=1; b[0,1]+=2'`` -> (label, edits). ValueError naming the bad part."""
    label, _, body = text.partition(":")
    edits: list[Edit] = []
    for part in filter(None, (p.strip() for p in body.split(";"))):
        op = "+=" if "+=" in part else "="
        name, _, value = part.partition(op)
        try:
            edits.append((name.strip(), op, float(value)))
        except ValueError:
            raise ValueError(f"invalid member edit {part!r} in {text!r} (want name=value or name+=value)") from None
    return label.strip(), edits


def apply_edits(theta: Mapping[str, Tensor], edits: Sequence[Edit]) -> dict[str, Tensor]:
    out = {k: v.detach().clone().float() for k, v in theta.items()}
    for name, op, value in edits:
        base, _, index = name.partition("[")
        if base not in out:
            raise ValueError(f"unknown θ entry {base!r} (θ has {sorted(out)})")
        idx = tuple(int(i) for i in index.rstrip("]").split(",")) if index else ()
        out[base][idx] = value + (out[base][idx] if op == "+=" else 0.0)
    return out


def probe(trainer: PopulationESTrainer, members: Sequence[tuple[str, Sequence[Edit]]],
          *, modes: Sequence[str] = ("told", "free"), log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One summary row per member (the trainer rule's θ with the member's edits): wins and loss ratio
    per mode (told the horizon, free of it), and wins per task family."""
    names = [n for n, _ in trainer.rule.named_parameters()]
    start = dict(trainer.rule.named_parameters())
    vecs = [torch.cat([apply_edits(start, edits)[n].reshape(-1) for n in names]) for _, edits in members]
    k = len(vecs)
    thetas = torch.stack(vecs).repeat(len(modes), 1)
    wins, logs = torch.zeros(len(modes), k), torch.zeros(len(modes), k)
    family: dict[str, Tensor] = collections.defaultdict(lambda: torch.zeros(len(modes), k))
    for draw, r, win in trainer.validation_runs(thetas, [m == "told" for m in modes for _ in range(k)]):
        wins += win.float().view(len(modes), k)
        logs += r.view(len(modes), k)
        family[draw.label] += win.float().view(len(modes), k)
        log(f"{draw.label:18s} T={draw.steps:4d} " + " | ".join(
            m + " " + " ".join(f"{float(x):+.2f}" for x in r.view(len(modes), k)[i]) for i, m in enumerate(modes)))
    n = len(trainer.val)
    rows = []
    for j, (label, _) in enumerate(members):
        row: dict[str, Any] = {"member": label}
        for i, m in enumerate(modes):
            row[f"val_wins_{m}"], row[f"val_ratio_{m}"] = int(wins[i, j]), math.exp(float(logs[i, j]) / n)
            row[f"family_wins_{m}"] = {f: int(w[i, j]) for f, w in family.items()}
        rows.append(row)
    return rows


def rule_table(rule: str | None, weights: str | None) -> dict[str, Any]:
    """The rule to probe: the JSON table given, else the weights card's rule and config, else {}."""
    if rule is not None:
        return json.loads(rule)
    if weights is None:
        return {}
    card = read_card(weights)
    return {"name": card["rule"], **card.get("rule_config", {})}


def probe_config(args: argparse.Namespace) -> ESConfig:
    """The trainer settings of a probe: the recipe's table (its training pools shrunk to one draw),
    else the command line's; ``--rule`` and ``--weight-decay`` override either."""
    if args.recipe:
        from tools.ship import load_recipe

        recipe = Path(args.recipe)
        ship, tables, _ = load_recipe(recipe.stem, recipe.parent)
        if "population_es" not in tables:
            raise ValueError(f"{recipe}: a probe needs a [population_es] recipe (its validation draws)")
        table = {"suite": ship["suite"], **tables["population_es"]}
        table.update(pool=1, long_pool=min(table.get("long_pool", 0), 1), long_every=min(table.get("long_every", 0), 1))
        if args.rule is not None or "rule" not in table:
            table["rule"] = rule_table(args.rule, args.weights)
        cfg = ESConfig.from_table(table, args.recipe)
    else:
        cfg = ESConfig(suite=args.suite, val_tasks=args.val_tasks, seed=args.seed, horizon=tuple(args.horizon),
                       pool=1, rule=rule_table(args.rule, args.weights))
    weight_decay = args.weight_decay
    if weight_decay is None and args.weights:  # the weights run with their card's default, as shipped
        weight_decay = read_card(args.weights).get("defaults", {}).get("weight_decay")
    if weight_decay is not None:
        cfg.weight_decay = weight_decay
        cfg.validate("--weight-decay")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="probe.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="θ to start from (.safetensors; default: the rule's initial θ)")
    parser.add_argument("--rule", help="the ES rule table as JSON, as in a recipe's `rule` (default: the "
                        "--weights card's rule and config, else the learned relative Adam's defaults); "
                        "it must be the weights' rule and form, except that it may add optional controller inputs "
                        "(init_steady_gain, init_travel_gain), whose rows start at those values")
    parser.add_argument("--member", action="append", required=True,
                        help="'label: entry=value; entry[i,j]+=value; ...' (repeatable; 'label:' alone = "
                        "unchanged); entries are the rule's θ names, which an unknown name lists")
    parser.add_argument("--val-tasks", type=int, default=32, help="validation tasks drawn (default: 32)")
    parser.add_argument("--horizon", type=int, nargs=2, default=(50, 1000), metavar=("MIN", "MAX"),
                        help="log-uniform range of the tasks' horizons (default: 50 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the recipe seed whose validation draws to use (default: 0)")
    parser.add_argument("--suite", default="meta_train_general", help="suite of the tasks (default: meta_train_general)")
    parser.add_argument("--refs", help="JSON cache of tuned-Adam references (read and written)")
    parser.add_argument("--modes", default="told,free", help="runs told the horizon, free of it, or both "
                        "(default: told,free)")
    parser.add_argument("--recipe", help="a recipe TOML whose [ship] suite and [population_es] table set the "
                        "validation draws, the rule and its weight decay (--val-tasks, --horizon, --seed and --suite "
                        "are then ignored)")
    parser.add_argument("--weight-decay", type=float, help="coupled weight decay of every member's runs "
                        "(default: the --weights card's default, else the recipe's, else 0)")
    parser.add_argument("--out", default="runs/probe", help="scratch directory of the trainer (default: runs/probe)")
    add_threads_flag(parser)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    try:
        members = [parse_member(m) for m in args.member]
        cfg = probe_config(args)
        trainer = PopulationESTrainer(cfg, args.out)
        refs = Path(args.refs) if args.refs else None
        if refs is not None and refs.exists():
            trainer.refs = json.loads(refs.read_text())
        if args.weights:  # verified and fitted as a warm start is: same rule and tensors, added input rows kept
            copy_weights(trainer.rule, args.weights)
        modes = tuple(m.strip() for m in args.modes.split(","))
        if not modes or set(modes) - {"told", "free"}:
            raise ValueError(f"invalid --modes: {args.modes!r} (want told, free or told,free)")
        rows = probe(trainer, members, modes=modes)
    except ValueError as exc:
        print(f"probe.py: error: {exc}", file=sys.stderr)
        return 2
    if refs is not None:
        refs.write_text(json.dumps(trainer.refs))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
