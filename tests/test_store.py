"""TrialStore on real SQLite and PostgreSQL databases, and the `db upgrade`/`sessions`/`trials` commands."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time
from pathlib import Path
from typing import Iterator

import pytest
import typer
from sqlalchemy.exc import IntegrityError
from typer.testing import CliRunner

from orchestrator import store as st
from orchestrator.cli_data import register
from store_factory import build_session, loaded_protocol


@pytest.fixture
def store(url: str) -> Iterator[st.TrialStore]:
    with st.TrialStore(url) as s:
        yield s


def _session(store: st.TrialStore, **kw: object) -> str:
    pid = store.add_protocol(loaded_protocol())
    return store.create_session(protocol_id=pid, subject_id=store.subject("s1"), seed=11, bind="tcp://x:1",
                                design="random", code_version="v", **kw)  # type: ignore[arg-type]


def test_protocol_and_subject_are_deduplicated(store: st.TrialStore) -> None:
    loaded = loaded_protocol()
    assert store.add_protocol(loaded) == store.add_protocol(loaded)
    assert store.subject("mouse-7") == store.subject("mouse-7") != store.subject("mouse-8")
    sid = _session(store)
    info = store.session(sid)
    assert info["protocol_text"] == loaded.text and info["protocol_sha256"] == loaded.sha256
    assert len(sid) == 32 and int(sid, 16) >= 0 and info["seed"] == 11 and info["subject"] == "s1"
    with pytest.raises(st.StoreError, match="subject name must not be empty"):
        store.subject("  ")


def test_trial_lifecycle_is_written_before_dispatch_and_completed_after(store: st.TrialStore) -> None:
    sid = _session(store)
    decision = {"stimulus": {"lag": 12}, "strategy": "mutual_information", "reason": "max info", "score": 0.3,
                "compute_ms": 17.5}
    tid = store.plan_trial(sid, 0, decision)
    (row,) = store.trials(sid)
    assert row["status"] == "planned" and row["attempts"] == 0 and row["stimulus"] == {"lag": 12}
    assert row["dispatched_at"] is None and row["planned_at"].tzinfo is dt.timezone.utc

    store.mark_dispatched(tid, 1, None)  # rig unknown at dispatch time
    assert store.trials(sid)[0]["status"] == "dispatched" and store.attempts(tid) == 1
    store.record_attempt_failure(tid, 1, "attempt 1: RigLost: heartbeat lost")
    assert store.trials(sid)[0]["status"] == "planned"
    store.mark_dispatched(tid, 2, None)

    presented = dt.datetime(2026, 5, 4, 3, 2, 1, 123456, tzinfo=dt.timezone.utc)
    worker = {"presented_at": 100.5, "responded_at": 101.0}
    mapped = {"presented_at": presented.timestamp(), "responded_at": presented.timestamp() + 0.5}
    store.complete_trial(tid, {"rig_id": "rig-9", "response": {"value": 6, "rt_s": 0.4}, "timing": worker,
                               "mapped_timing": mapped}, 6.0, None)
    (row,) = store.trials("latest")
    assert row["status"] == "completed" and row["value"] == 6.0 and row["attempts"] == 2
    assert row["response"] == {"value": 6, "rt_s": 0.4} and row["rig_id"] == "rig-9"
    assert row["presented_at"] == presented  # microseconds and UTC survive the round trip
    assert row["responded_at"] == presented + dt.timedelta(seconds=0.5)
    assert row["recorded_at"] >= row["dispatched_at"] >= row["planned_at"]
    attempts = store.attempt_rows(sid)
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, "failed"), (2, "completed")]
    assert attempts[0]["error"] == "attempt 1: RigLost: heartbeat lost"
    assert attempts[1]["worker_times"] == {"presented_at": 100.5, "responded_at": 101.0}
    assert attempts[1]["rig_id"] == "rig-9"
    assert store.attempts(tid) == 2
    with pytest.raises(st.StoreError, match="already completed"):
        store.complete_trial(tid, {"response": {"value": 1}}, 1.0, None)

    store.record_model_state(tid, {"power": 0.7, "exponential": 0.3}, {"power": {"params": {"a": {"mean": 0.9}}}}, None)
    (ms,) = store.model_states(sid)
    assert ms["probabilities"] == {"power": 0.7, "exponential": 0.3}
    assert ms["decision"] == {"stimulus": {"lag": 12}, "strategy": "mutual_information", "reason": "max info",
                              "score": 0.3}
    assert ms["decision_ms"] == 17.5
    assert store.observations(sid) == [({"lag": 12}, 6.0)]
    assert store.next_index(sid) == 1


def test_invalid_response_keeps_raw_payload_and_error(store: st.TrialStore) -> None:
    sid = _session(store)
    tid = store.plan_trial(sid, 0, {"stimulus": {"lag": 3}, "strategy": "random", "reason": "r", "score": float("nan"),
                                    "compute_ms": 1.0})
    store.mark_dispatched(tid, 1, "rig-a")
    store.complete_trial(tid, {"rig_id": "rig-a", "response": {"value": float("nan"), "note": [1, 2]}, "timing": {}},
                         None, "value is NaN")
    (row,) = store.trials(sid)
    assert row["status"] == "invalid" and row["value"] is None and row["error"] == "value is NaN"
    assert row["response"] == {"value": "NaN", "note": [1, 2]}  # PostgreSQL json cannot hold a bare NaN
    assert store.model_states(sid)[0]["decision"]["score"] is None
    assert store.observations(sid) == []
    assert store.trial_counts(sid)["invalid"] == 1


def test_fail_abandon_and_counts(store: st.TrialStore) -> None:
    sid = _session(store)
    ids = [store.plan_trial(sid, i, {"stimulus": {"lag": i}, "strategy": "sweep", "reason": "", "score": None,
                                     "compute_ms": 0.1}) for i in range(4)]
    store.mark_dispatched(ids[0], 1, "rig-a")
    store.fail_trial(ids[0], "no response after 3 attempts")
    store.mark_dispatched(ids[1], 1, "rig-a")
    assert [t["index"] for t in store.open_trials(sid)] == [1, 2, 3]
    assert store.abandon_open_trials(sid, "orchestrator crashed") == 3
    counts = store.trial_counts(sid)
    assert counts == {"planned": 0, "dispatched": 0, "completed": 0, "invalid": 0, "failed": 1, "abandoned": 3}
    with pytest.raises(st.StoreError, match="is abandoned; cannot dispatch"):
        store.mark_dispatched(ids[2], 1, None)
    store.set_session_status(sid, "stopped", stopped=True)
    (info,) = store.sessions()
    assert info["status"] == "stopped" and info["stopped_at"] is not None and info["n_trials"] == 4
    with pytest.raises(st.StoreError, match="session status 'bogus'"):
        store.set_session_status(sid, "bogus")


def test_database_constraints_hold(store: st.TrialStore) -> None:
    sid = _session(store)
    store.plan_trial(sid, 0, {"stimulus": {"lag": 1}, "strategy": "random", "reason": "", "score": None,
                              "compute_ms": 0})
    with pytest.raises(IntegrityError):  # (session, index) is unique
        store.plan_trial(sid, 0, {"stimulus": {"lag": 2}, "strategy": "random", "reason": "", "score": None,
                                  "compute_ms": 0})
    with pytest.raises(IntegrityError):  # foreign keys are enforced (also on SQLite)
        store.plan_trial("0" * 32, 0, {"stimulus": {"lag": 2}, "strategy": "random", "reason": "", "score": None,
                                       "compute_ms": 0})
    with pytest.raises(st.StoreError, match="no stimulus dict"):
        store.plan_trial(sid, 1, {"strategy": "random"})


def test_session_lookup_by_prefix_latest_and_errors(store: st.TrialStore) -> None:
    with pytest.raises(st.SessionNotFound, match="no sessions in the database yet"):
        store.resolve_session("latest")
    a = _session(store, session_id="abc1" + "0" * 28)
    time.sleep(0.002)
    b = _session(store, session_id="abc2" + "0" * 28)
    assert store.resolve_session("latest") == b
    assert store.resolve_session("abc1") == a and store.resolve_session(b) == b
    with pytest.raises(st.SessionNotFound, match="ambiguous"):
        store.resolve_session("abc")
    with pytest.raises(st.SessionNotFound, match="no session matches 'zz9'"):
        store.trials("zz9")
    with pytest.raises(st.SessionNotFound, match="no session matches 'a%'"):  # LIKE wildcards are escaped
        store.resolve_session("a%")


def test_rigs_are_upserted(store: st.TrialStore) -> None:
    store.upsert_rig({"rig_id": "r1", "adapters": ["simulated"], "capabilities": {"response_kinds": ["binomial"]},
                      "software_version": "1"})
    store.upsert_rig({"rig_id": "r1", "adapters": ["psychopy"], "software_version": "2"})
    (rig,) = store.rigs()
    assert rig["adapters"] == ["psychopy"] and rig["software_version"] == "2"
    assert rig["last_seen"] >= rig["first_seen"]
    with pytest.raises(st.StoreError, match="no rig_id"):
        store.upsert_rig({"adapters": []})


def test_resolve_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOOP_DB", raising=False)
    assert st.resolve_url(None) == "sqlite:///./cloop.db"
    monkeypatch.setenv("CLOOP_DB", "sqlite:////tmp/env.db")
    assert st.resolve_url(None) == "sqlite:////tmp/env.db"
    assert st.resolve_url("sqlite:////tmp/flag.db") == "sqlite:////tmp/flag.db"
    assert st.resolve_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(st.StoreError, match="invalid database URL"):
        st.resolve_url("not a url")


# ---------------------------------------------------------------------------------------------- CLI


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keep sub-commands addressable by name with a single-command app
        pass

    register(app)
    return app


def test_cli_db_upgrade_sessions_and_trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    app = _app()
    db = tmp_path / "c.db"
    monkeypatch.setenv("CLOOP_DB", f"sqlite:///{db}")  # no --db: the env var is used
    res = runner.invoke(app, ["db", "upgrade"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == f"database sqlite:///{db} is at revision {st.head_revision()} (head)"
    res = runner.invoke(app, ["sessions"])
    assert res.exit_code == 0 and "no sessions yet" in res.stdout

    with st.TrialStore(f"sqlite:///{db}") as store:
        built = build_session(store, n=8)
    res = runner.invoke(app, ["sessions", "--format", "json"])
    assert res.exit_code == 0
    (sess,) = json.loads(res.stdout)
    assert sess["id"] == built.session_id and sess["n_trials"] == 8 and sess["n_invalid"] == 1
    assert sess["n_failed"] == 1 and sess["status"] == "completed"
    res = runner.invoke(app, ["sessions"])
    assert built.session_id[:12] in res.stdout and "retention" in res.stdout

    res = runner.invoke(app, ["trials", "latest", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["index"] for r in rows] == list(range(8))
    required = {"index", "status", "attempts", "stimulus", "response", "dispatched_at", "presented_at", "responded_at"}
    assert all(required <= set(r) for r in rows)
    assert [r["status"] for r in rows] == ["completed"] * 5 + ["invalid", "completed", "failed"]
    assert rows[2]["attempts"] == 2 and rows[7]["attempts"] == 3 and rows[5]["response"]["value"] == "NaN"
    assert [r["stimulus"] for r in rows] == built.stimuli
    stamp = rows[0]["presented_at"]
    assert dt.datetime.fromisoformat(stamp).tzinfo is not None and len(stamp.split(".")[1]) == 6 + 6  # us + "+00:00"

    res = runner.invoke(app, ["trials", built.session_id[:8], "--format", "csv"])
    assert res.exit_code == 0
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    header = res.stdout.splitlines()[0].split(",")
    assert {"index", "status", "attempts", "stimulus.lag", "response.value", "response.rt_s", "dispatched_at",
            "presented_at", "responded_at"} <= set(header)
    assert "stimulus" not in header and "response" not in header
    assert [int(r["stimulus.lag"]) for r in table] == [s["lag"] for s in built.stimuli]
    assert [r["presented_at"] for r in table] == [r["presented_at"] or "" for r in rows]
    assert table[0]["response.value"] == str(int(built.values[0]))  # type: ignore[arg-type]

    res = runner.invoke(app, ["trials", "latest"])
    assert res.exit_code == 0 and "completed" in res.stdout and "lag=" in res.stdout


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    app = _app()
    db = f"sqlite:///{tmp_path / 'c.db'}"
    assert runner.invoke(app, ["db", "upgrade", "--db", db]).exit_code == 0
    cases = {
        ("trials", "nosuch", "--db", db): "error: no session matches 'nosuch'",
        ("trials", "latest", "--db", db): "error: no sessions in the database yet",
        ("sessions", "--db", f"sqlite:///{tmp_path / 'absent.db'}"): "error: no database at",
        ("sessions", "--db", "nonsense"): "error: invalid database URL",
        ("db", "upgrade", "--db", f"sqlite:///{tmp_path}/no/dir.db"): "error: cannot create database",
    }
    for args, message in cases.items():
        res = runner.invoke(app, list(args))
        assert res.exit_code == 2, (args, res.output)
        assert res.stderr.startswith(message) and res.stderr.count("\n") == 1, res.stderr
    assert runner.invoke(app, ["trials", "latest", "--db", db, "--format", "xml"]).exit_code == 2
    assert not (tmp_path / "absent.db").exists()


def test_complete_trial_accepts_transport_outcome(store: st.TrialStore) -> None:
    transport = pytest.importorskip("orchestrator.transport")
    sid = _session(store)
    tid = store.plan_trial(sid, 0, {"stimulus": {"lag": 4}, "strategy": "random", "reason": "", "score": None,
                                    "compute_ms": 2.0})
    store.mark_dispatched(tid, 1, None)
    t0 = 1_780_000_000.0
    outcome = transport.TrialOutcome(
        trial_id=f"{sid}:0", attempt=1, rig_id="rig-z", response={"value": 3},
        timing={"presented_at": 50.0, "responded_at": 50.75},
        mapped_timing={"presented_at": t0 + 0.000123, "responded_at": t0 + 0.750123},
        clock_offset_s=-t0 + 50.0, clock_rtt_s=0.0004, dispatched_at=t0 - 0.01, received_at=t0 + 0.76, cached=False)
    store.complete_trial(tid, outcome, 3.0, None)
    (row,) = store.trials(sid)
    assert row["rig_id"] == "rig-z" and row["value"] == 3.0
    assert row["presented_at"] == dt.datetime.fromtimestamp(t0 + 0.000123, dt.timezone.utc)
    assert row["timing"]["worker"] == {"presented_at": 50.0, "responded_at": 50.75}
    assert row["timing"]["clock_rtt_s"] == 0.0004
    (att,) = store.attempt_rows(sid)
    assert att["worker_times"] == {"presented_at": 50.0, "responded_at": 50.75}
    assert att["mapped_times"]["responded_at"] == t0 + 0.750123 and att["rig_id"] == "rig-z"


def test_reads_return_frozen_records(store: st.TrialStore) -> None:
    import dataclasses

    sid = _session(store)
    tid = store.plan_trial(sid, 0, {"stimulus": {"lag": 3}, "strategy": "random"})
    info, (trial,) = store.session(sid), store.trials(sid)
    assert isinstance(info, st.SessionRecord) and isinstance(trial, st.TrialRecord)
    assert trial.id == tid and trial["id"] == tid and trial.get("nope", 7) == 7 and "stimulus" in trial
    with pytest.raises(dataclasses.FrozenInstanceError):
        trial.status = "completed"  # type: ignore[misc]
    with pytest.raises(KeyError):
        info["nope"]
    assert info.counts == {**{k: 0 for k in st.TRIAL_STATUSES}, "planned": 1}
    assert [s.value for s in st.SessionStatus] == list(st.SESSION_STATUSES)


def test_session_status_changes_follow_the_transition_table(store: st.TrialStore) -> None:
    sid = _session(store, status="created")
    for status in ("waiting_for_rig", "running", "pause_requested", "paused", "continue_requested", "running",
                   "stop_requested", "stopped"):
        store.set_session_status(sid, status)
        store.set_session_status(sid, status)  # the same status again is a no-op, not an error
    assert store.session(sid).status == "stopped"
    with pytest.raises(st.IllegalTransition, match=f"session {sid} cannot go from 'stopped' to 'running'"):
        store.set_session_status(sid, "running")  # a finished session is a closed record
    assert store.session(sid).status == "stopped"
    with pytest.raises(st.IllegalTransition, match="cannot go from 'completed' to 'running'"):
        store.transition_status(sid, ("interrupted", "completed"), "running")  # a guard naming a closed state
    with pytest.raises(st.StoreError, match="not one of"):
        store.transition_status(sid, ("running",), "bogus")
    other = _session(store, status="interrupted")
    assert not store.transition_status(other, ("no_rig",), "running")  # compare-and-set: not in an expected state
    assert store.transition_status(other, ("interrupted", "no_rig"), "running")
    assert store.session(other).status == "running"
    for current, targets in st.LEGAL_TRANSITIONS.items():
        assert all(t in st.SESSION_STATUSES for t in targets)
        if current in st.FINISHED:
            assert targets == frozenset()


def test_subject_name_over_the_column_limit_is_one_clear_error(store: st.TrialStore) -> None:
    assert store.subject("m" * 200) == store.subject("m" * 200)
    with pytest.raises(st.StoreError, match="^subject name is 201 characters long; at most 200 are allowed$"):
        store.subject("m" * 201)


def test_missing_postgres_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(st.StoreError, match=r"^PostgreSQL needs the psycopg driver: pip install 'cloop\[postgres\]'$"):
        st.make_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def test_cli_run_with_an_overlong_subject_exits_2_and_writes_nothing(tmp_path: Path, cloop_cmd: list[str],
                                                                     run_env: dict[str, str]) -> None:
    import subprocess

    from store_factory import REPO

    db = tmp_path / "never.db"
    res = subprocess.run([*cloop_cmd, "run", str(REPO / "protocols" / "retention.yaml"), "--db", f"sqlite:///{db}",
                          "--subject", "s" * 201, "--no-prefect", "--insecure", "--wait-for-rig", "1"],
                         env=run_env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    # One line naming the flag and the limit (the CLI checks it before the store would).
    assert res.stderr.count("\n") == 1 and "--subject" in res.stderr and "200" in res.stderr, res.stderr
    assert res.stdout == "" and list(tmp_path.glob("never.db*")) == []


def test_rig_key_bindings_outlive_the_orchestrator(url: str) -> None:
    """A rig id registered with an allow-list key stays bound to that key name for the next orchestrator."""
    with st.TrialStore(url) as first:
        first.upsert_rig({"rig_id": "booth1", "key_name": "rig-booth1", "adapters": ["simulated"]})
        first.upsert_rig({"rig_id": "loopback-rig", "key_name": None})  # plain text on loopback: no key
    with st.TrialStore(url) as second:
        assert second.rig_keys() == {"booth1": "rig-booth1"}
