"""`cloop resume` after SIGKILL: nothing lost, nothing duplicated, the same stimuli as an uninterrupted run.

Real processes on loopback (orchestrator `cloop run`/`cloop resume --no-prefect`, simulated rig worker
with a result journal) driven by the harness in benchmarks/kill_resume.py; the full >= 20-cycle run is
`python benchmarks/kill_resume.py --cycles 20`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from orchestrator.store import TrialStore, upgrade
from orchestrator.protocol_checks import parse_checked

ROOT = Path(__file__).resolve().parent.parent


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kill_resume", ROOT / "benchmarks" / "kill_resume.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kill_resume"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


kill_resume = _harness()


def _assert_no_loss(figures: dict, trials: int) -> None:
    assert figures["cycles"] >= 1 and figures["trials"] == trials, figures
    assert figures["trials_lost"] == 0, figures
    assert figures["trials_duplicated"] == 0, figures
    assert figures["trials_not_completed"] == 0, figures
    assert figures["sequence_equal"], figures
    assert figures["session_status"] == "completed" and figures["reference_status"] == "completed", figures
    assert figures["rig_represented_trials"] == 0, figures  # in-flight trials were reconciled, not re-presented
    assert figures["completed_trials_missing_model_state"] == 0, figures


def test_sigkill_and_resume_sqlite(tmp_path: Path) -> None:
    """3 SIGKILLs (two with a trial in flight at the rig) with the adaptive design; resume each time."""
    db = f"sqlite:///{tmp_path / 'kill.db'}"
    figures = kill_resume.run_on(db, db, cycles=3, trials=7, seed=5, workdir=tmp_path,
                                 modes=["in_flight", "anywhere", "in_flight"])
    _assert_no_loss(figures, 7)
    assert figures["cycles"] == 3
    assert figures["kills_with_trial_in_flight"] >= 1, figures["kills"]


def test_sigkill_and_resume_postgres(tmp_path: Path, postgres_url: str) -> None:
    """The same on PostgreSQL (reference and resumed session share the database)."""
    figures = kill_resume.run_on(postgres_url, postgres_url, cycles=2, trials=5, seed=8, workdir=tmp_path,
                                 modes=["in_flight", "anywhere"])
    _assert_no_loss(figures, 5)
    assert figures["cycles"] == 2


# -- refusals and closing the books, without rigs -------------------------------------------------


def _session_with_open_trial(url: str, status: str) -> str:
    """A session as a killed orchestrator leaves it: one completed trial and one dispatched."""
    loaded_text = kill_resume.protocol_text("random")
    from orchestrator.protocol import parse_protocol_text

    upgrade(url)
    loaded = parse_checked(loaded_text)
    with TrialStore(url) as store:
        sid = store.create_session(protocol_id=store.add_protocol(loaded), subject_id=store.subject("m1"), seed=3,
                                   bind="tcp://127.0.0.1:1", status=status,
                                   meta={"request": {"protocol_path": "x.yaml", "db_url": url}})
        done = store.plan_trial(sid, 0, {"stimulus": {"lag": 3}, "strategy": "random", "reason": "", "score": None,
                                         "compute_ms": 1.0})
        store.mark_dispatched(done, 1, None)
        store.complete_trial(done, {"rig_id": "r", "response": {"value": 4}, "timing": {}, "attempt": 1}, 4.0)
        open_ = store.plan_trial(sid, 1, {"stimulus": {"lag": 9}, "strategy": "random", "reason": "", "score": None,
                                          "compute_ms": 1.0})
        store.mark_dispatched(open_, 1, None)
    return sid


@pytest.mark.parametrize("session", ["0123456789abcdef", "nope"])
def test_resume_unknown_session_is_exit_2(session: str, sqlite_url: str, cloop_cmd: list[str],
                                          run_env: dict[str, str]) -> None:
    _session_with_open_trial(sqlite_url, "interrupted")
    proc = subprocess.run([*cloop_cmd, "resume", session, "--db", sqlite_url, "--no-prefect"],
                          env=run_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and session in lines[0], proc.stderr


@pytest.mark.parametrize("status", ["completed", "stopped"])
def test_resume_refuses_a_finished_session(status: str, sqlite_url: str, cloop_cmd: list[str],
                                           run_env: dict[str, str]) -> None:
    sid = _session_with_open_trial(sqlite_url, status)
    proc = subprocess.run([*cloop_cmd, "resume", "latest", "--db", sqlite_url, "--no-prefect"],
                          env=run_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"session {sid} is already {status}" in proc.stderr
    with TrialStore(sqlite_url) as store:  # nothing was touched
        assert store.session(sid)["status"] == status
        assert [t["status"] for t in store.trials(sid)] == ["completed", "dispatched"]


def test_stop_of_a_dead_session_closes_the_books(sqlite_url: str, cloop_cmd: list[str],
                                                 run_env: dict[str, str]) -> None:
    """No orchestrator runs it: `cloop stop` marks it stopped and the unreconcilable in-flight trial abandoned."""
    sid = _session_with_open_trial(sqlite_url, "interrupted")
    proc = subprocess.run([*cloop_cmd, "stop", sid[:6], "--db", sqlite_url], env=run_env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "stopped" in proc.stdout
    with TrialStore(sqlite_url) as store:
        row = store.session(sid)
        assert row["status"] == "stopped" and row["stopped_at"] is not None
        trials = store.trials(sid)
    assert [(t["index"], t["status"]) for t in trials] == [(0, "completed"), (1, "abandoned")]
    again = subprocess.run([*cloop_cmd, "resume", sid, "--db", sqlite_url, "--no-prefect"], env=run_env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already stopped" in again.stderr


def test_resume_with_no_rig_keeps_the_session_resumable(sqlite_url: str, cloop_cmd: list[str],
                                                        run_env: dict[str, str]) -> None:
    """Resume rebinds the stored address; with no rig it gives up cleanly and leaves the trial in flight."""
    sid = _session_with_open_trial(sqlite_url, "running")
    from conftest import free_port

    port = free_port()  # rebind somewhere free: the stored tcp://127.0.0.1:1 is privileged
    proc = subprocess.run([*cloop_cmd, "resume", sid, "--db", sqlite_url, "--no-prefect", "--insecure",
                           "--bind", f"tcp://127.0.0.1:{port}", "--wait-for-rig", "0.5"],
                          env=run_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[0] == sid
    assert "no rig" in proc.stderr
    with TrialStore(sqlite_url) as store:
        assert store.session(sid)["status"] == "no_rig"
        assert [t["status"] for t in store.trials(sid)] == ["completed", "dispatched"]  # still reconcilable


def test_resume_security_override_replaces_the_stored_mode(tmp_path: Path, sqlite_url: str, cloop_cmd: list[str],
                                                           run_env: dict[str, str]) -> None:
    """A session run with --insecure can be resumed with --keys (the stored --insecure is dropped, not combined)."""
    sid = _session_with_open_trial(sqlite_url, "interrupted")
    proc = subprocess.run([*cloop_cmd, "resume", sid, "--db", sqlite_url, "--no-prefect", "--keys",
                           str(tmp_path / "no-keys-here"), "--wait-for-rig", "0.5"],
                          env=run_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "not both" not in proc.stderr and "key" in proc.stderr.splitlines()[-1]
    with TrialStore(sqlite_url) as store:  # refused before binding: the session is untouched
        assert store.session(sid)["status"] == "interrupted"
        assert [t["status"] for t in store.trials(sid)] == ["completed", "dispatched"]
