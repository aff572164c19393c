"""Ctrl-C at the orchestrator's terminal, in the default (Prefect) mode and with --no-prefect.

Real processes and real signals: `cloop run` in its own process group (as a terminal's foreground
job), a simulated rig worker, SIGINT sent to the whole group as a terminal does. The first Ctrl-C
pauses the session, the second stops it, `cloop run` ends within seconds, prints no traceback, and
leaves no Prefect server process behind. A SIGKILLed `cloop run` leaves none either.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import free_port
from orchestrator.store import TrialStore

TRUTH = "power:a=0.9025,b=0.4861"
SERVER_MARK = "prefect.server.api.server:create_app"


def _long_protocol(tmp_path: Path, max_trials: int = 400) -> Path:
    """The retention protocol without its probability stopping rule, so a session runs until stopped."""
    text = (Path(__file__).resolve().parents[1] / "protocols" / "retention.yaml").read_text()
    text = text.replace("model_probability: 0.99", "model_probability: null").replace(
        "max_trials: 40", f"max_trials: {max_trials}")
    path = tmp_path / "long.yaml"
    path.write_text(text)
    return path


def _servers_of(prefect_home: Path) -> list[int]:
    """Pids of Prefect API server processes started with this PREFECT_HOME (ours, not other tests')."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if SERVER_MARK.encode() in cmdline and f"PREFECT_HOME={prefect_home}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _status(db: str, session_id: str) -> str:
    with TrialStore(db) as store:
        return store.session(session_id)["status"]


def _n_trials(db: str, session_id: str) -> int:
    with TrialStore(db) as store:
        return store.session(session_id)["n_trials"]


def _wait(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _start(tmp_path: Path, cloop_cmd: list[str], run_env: dict[str, str], prefect: bool, max_trials: int = 400,
           trial_seconds: float = 0.05) -> tuple:
    db = f"sqlite:///{tmp_path / 'lab.db'}"
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    out, err = open(tmp_path / "run.out", "w+"), open(tmp_path / "run.err", "w+")
    run = subprocess.Popen(
        [*cloop_cmd, "run", str(_long_protocol(tmp_path, max_trials)), "--db", db, "--bind", endpoint, "--insecure",
         "--seed", "3", "--wait-for-rig", "120", "--prefect" if prefect else "--no-prefect"],
        env=run_env, stdout=out, stderr=err, cwd=tmp_path, start_new_session=True)
    rig = subprocess.Popen(
        [*cloop_cmd, "rig", "--connect", endpoint, "--adapter", "simulated", "--truth", TRUTH, "--seed", "3",
         "--trial-seconds", str(trial_seconds), "--insecure"],
        env=run_env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "rig.err", "w"), cwd=tmp_path,
        start_new_session=True)
    _wait(lambda: out.seek(0) == 0 and len(out.read().strip()) >= 32 or run.poll() is not None, 120, "the session id")
    out.seek(0)
    session_id = out.read().split()[0]
    return db, session_id, run, rig, out, err


@pytest.mark.parametrize("prefect", [True, False], ids=["prefect", "no-prefect"])
def test_ctrl_c_pauses_then_stops_and_leaves_no_server(tmp_path: Path, cloop_cmd: list[str],
                                                       run_env: dict[str, str], prefect: bool) -> None:
    prefect_home = Path(run_env["PREFECT_HOME"])
    db, session_id, run, rig, out, err = _start(tmp_path, cloop_cmd, run_env, prefect)
    try:
        _wait(lambda: _n_trials(db, session_id) >= 3, 180, "three trials")
        if prefect:
            assert _servers_of(prefect_home), "the Prefect mode runs a temporary Prefect server"
        os.killpg(run.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
        _wait(lambda: _status(db, session_id) == "paused", 30, "the pause")
        if prefect:
            assert _servers_of(prefect_home), "the first Ctrl-C must not reach the Prefect server"
        paused_at = _n_trials(db, session_id)
        time.sleep(1.0)
        assert _n_trials(db, session_id) == paused_at, "a paused session dispatches no trial"
        os.killpg(run.pid, signal.SIGINT)
        started = time.monotonic()
        rc = run.wait(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        for process in (run, rig):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    assert rc == 0, stdout + stderr
    assert elapsed < 10, f"cloop run took {elapsed:.1f} s to end after the second Ctrl-C"
    assert _status(db, session_id) == "stopped"
    assert f"session {session_id} stopped" in stdout
    assert "Traceback" not in stderr and "httpx" not in stderr, stderr
    assert stderr.count("waiting up to") == 1, stderr
    _wait(lambda: not _servers_of(prefect_home), 10, "the Prefect server to end")


def test_sigkilled_run_leaves_no_prefect_server_and_resume_is_quiet(tmp_path: Path, cloop_cmd: list[str],
                                                                     run_env: dict[str, str]) -> None:
    prefect_home = Path(run_env["PREFECT_HOME"])
    db, session_id, run, rig, out, err = _start(tmp_path, cloop_cmd, run_env, True, max_trials=12, trial_seconds=0.4)
    try:
        _wait(lambda: _n_trials(db, session_id) >= 2, 180, "two trials")
        assert _servers_of(prefect_home), "the Prefect mode runs a temporary Prefect server"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        _wait(lambda: not _servers_of(prefect_home), 15, "the orphaned Prefect server to end")
        # The rig reconnects to the session's own address; resume finishes the session, quietly.
        resume = subprocess.run([*cloop_cmd, "resume", session_id[:8], "--db", db], env=run_env,
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        for process in (run, rig):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for pid in _servers_of(prefect_home):
            os.kill(pid, signal.SIGKILL)
    assert resume.returncode == 0, resume.stderr
    assert f"session {session_id} completed: 12 completed" in resume.stdout, resume.stdout
    for noise in ("httpx", "HTTP Request", "Traceback", "prefect.flow_runs"):
        assert noise not in resume.stderr, resume.stderr
    # an HTTP 422 from the Prefect API, not those digits inside a pid or a timestamp
    assert not re.search(r"(?<![\d.:])422(?![\d.:])", resume.stderr), resume.stderr
    assert not _servers_of(prefect_home)
