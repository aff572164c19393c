"""A wheel install (`pip install .`, not editable) runs `cloop demo` and `cloop db upgrade`.

The wheel is built from a copy of the checkout and installed without dependencies into a fresh
virtual environment; that environment reaches the already installed dependencies through a
``.pth`` line naming this interpreter's site-packages. The commands run from a directory outside
the checkout, so only the files the wheel carries (migrations, example protocols) can be found.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                     "*.db", "*.db-*", ".pytest_cache", ".hypothesis", ".venv", "out")


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _isolation() -> list[str]:
    """Build with the installed setuptools when it can (no download); else in pip's isolated env."""
    try:
        import setuptools
        import wheel  # noqa: F401  (setuptools needs it to build wheels)
    except ImportError:
        return []
    return ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 68 else []


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(bin directory of a fresh venv holding only the cloop wheel, its environment, a work dir)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, ignore=COPY_IGNORE)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *_isolation(), "-q",
                  "-w", str(root / "dist"), str(source)], cwd=root, env=dict(os.environ), timeout=600)
    assert built.returncode == 0, built.stderr
    wheel = next((root / "dist").glob("cloop-*.whl"))

    target = root / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                cwd=root, env=dict(os.environ), timeout=60).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    deps |= {entry for entry in sys.path if Path(entry).name in ("site-packages", "dist-packages")}
    # Plain path lines (every site directory of this interpreter, a venv chained by .pth included):
    # the dependencies become importable, but .pth files there (an editable
    # install of this checkout among them) are not executed, so `orchestrator` comes from the wheel.
    Path(site, "zz_cloop_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CLOOP_DB")}
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                      "--no-index", "-q", str(wheel)], cwd=root, env=env, timeout=300)
    assert installed.returncode == 0, installed.stderr
    work = root / "elsewhere"
    work.mkdir()
    return target / "bin", env, work


def test_wheel_imports_from_the_install_not_the_checkout(wheel_env: tuple[Path, dict[str, str], Path]) -> None:
    bindir, env, work = wheel_env
    probe = _run([str(bindir / "python"), "-c",
                  "import orchestrator.resources as r; print(r.alembic_dir()); print(r.bundled_protocol('retention.yaml'))"],
                 cwd=work, env=env, timeout=60)
    assert probe.returncode == 0, probe.stderr
    for line in probe.stdout.split():
        assert Path(line).is_relative_to(bindir.parent), line
        assert not Path(line).is_relative_to(REPO), line


def test_wheel_db_upgrade_creates_the_schema(wheel_env: tuple[Path, dict[str, str], Path]) -> None:
    bindir, env, work = wheel_env
    db = work / "upgraded.db"
    result = _run([str(bindir / "cloop"), "db", "upgrade", "--db", f"sqlite:///{db}"], cwd=work, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"alembic_version", "sessions", "trials", "protocols"} <= tables


def test_wheel_demo_runs_outside_the_checkout(wheel_env: tuple[Path, dict[str, str], Path]) -> None:
    bindir, env, work = wheel_env
    db = work / "x.db"
    result = _run([str(bindir / "cloop"), "demo", "--db", f"sqlite:///{db}", "--no-prefect", "--max-trials", "8"],
                  cwd=work, env=env, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"data: sqlite:///{db}" in result.stdout
    with sqlite3.connect(db) as conn:
        (status,) = conn.execute("SELECT status FROM sessions").fetchone()
        completed = conn.execute("SELECT count(*) FROM trials WHERE status = 'completed'").fetchone()[0]
    assert status == "completed"
    assert 1 <= completed <= 8


@pytest.mark.slow
def test_wheel_demo_default_mode_as_the_readme_runs_it(wheel_env: tuple[Path, dict[str, str], Path]) -> None:
    """`cloop demo --db URL` exactly (Prefect flow on a temporary server, full session)."""
    bindir, env, work = wheel_env
    db = work / "full.db"
    env = {**env, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    result = _run([str(bindir / "cloop"), "demo", "--db", f"sqlite:///{db}"], cwd=work, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM sessions").fetchone() == ("completed",)
