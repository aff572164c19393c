"""Shared fixtures: real servers, free ports, the cloop command.

A test that needs a server (PostgreSQL, an X display, Prefect) skips with a clear reason on a laptop
without it, but under CI=true it fails instead: CI must exercise the real thing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_ADMIN_URL = os.environ.get("CLOOP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def need(condition: bool, reason: str) -> None:
    """Skip when a server or tool is missing on a laptop; fail under CI=true."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; bind soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cloop.db'}"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A throwaway database on the server named by ``$CLOOP_TEST_POSTGRES``; dropped afterwards.

    The URL names the server and an administrative database to connect to (default
    ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``). Skips without a server, fails under CI.
    """
    try:
        import psycopg
    except ImportError:
        need(False, "psycopg is not installed (pip install -e '.[postgres]')")
    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"cloop_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        need(False, f"PostgreSQL not reachable at {admin} (set CLOOP_TEST_POSTGRES): {exc}".splitlines()[0])
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        # Terminate leftover connections (e.g. a killed orchestrator's), then drop.
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL database URL (see `postgres_database`)."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database on each backend: a SQLite file, then a throwaway PostgreSQL database."""
    from orchestrator import store

    if request.param == "sqlite":
        sqlite_url = f"sqlite:///{tmp_path / 'cloop.db'}"
        store.upgrade(sqlite_url)
        yield sqlite_url
    else:
        with postgres_database() as pg_url:
            store.upgrade(pg_url)
            yield pg_url


@pytest.fixture(scope="session")
def cloop_cmd() -> list[str]:
    """How to start the real CLI in a subprocess (console script if installed, else -m)."""
    script = shutil.which("cloop", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "orchestrator"]


@pytest.fixture
def run_env(tmp_path: Path) -> dict[str, str]:
    """Environment for subprocesses: no Prefect telemetry, a private Prefect home, unbuffered output."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )
    env.pop("CLOOP_DB", None)
    return env


def wait_process(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"process timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return out, err
