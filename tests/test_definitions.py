"""Each module-level name in learned_opt/ means one thing: no two modules define the same name
(entry-point interfaces excepted), so reading a name never needs the question "which one?"."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import learned_opt

ROOT = Path(learned_opt.__file__).parent
# The same interface in every command module: ``main(argv)`` and its ``build_parser``; ``log`` is
# ``logging.getLogger(__name__)``, one per module by design.
INTERFACES = {"__all__", "main", "build_parser", "log"}  # log: the module logger idiom
# Each coordinate-wise rule's module states its own default chunk size (2**14 LSTM, 2**16 MLP).
PER_MODULE = {"DEFAULT_CHUNK_SIZE"}
# Copies in modules other work is restructuring (issue 11): the benchmark's definition stays,
# the meta/ one goes when that work lands. Remove an entry once its copy is gone.
PENDING: dict[str, str] = {}


def definitions(root: Path = ROOT) -> dict[str, list[str]]:
    """Module-level function, class and variable names -> the files (relative to the repo) defining them."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                continue
            for name in names:
                found[name].append(path.relative_to(root.parent).as_posix())
    return found


def test_each_name_is_defined_once() -> None:
    repeated = {}
    for name, files in definitions().items():
        if name in INTERFACES | PER_MODULE or len(files) < 2:
            continue
        if name in PENDING and len(files) == 2 and PENDING[name] in files:
            continue
        repeated[name] = files
    assert not repeated, f"same-named definitions in several modules: {repeated}"


def test_pending_entries_are_still_needed() -> None:
    """An allowance whose copy is gone must be dropped (so the list cannot hide a new copy)."""
    found = definitions()
    stale = [name for name, file in PENDING.items() if len(found.get(name, [])) < 2 or file not in found[name]]
    assert not stale, f"drop {stale} from PENDING: the copy is gone"


def test_the_walk_sees_classes_functions_and_constants(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("X = 1\ndef f(): pass\nclass C: pass\n")
    (pkg / "b.py").write_text("X: int = 2\ndef g():\n    f = 3\n")
    found = definitions(pkg)
    assert found["X"] == ["pkg/a.py", "pkg/b.py"] and found["f"] == ["pkg/a.py"] and "g" in found
