"""Several sessions on one database, and `cloop db upgrade` on a database that already holds data.

Both run against SQLite and a real PostgreSQL server (the `postgres_url` fixture skips on a laptop
without one and fails under CI=true).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from builders import retention_text
from conftest import free_port, wait_process
from orchestrator.store import TrialStore, head_revision, make_engine, upgrade

TRUTH = "power:a=0.9025,b=0.4861"
TRIALS = 12

PROTOCOL = retention_text({"response.timeout_s": 20, "design": {"strategy": "random"},
                           "stopping": {"max_trials": 100}, "rig.wait_for_rig_s": 30},
                          name="concurrency", description="short fixed-length session, many writes")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return request.getfixturevalue("postgres_url")


def _journal_results(state_dir: Path) -> dict[tuple[str, str], dict]:
    """(session id, wire trial id) -> the result the rig sent, from its fsync'ed journal."""
    out: dict[tuple[str, str], dict] = {}
    for path in state_dir.glob("*.journal.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("event") == "result":
                out[(rec["session_id"], rec["key"].split(":", 1)[1])] = rec["result"]
    return out


def test_two_sessions_write_concurrently(db_url: str, tmp_path: Path, cloop_cmd: list[str],
                                         run_env: dict[str, str]) -> None:
    """Two orchestrators, two rigs, one database, at the same time: each session gets exactly its own data."""
    upgrade(db_url)
    protocol = tmp_path / "concurrency.yaml"
    protocol.write_text(PROTOCOL)
    runs = []
    for name, seed in (("a", 21), ("b", 22)):
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        rig = subprocess.Popen(
            [*cloop_cmd, "rig", "--connect", endpoint, "--adapter", "simulated", "--truth", TRUTH, "--seed", str(seed),
             "--trial-seconds", "0.01", "--insecure", "--rig-id", f"rig-{name}", "--state-dir", str(tmp_path / name)],
            env=run_env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"rig-{name}.log", "ab"))
        orch = subprocess.Popen(
            [*cloop_cmd, "run", str(protocol), "--db", db_url, "--bind", endpoint, "--seed", str(seed),
             "--subject", f"mouse-{name}", "--max-trials", str(TRIALS), "--no-prefect", "--insecure"],
            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((name, seed, rig, orch))
    try:
        sessions = {}
        for name, seed, rig, orch in runs:
            out, err = wait_process(orch, 120)
            assert orch.returncode == 0, err
            sessions[name] = out.splitlines()[0].strip()
    finally:
        for _, _, rig, orch in runs:
            for p in (rig, orch):
                if p.poll() is None:
                    p.kill()
                    p.wait()

    assert sessions["a"] != sessions["b"]
    with TrialStore(db_url) as store:
        listed = {s["id"]: s for s in store.sessions()}
        assert {listed[sid]["subject"] for sid in sessions.values()} == {"mouse-a", "mouse-b"}
        for name, sid in sessions.items():
            row = listed[sid]
            assert row["status"] == "completed" and row["counts"]["completed"] == TRIALS, row
            trials = store.trials(sid)
            assert [t["index"] for t in trials] == list(range(TRIALS))
            assert {t["rig_id"] for t in trials} == {f"rig-{name}"}  # never the other session's rig
            journal = _journal_results(tmp_path / name)
            for t in trials:  # the stored response is exactly what this session's rig sent for this trial
                sent = journal[(sid, f"{sid}:{t['index']}")]
                assert t["response"] == sent["response"], (name, t["index"])
            assert all(s["probabilities"] is not None for s in store.model_states(sid))


# -- cloop db upgrade on a database with data ----------------------------------------------------


def _oldest_revision() -> str:
    from alembic.script import ScriptDirectory

    from orchestrator.store import alembic_config

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    return list(script.walk_revisions())[-1].revision


def _fill_at_revision_0001(url: str) -> str:
    """Write a session as the 0001 schema stores it (Core inserts pinned to that schema, not the ORM)."""
    t = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    ts = sa.DateTime(timezone=True)
    protocols = sa.table("protocols", sa.column("id", sa.Integer), sa.column("name"), sa.column("version"), sa.column("sha256"),
                         sa.column("text"), sa.column("created_at", ts))
    subjects = sa.table("subjects", sa.column("id", sa.Integer), sa.column("name"), sa.column("created_at", ts))
    rigs = sa.table("rigs", sa.column("id"), sa.column("adapters", sa.JSON), sa.column("first_seen", ts),
                    sa.column("last_seen", ts))
    sessions = sa.table("sessions", sa.column("id"), sa.column("protocol_id"), sa.column("subject_id"),
                        sa.column("status"), sa.column("seed"), sa.column("started_at", ts), sa.column("bind"),
                        sa.column("design", sa.JSON), sa.column("meta", sa.JSON))
    trials = sa.table("trials", sa.column("id", sa.Integer), sa.column("session_id"), sa.column("index"), sa.column("status"),
                      sa.column("stimulus", sa.JSON), sa.column("response", sa.JSON), sa.column("value"),
                      sa.column("attempts"), sa.column("rig_id"), sa.column("planned_at", ts),
                      sa.column("dispatched_at", ts), sa.column("recorded_at", ts))
    attempts = sa.table("trial_attempts", sa.column("trial_id"), sa.column("attempt"), sa.column("rig_id"),
                        sa.column("status"), sa.column("dispatched_at", ts), sa.column("finished_at", ts))
    states = sa.table("model_states", sa.column("trial_id"), sa.column("probabilities", sa.JSON),
                      sa.column("decision", sa.JSON), sa.column("decision_ms"), sa.column("recorded_at", ts))
    sid = "0" * 31 + "1"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            # No explicit ids: PostgreSQL's sequences must stay in step, as with real data.
            pid = conn.execute(protocols.insert().returning(protocols.c.id),
                               [dict(name="concurrency", version="1.0", sha256="f" * 64, text=PROTOCOL,
                                     created_at=t)]).scalar_one()
            subj = conn.execute(subjects.insert().returning(subjects.c.id),
                                [dict(name="old-mouse", created_at=t)]).scalar_one()
            conn.execute(rigs.insert(), [dict(id="rig-old", adapters=["simulated"], first_seen=t, last_seen=t)])
            conn.execute(sessions.insert(), [dict(id=sid, protocol_id=pid, subject_id=subj, status="interrupted",
                                                  seed=9, started_at=t, bind="tcp://127.0.0.1:5555", design="random",
                                                  meta={"request": {"protocol_path": "c.yaml", "db_url": url}})])
            for idx, status, lag, v in [(0, "completed", 7, 6.0), (1, "completed", 30, 2.0), (2, "dispatched", 55, None)]:
                tid = conn.execute(trials.insert().returning(trials.c.id), [dict(
                    session_id=sid, index=idx, status=status, stimulus={"lag": lag},
                    response=None if v is None else {"value": int(v)}, value=v, attempts=1, rig_id="rig-old",
                    planned_at=t, dispatched_at=t, recorded_at=None if v is None else t)]).scalar_one()
                conn.execute(attempts.insert(), [dict(
                    trial_id=tid, attempt=1, rig_id="rig-old", status="completed" if v is not None else "dispatched",
                    dispatched_at=t, finished_at=None if v is None else t)])
                conn.execute(states.insert(), [dict(
                    trial_id=tid, probabilities=None if v is None else {"power": 0.6, "exponential": 0.4},
                    decision={"stimulus": {"lag": lag}, "strategy": "random", "reason": "", "score": None},
                    decision_ms=1.5, recorded_at=t)])
    finally:
        engine.dispose()
    return sid


def test_db_upgrade_keeps_existing_data(db_url: str, cloop_cmd: list[str], run_env: dict[str, str]) -> None:
    """A database made by the first schema revision, with a session in it, upgrades to head and stays usable."""
    oldest = _oldest_revision()
    assert oldest == "0001"
    assert upgrade(db_url, oldest) == oldest
    sid = _fill_at_revision_0001(db_url)
    if oldest != head_revision():  # an old schema is refused until upgraded
        with pytest.raises(Exception, match="cloop db upgrade"):
            TrialStore(db_url)

    proc = subprocess.run([*cloop_cmd, "db", "upgrade", "--db", db_url], env=run_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"at revision {head_revision()}" in proc.stdout
    again = subprocess.run([*cloop_cmd, "db", "upgrade", "--db", db_url], env=run_env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # idempotent

    with TrialStore(db_url) as store:
        row = store.session(sid[:8])
        assert (row["subject"], row["status"], row["seed"], row["protocol"]) == ("old-mouse", "interrupted", 9,
                                                                                 "concurrency")
        assert row["counts"]["completed"] == 2 and row["counts"]["dispatched"] == 1
        trials = store.trials(sid)
        assert [(t["index"], t["status"], t["stimulus"], t["value"]) for t in trials] == [
            (0, "completed", {"lag": 7}, 6.0), (1, "completed", {"lag": 30}, 2.0), (2, "dispatched", {"lag": 55}, None)]
        assert trials[0]["planned_at"] == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
        assert store.observations(sid) == [({"lag": 7}, 6.0), ({"lag": 30}, 2.0)]
        assert [t["index"] for t in store.open_trials(sid)] == [2]  # what a resume would reconcile
        # The upgraded database takes new writes the way a resumed engine makes them.
        store.complete_trial(trials[2]["id"], {"rig_id": "rig-old", "response": {"value": 1}, "timing": {},
                                               "attempt": 1}, 1.0)
        nxt = store.plan_trial(sid, store.next_index(sid), {"stimulus": {"lag": 80}, "strategy": "random",
                                                            "reason": "", "score": None, "compute_ms": 1.0})
        assert store.trials(sid)[-1]["id"] == nxt and store.next_index(sid) == 4

    listed = subprocess.run([*cloop_cmd, "trials", sid[:8], "--db", db_url, "--format", "json"], env=run_env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [t["index"] for t in json.loads(listed.stdout)] == [0, 1, 2, 3]
