"""Regenerate the shipped pretrained weights: meta-train each recipe, export it, benchmark it.

A recipe is ``tasks/pretrained/NAME.toml``: a ``[ship]`` table (which suite to meta-train on, which
suite the card's figures come from, and optionally the card's ``defaults`` and ``untold_weights``,
see :mod:`learned_opt.weights`) and an ordinary ``[meta_train]`` table. Shipping a name:

1. ``train``: meta-train the recipe into ``WORK/NAME`` (resumable: rerunning continues the run) and
   export its validation-selected ``best`` weights to ``learned_opt/pretrained/NAME.*``;
2. ``bench``: benchmark every shipped name of a suite together with the suite's ``[benchmark]``
   baselines (tuned), write ``docs/results/SUITE/`` (report, results.json, plots), record each
   name's summary row in its card, and put the generated table into README.md between markers.

``python scripts/ship_pretrained.py --all`` does both for every recipe; it is the one command that
regenerates everything under ``learned_opt/pretrained/``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from learned_opt.cli import add_threads_flag, apply_threads
from learned_opt.fileio import atomic_write_json, atomic_write_text
from learned_opt.rules import RULES
from learned_opt.suites import check_table, tomllib
from learned_opt.weights import (
    PRETRAINED_DIR, REPO, check_optional_fields, file_sha256, load_rule, read_card, repo_relative, save_weights,
    untold_weights_path,
)

RECIPE_DIR = REPO / "tasks" / "pretrained"
RESULTS_DIR = REPO / "docs" / "results"
README = REPO / "README.md"
SHIP_DEFAULTS: dict[str, Any] = {"suite": "meta_train", "benchmark_suite": "heldout", "weights": "best",
                                 "defaults": {}, "untold_weights": None}
SHARED_REFS = "es-references.json"  # tuned-Adam references shared by the ES runs of one work folder
CARD_KEYS = ("defaults", "untold_weights")  # [ship] keys copied into the card (learned_opt.weights)
TABLE_START = "<!-- generated table: {suite} (tools/ship.py) start -->"
TABLE_END = "<!-- generated table: {suite} (tools/ship.py) end -->"
# The README's first screen: a few rows of the summary (the flagship and the baselines a user would
# otherwise reach for) and the flagship's head-to-head rows, between these optional markers.
HEADLINE_START = "<!-- generated headline: {suite} (tools/ship.py) start -->"
HEADLINE_END = "<!-- generated headline: {suite} (tools/ship.py) end -->"
HEADLINE_ROWS = ("adam (tuned)", "adam (lr=1e-3)", "momentum", "adam-cosine", "schedulefree-adamw", "default",
                 "default[horizon=true]")


def list_recipes(recipe_dir: Path = RECIPE_DIR) -> list[str]:
    """Names with a recipe file."""
    return sorted(p.stem for p in recipe_dir.glob("*.toml"))


def load_recipe(name: str, recipe_dir: Path = RECIPE_DIR) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """``([ship] table with defaults, [meta_train] table, path)``; unknown keys → ValueError."""
    path = recipe_dir / f"{name}.toml"
    if not path.exists():
        raise ValueError(f"no recipe for {name!r}: {path} does not exist (recipes: {list_recipes(recipe_dir)})")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    unknown = sorted(set(data) - {"ship", "meta_train", "population_es"})
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; allowed: ['meta_train', 'population_es', 'ship']")
    ship = check_table(data.get("ship", {}), SHIP_DEFAULTS, file=path, table_name="ship")
    if ship["weights"] not in ("best", "final"):
        raise ValueError(f"{path}: [ship] weights must be 'best' or 'final', got {ship['weights']!r}")
    if ("meta_train" in data) == ("population_es" in data):
        raise ValueError(f"{path}: a recipe needs exactly one of a [meta_train] or a [population_es] table")
    trained_wd = data.get("population_es", {}).get("weight_decay", 0.0)
    if not isinstance(ship["defaults"], dict):
        raise ValueError(f"{path}: [ship] defaults must be a table, got {ship['defaults']!r}")
    if trained_wd and ship["defaults"].get("weight_decay") != trained_wd:
        raise ValueError(f"{path}: [population_es] weight_decay = {trained_wd} trains the rule with it, so "
                         f"[ship] defaults must ship it too (defaults = {{ weight_decay = {trained_wd} }})")
    if "population_es" in data:
        return ship, {"population_es": dict(data["population_es"])}, path
    return ship, dict(data["meta_train"]), path


def recipe_needs(name: str, recipe_dir: Path = RECIPE_DIR) -> list[str]:
    """The recipes ``name``'s weights are made from: its ``[ship] untold_weights`` (the weights it runs
    untold) and its ``init_weights`` (the weights its search starts from), where a recipe exists."""
    return _needs(*load_recipe(name, recipe_dir)[:2], recipe_dir)


def _needs(ship: dict[str, Any], tables: dict[str, Any], recipe_dir: Path) -> list[str]:
    """:func:`recipe_needs` of an already loaded recipe."""
    wanted = (ship["untold_weights"], tables.get("population_es", {}).get("init_weights", ""))
    return [n for n in wanted if n and (recipe_dir / f"{n}.toml").exists()]


def training_order(names: Sequence[str], recipe_dir: Path = RECIPE_DIR, *, with_needs: bool = True) -> list[str]:
    """``names`` with each recipe after those it needs (:func:`recipe_needs`): a warm start must read the
    weights its start recipe has just exported. ``with_needs`` adds the needed recipes not given, so
    regenerating ``default`` regenerates every weight it runs; else only the given ones are ordered.
    A cycle is a ValueError."""
    ordered: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"recipes need each other in a cycle: {' -> '.join((*path, name))}")
        if name not in ordered:
            for need in recipe_needs(name, recipe_dir):
                if with_needs or need in names:
                    visit(need, (*path, name))
            ordered.append(name)

    for n in names:
        visit(n, ())
    return ordered


def train(name: str, work: str | Path, *, progress: bool = True, recipe_dir: Path = RECIPE_DIR,
          pretrained_dir: Path = PRETRAINED_DIR, threads: int = 1, needs: bool = True) -> Path:
    """Meta-train recipe ``name`` in ``work/name`` (resuming a run there) and export it as shipped weights.

    ``threads`` pins torch's intra-op threads: on CPU the same count makes a run bitwise reproducible.
    ``needs`` False: some recipe it needs was not trained in this call (``--no-needs``), which the card's
    command then says: the run started from those weights as they were (shipped, or a candidate's
    earlier export with ``--export-dir``).
    """
    import torch

    from learned_opt.meta.train import meta_train

    torch.set_num_threads(threads)
    ship, table, path = load_recipe(name, recipe_dir)
    run_dir = Path(work) / name
    resume = (run_dir / "checkpoint.safetensors").exists()
    flag = "" if needs or not _needs(ship, table, recipe_dir) else " --no-needs"  # made from the shipped weights it needs
    command = f"python scripts/ship_pretrained.py {shlex.quote(name)}{flag} (recipe {repo_relative(path)})"
    if "population_es" in table:
        from learned_opt.meta.es import ESConfig, train_es

        cfg = ESConfig.from_table({"suite": ship["suite"], **table["population_es"]}, f"{path}: [population_es]")
        exported = Path(pretrained_dir) / f"{cfg.init_weights}.safetensors"
        chained = cfg.init_weights and Path(pretrained_dir) != PRETRAINED_DIR and exported.exists()
        # a candidate chain starts from the candidate it exported, not the shipped weights of that name
        train_es(cfg, run_dir, progress=progress, command=command, init_from=exported if chained else None,
                 shared_refs=Path(work) / SHARED_REFS)
    else:
        meta_train(tasks=ship["suite"], config=table, out=run_dir, resume=resume, progress=progress, command=command)
    rule, card = load_rule(run_dir / f"{ship['weights']}.safetensors")
    meta = dict(card["meta_training"])
    if ship["weights"] == "best":  # the best card's steps/wall time stop at the selected step
        final = read_card(run_dir / "final.safetensors")["meta_training"]
        meta.update(selected_step=meta["steps"], steps=final["steps"], wall_time_s=final["wall_time_s"])
    meta["recipe"] = repo_relative(path)
    meta["exported"] = f"{ship['weights']} (validation-selected)" if ship["weights"] == "best" else "final"
    meta["command"] = command
    meta["threads"] = threads
    pretrained_dir = Path(pretrained_dir)
    pretrained_dir.mkdir(parents=True, exist_ok=True)
    return save_weights(rule, pretrained_dir / name, name=name, meta_training=meta, metrics={})


def sync_card(weights: Path, ship: dict[str, Any]) -> None:
    """Write the recipe's card keys (``CARD_KEYS``) into the shipped card, checked before it is
    written: valid fields, and untold weights that exist and name none of their own. Run after
    every recipe is trained (a name's untold weights may be another recipe's output)."""
    if not weights.exists():
        raise ValueError(f"[ship] of {weights.stem!r}: {weights} does not exist; meta-train the recipe first")
    card = {k: v for k, v in read_card(weights).items() if k not in CARD_KEYS}
    card.update({k: ship[k] for k in CARD_KEYS if ship[k]})
    try:
        check_optional_fields(card, weights.with_suffix(".json"))
        untold_weights_path(weights, card)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"[ship] of {weights.stem!r}: {exc}") from exc
    atomic_write_json(weights.with_suffix(".json"), card)


def bench(suite: str, names: Sequence[str], work: str | Path, *, seeds: int | None = None, progress: bool = True,
          results_dir: Path = RESULTS_DIR, pretrained_dir: Path = PRETRAINED_DIR, readme: Path | None = README) -> Path:
    """Benchmark shipped ``names`` with ``suite``'s baselines; record figures in cards, results and README."""
    from learned_opt.bench.harness import benchmark
    from learned_opt.suites import load_suite

    loaded = load_suite(suite)
    baselines = loaded.tables.get("benchmark", {}).get("optimizers", ["adam", "sgd"])
    optimizers = {b: b for b in baselines}
    for n in names:  # a horizon-aware shipped rule is benchmarked both untold and told each run's length
        optimizers[n] = str(pretrained_dir / f"{n}.safetensors")
        rule_cls = RULES.get(read_card(optimizers[n])["rule"])  # the card names the rule (an unknown one fails in the benchmark)
        if rule_cls is not None and "total_steps" in rule_cls.hyperparameters:
            optimizers[f"{n}[horizon=true]"] = f"{optimizers[n]}[horizon=true]"
    out = Path(work) / f"bench-{loaded.name}"
    args = ["--suite", suite, "--optimizers", *optimizers, "--tune"] + (["--seeds", str(seeds)] if seeds else [])
    command = "learned-opt benchmark " + " ".join(shlex.quote(a) for a in args) + f" --out {out}"
    result = benchmark(suite, optimizers, tune=True, seeds=seeds, out=out, progress=progress, command=command)
    dest = results_dir / loaded.name
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in result.files:
        if f.suffix in (".md", ".json", ".png"):
            target = dest / f.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    rel = repo_relative(dest)
    summary = result.results["summary"]
    for name in names:
        row, told = summary.get(name), summary.get(f"{name}[horizon=true]")
        if row is not None and told is not None:
            row = {**row, "told_the_horizon": told}
        _record_metrics(pretrained_dir / f"{name}.safetensors", loaded.name, row, command, rel)
    if readme is not None:
        update_readme_table(readme, loaded.name, generated_table(result.report))
        update_readme_table(readme, loaded.name, headline_table(result.report), HEADLINE_START, HEADLINE_END,
                            required=False)
    return dest


def _record_metrics(weights: Path, suite: str, row: dict[str, Any] | None, command: str, results: str) -> None:
    if row is None:
        raise ValueError(f"benchmark summary has no row for {weights.stem!r}")
    card = read_card(weights)
    if card["sha256"] != file_sha256(weights):
        raise ValueError(f"{weights}: sha256 differs from its card; re-export before benchmarking")
    card["metrics"][suite] = {**row, "command": command, "results": f"{results}/results.json",
                              "report": f"{results}/report.md"}
    atomic_write_json(weights.with_suffix(".json"), card)


def generated_table(report: str) -> str:
    """The report's summary and per-task tables (what the README shows), one heading level down."""
    keep, out = False, []
    for line in report.splitlines():
        if line.startswith("## "):
            keep = line.startswith(("## Summary", "## Final loss", "## Test loss"))
        if keep:
            out.append("#" + line if line.startswith("## ") else line)
    return "\n".join(out).strip() + "\n"


def headline_table(report: str) -> str:
    """The summary rows of :data:`HEADLINE_ROWS` and the head-to-head rows of ``default``, as tables."""
    def rows(section: str, keep: Any) -> list[str]:
        lines = report.split(section, 1)[1].split("\n## ", 1)[0].splitlines() if section in report else []
        table = [line for line in lines if line.startswith("|")]
        picked = [line for line in table[2:] if keep(line.split("|")[1].strip())]
        return table[:2] + picked if picked else []

    summary = rows("## Summary", lambda name: name in HEADLINE_ROWS)
    pairs = rows("## Head to head", lambda name: name.split("[", 1)[0] == "default")  # not the per-task rows
    return "\n".join(summary + ([""] + pairs if pairs else [])) + "\n"


def update_readme_table(readme: Path, suite: str, table: str, start_marker: str = TABLE_START,
                        end_marker: str = TABLE_END, required: bool = True) -> None:
    """Replace the text between the suite's markers in ``readme`` (the markers must exist, unless
    not ``required``: then a README without them is left as it is)."""
    text = readme.read_text(encoding="utf-8")
    start, end = start_marker.format(suite=suite), end_marker.format(suite=suite)
    if start not in text or end not in text:
        if not required:
            return
        raise ValueError(f"{readme} lacks the markers {start!r} … {end!r} for the generated table")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(readme, f"{head}{start}\n{table}{end}{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ship_pretrained.py",
        description="Regenerate shipped weights: meta-train each recipe in tasks/pretrained/, export it to "
        "learned_opt/pretrained/, benchmark the shipped names, and write the figures into cards, docs/results/ "
        "and README.md. Rerunning resumes interrupted meta-training runs and reuses cached benchmark runs.",
    )
    parser.add_argument("names", nargs="*", help=f"recipes to ship (available: {', '.join(list_recipes())})")
    parser.add_argument("--all", action="store_true", help="every recipe")
    parser.add_argument("--work", help="meta-training runs and benchmark caches (default: runs/ship; with "
                        "--export-dir, EXPORT_DIR/runs, so a candidate never resumes a shipped recipe's run)")
    parser.add_argument("--skip-train", action="store_true", help="only benchmark the already exported weights")
    parser.add_argument("--no-needs", action="store_true", help="train only the named recipes, not those their "
                        "weights are made from (untold_weights, init_weights), which are otherwise trained first")
    parser.add_argument("--skip-bench", action="store_true", help="only meta-train and export")
    parser.add_argument("--seeds", type=int, help="benchmark seeds (default: the suite's [benchmark] table)")
    add_threads_flag(parser, "on CPU the same count gives bitwise-identical runs, so cached and fresh runs agree")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--recipe-dir", type=Path, help="read the recipes from here instead of tasks/pretrained/ "
                        "(a candidate's; needs --export-dir)")
    parser.add_argument("--export-dir", type=Path, help="export the weights here instead of learned_opt/pretrained/ "
                        "and only meta-train: a candidate is benchmarked by path, never written into the package")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.recipe_dir is not None and args.export_dir is None:
        parser.error("--recipe-dir needs --export-dir (a candidate recipe never overwrites the shipped weights)")
    if args.export_dir is not None and args.skip_train:
        parser.error("--export-dir only meta-trains and exports; --skip-train would leave nothing to do")
    recipe_dir = args.recipe_dir or RECIPE_DIR
    work = args.work or (args.export_dir / "runs" if args.export_dir is not None else "runs/ship")
    names = list_recipes(recipe_dir) if args.all else args.names
    if not names:
        parser.error("name recipes to ship, or --all")
    try:
        given, names = names, training_order(names, recipe_dir, with_needs=not (args.no_needs or args.skip_train))
        if len(names) > len(given):
            print(f"ship: also training {[n for n in names if n not in given]}, which {given} need (--no-needs: "
                  "only the named)", flush=True)
        recipes = {n: load_recipe(n, recipe_dir)[0] for n in names}
        if not args.skip_train:
            for n in names:
                print(f"ship: meta-training {n}", flush=True)
                train(n, work, progress=not args.no_progress, threads=args.threads, recipe_dir=recipe_dir,
                      pretrained_dir=args.export_dir or PRETRAINED_DIR,
                      needs=all(need in names for need in recipe_needs(n, recipe_dir)))
        if args.export_dir is not None:
            for n, ship in recipes.items():
                try:
                    sync_card(args.export_dir / f"{n}.safetensors", ship)
                except ValueError as exc:  # e.g. untold weights that were not exported beside it
                    print(f"ship: note: the card of {n} keeps none of its recipe's [ship] keys: {exc}")
            print(f"ship: exported {names} to {args.export_dir} (not shipped: benchmark them by path)")
            return 0
        for n, ship in recipes.items():  # the recipe's card keys, also on weights exported before
            sync_card(PRETRAINED_DIR / f"{n}.safetensors", ship)
        if not args.skip_bench:
            by_suite: dict[str, list[str]] = {}
            for n, ship in recipes.items():
                by_suite.setdefault(ship["benchmark_suite"], []).append(n)
            shipped_suites = _all_shipped_suites()
            for suite, members in by_suite.items():
                shipped = sorted({*members, *(n for n, s in shipped_suites.items() if s == suite)})
                print(f"ship: benchmarking {shipped} on {suite}", flush=True)
                dest = bench(suite, shipped, work, seeds=args.seeds, progress=not args.no_progress)
                print(f"ship: results in {dest}")
    except ValueError as exc:
        print(f"ship_pretrained.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _all_shipped_suites() -> dict[str, str]:
    """Every shipped name with a recipe -> its benchmark suite (a suite's table lists all its names)."""
    out = {}
    for n in list_recipes():
        if (PRETRAINED_DIR / f"{n}.safetensors").exists():
            out[n] = load_recipe(n)[0]["benchmark_suite"]
    return out


if __name__ == "__main__":
    sys.exit(main())
