"""The non-editable installed package finds its suite files by name (they are package data)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


@pytest.mark.slow
def test_non_editable_install_finds_suites_by_name(tmp_path):
    # The wheel is built by the interpreter running the tests, from its own environment (no
    # isolation, no index): never the base interpreter's packages, which a fresh venv does not see.
    assert _release(version("setuptools")) >= (70, 1), (
        "building the wheel needs setuptools >= 70.1 (bdist_wheel built in): pip install -e '.[dev]'")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "suite_files")
    shutil.copytree(REPO / "learned_opt", src / "learned_opt", ignore=ignore)
    shutil.copytree(REPO / "tasks", src / "tasks")
    shutil.copytree(REPO / "tools", src / "tools", ignore=ignore)  # in the tree, but not in the wheel
    site = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        check=True, cwd=tmp_path, env=env,
    )
    shutil.rmtree(src)  # the installed copy must not depend on the source tree
    assert not (site / "tools").exists() and not (site / "learned_opt" / "ship.py").exists(), "release tooling installed"
    probe = (
        "import learned_opt, learned_opt.suites as s\n"
        "suite = s.load_suite('heldout')\n"
        "print(learned_opt.__file__); print(suite.path); print(len(suite.entries)); print(sorted(s.list_suites()))\n"
        "import torch; p = [torch.nn.Parameter(torch.ones(2))]\n"  # default's two weight sets ship together
        "print(learned_opt.load_optimizer('default', p).card['name'], "
        "learned_opt.load_optimizer('default', p, total_steps=5).card['name'])\n"
    )
    # the installed copy comes first on sys.path; its dependencies (torch, ...) come from this environment
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path, env={**env, "PYTHONPATH": str(site)},
                         capture_output=True, text=True).stdout.splitlines()
    module_file, suite_path, n_entries, names, default_names = out
    assert default_names == "default-travel default"
    assert Path(module_file).is_relative_to(site), module_file
    assert Path(suite_path).is_relative_to(site) and Path(suite_path).parent.name == "suite_files"
    assert int(n_entries) >= 12
    assert {"heldout", "meta_train", "l2l_quadratic", "l2l_mnist"} <= set(eval(names))
    assert Path(suite_path).read_text() == (REPO / "tasks" / "heldout.toml").read_text()
