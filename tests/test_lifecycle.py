"""Pause, continue and stop a running session from another process, and with Ctrl-C at its terminal.

Real processes: `cloop run --no-prefect` with a simulated rig worker on loopback; `cloop pause|continue|
stop` as separate processes; SIGINT for Ctrl-C. After each step the database must be consistent: no
trial left planned/dispatched at a pause or stop, indices contiguous, and a truthful session status.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from builders import retention_text
from conftest import wait_process
from orchestrator.store import TrialStore

TRUTH = "power:a=0.9025,b=0.4861"

PROTOCOL = retention_text({"response.timeout_s": 20, "design": {"strategy": "random"},
                           "stopping": {"max_trials": 400}, "rig.wait_for_rig_s": 30},
                          name="lifecycle", description="long fixed-length session to pause and stop")


class Session:
    """A running `cloop run` plus its rig, and ways to look at its database."""

    def __init__(self, tmp_path: Path, db: str, port: int, cloop_cmd: list[str], env: dict[str, str]):
        self.db, self.cmd, self.env = db, cloop_cmd, env
        protocol = tmp_path / "lifecycle.yaml"
        protocol.write_text(PROTOCOL)
        endpoint = f"tcp://127.0.0.1:{port}"
        self.rig = subprocess.Popen(
            [*cloop_cmd, "rig", "--connect", endpoint, "--adapter", "simulated", "--truth", TRUTH, "--seed", "4",
             "--trial-seconds", "0.15", "--insecure"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "rig.log", "ab"))
        self.proc = subprocess.Popen(
            [*cloop_cmd, "run", str(protocol), "--db", db, "--bind", endpoint, "--seed", "4", "--no-prefect",
             "--insecure", "--wait-for-rig", "30"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.id = self.proc.stdout.readline().strip()
        assert self.id, self.proc.stderr.read()

    def status(self) -> str:
        with TrialStore(self.db) as store:
            return store.session(self.id)["status"]

    def trials(self) -> list[dict]:
        with TrialStore(self.db) as store:
            return store.trials(self.id)

    def completed(self) -> int:
        return sum(t["status"] == "completed" for t in self.trials())

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 45) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"orchestrator exited ({self.proc.returncode}) waiting for {what}: "
                                     f"{self.proc.stderr.read()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; status {self.status()}")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self.cmd, *args, "--db", self.db], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def assert_consistent(self) -> list[dict]:
        """At a pause or stop: nothing in flight, indices 0..n-1 once each, every trial finished."""
        trials = self.trials()
        assert [t["index"] for t in trials] == list(range(len(trials)))
        assert all(t["status"] == "completed" for t in trials), [(t["index"], t["status"]) for t in trials]
        return trials

    def close(self) -> None:
        for p in (self.proc, self.rig):
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def session(tmp_path: Path, sqlite_url: str, port: int, cloop_cmd: list[str], run_env: dict[str, str]):
    s = Session(tmp_path, sqlite_url, port, cloop_cmd, run_env)
    try:
        yield s
    finally:
        s.close()


def test_pause_continue_stop_from_another_process(session: Session) -> None:
    session.wait(lambda: session.completed() >= 2, "two trials")

    paused = session.cli("pause", session.id[:8], "--wait", "30")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip().endswith(": paused")
    held = len(session.assert_consistent())
    time.sleep(1.5)  # paused means paused: no trial is planned or presented meanwhile
    assert len(session.trials()) == held and session.status() == "paused"

    again = session.cli("pause", session.id)  # pausing a paused session is refused, with the reason
    assert again.returncode == 2 and "'paused'" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    # A second orchestrator for a live session cannot take over: the session's lease is held, nothing is changed.
    dup = session.cli("resume", session.id, "--no-prefect")
    assert dup.returncode == 2 and "being run by another orchestrator" in dup.stderr, dup.stderr
    assert len(dup.stderr.strip().splitlines()) == 1
    assert session.status() == "paused" and len(session.trials()) == held

    cont = session.cli("continue", "latest", "--wait", "30")
    assert cont.returncode == 0, cont.stderr
    session.wait(lambda: session.completed() >= held + 2, "trials after continue")

    stop = session.cli("stop", session.id, "--wait", "30")
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.strip().endswith(": stopped")
    out, err = wait_process(session.proc, 30)
    assert session.proc.returncode == 0, err
    assert "stopped by the experimenter" in out
    trials = session.assert_consistent()
    assert len(trials) >= held + 2
    with TrialStore(session.db) as store:
        row = store.session(session.id)
        assert row["status"] == "stopped" and row["stopped_at"] is not None
        states = store.model_states(session.id)
    assert all(s["probabilities"] is not None for s in states)  # every trial has its posterior recorded

    late = session.cli("continue", session.id)
    assert late.returncode == 2 and "stopped" in late.stderr


def test_ctrl_c_once_pauses_twice_stops(session: Session) -> None:
    session.wait(lambda: session.completed() >= 2, "two trials")
    session.proc.send_signal(signal.SIGINT)
    session.wait(lambda: session.status() == "paused", "pause after Ctrl-C")
    held = len(session.assert_consistent())

    cont = session.cli("continue", session.id, "--wait", "30")  # a Ctrl-C pause is continued like any pause
    assert cont.returncode == 0, cont.stderr
    session.wait(lambda: session.completed() >= held + 1, "a trial after continue")

    session.proc.send_signal(signal.SIGINT)
    session.wait(lambda: session.status() == "paused", "second pause")
    session.proc.send_signal(signal.SIGINT)
    out, err = wait_process(session.proc, 30)
    assert session.proc.returncode == 0, err
    assert "Ctrl-C" in err and "stopped by the experimenter" in out
    assert session.status() == "stopped"
    session.assert_consistent()


@pytest.mark.parametrize("command", ["pause", "continue", "stop"])
def test_unknown_session_is_a_one_line_exit_2(command: str, sqlite_url: str, cloop_cmd: list[str],
                                             run_env: dict[str, str]) -> None:
    from orchestrator.store import upgrade

    upgrade(sqlite_url)
    proc = subprocess.run([*cloop_cmd, command, "feedbeef", "--db", sqlite_url], env=run_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: no session matches 'feedbeef'"
    latest = subprocess.run([*cloop_cmd, command, "latest", "--db", sqlite_url], env=run_env, capture_output=True,
                            text=True, timeout=60)
    assert latest.returncode == 2 and latest.stderr.startswith("error: no sessions")
