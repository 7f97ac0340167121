"""Build hook: ship the top-level ``tasks/*.toml`` suite files as package data.

The repository's ``tasks/`` folder is the one source of truth for suites; a built wheel carries a
copy in ``learned_opt/suite_files/``, where ``learned_opt.suites.load_suite`` looks first. An
editable install reads the checkout's ``tasks/`` directly, so nothing is copied then.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SUITES_SRC = Path(__file__).resolve().parent / "tasks"


class BuildPyWithSuites(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "learned_opt" / "suite_files"
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(SUITES_SRC.glob("*.toml")):
            shutil.copy2(path, dest / path.name)


setup(cmdclass={"build_py": BuildPyWithSuites})
