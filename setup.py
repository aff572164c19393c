"""Build hook: copy the top-level ``alembic/`` and ``protocols/`` into the wheel's package.

Everything else about the build is declared in pyproject.toml. The copies land in
``orchestrator/_resources/`` where `orchestrator.resources` looks first, so ``pip install .``
gives a working ``cloop demo`` and ``cloop db upgrade`` without a source checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHIPPED = ("alembic", "protocols")


class BuildWithResources(build_py):
    """Standard build_py plus the shipped directories (skipped for editable installs)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout directly
        target = Path(self.build_lib) / "orchestrator" / "_resources"
        for name in SHIPPED:
            destination = target / name
            if destination.exists():
                shutil.rmtree(destination)
            shutil.copytree(HERE / name, destination,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithResources})
