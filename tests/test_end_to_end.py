"""End to end: `cloop run` and `cloop rig` as real processes over ZMQ on loopback, SQLite underneath.

The database's completed trials must equal, one for one, the responses the rig worker journaled as
sent; a NaN response must be stored as an invalid trial that never reaches the models.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, wait_process

from orchestrator.store import TrialStore

RETENTION = ROOT / "protocols" / "retention.yaml"
TRUTH = "power:a=0.9025,b=0.4861"


def _journal_results(state_dir: Path) -> dict[str, dict]:
    """What the worker recorded as sent: trial key -> result, from its fsync'ed journal."""
    results: dict[str, dict] = {}
    for path in state_dir.glob("*.journal.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["event"] == "result":
                results[record["key"]] = record["result"]
    return results


def _start_rig(cloop_cmd, run_env, endpoint: str, state_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*cloop_cmd, "rig", "--connect", endpoint, "--insecure", "--rig-id", "e2e-rig",
         "--state-dir", str(state_dir), *extra],
        env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _run(cloop_cmd, run_env, protocol: Path, db: str, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*cloop_cmd, "run", str(protocol), "--db", db, "--bind", f"tcp://127.0.0.1:{port}", *extra,
         *([] if "--wait-for-rig" in extra else ["--wait-for-rig", "30"])],
        env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_session_over_loopback_matches_what_the_rig_sent(cloop_cmd, run_env, sqlite_url, port, tmp_path) -> None:
    state_dir = tmp_path / "rig-state"
    orchestrator = _run(cloop_cmd, run_env, RETENTION, sqlite_url, port, "--seed", "11", "--max-trials", "12",
                        "--subject", "mouse-7", "--no-prefect", "--design", "random")
    rig = _start_rig(cloop_cmd, run_env, f"tcp://127.0.0.1:{port}", state_dir,
                     "--adapter", "simulated", "--truth", TRUTH, "--seed", "11")
    try:
        out, err = wait_process(orchestrator, 120)
    finally:
        rig.terminate()
        wait_process(rig, 20)
    assert orchestrator.returncode == 0, err
    session_id = out.splitlines()[0].strip()
    assert re.fullmatch(r"[0-9a-f]{32}", session_id), out

    with TrialStore(sqlite_url) as store:
        trials = store.trials(session_id)
        session = store.session(session_id)
    assert session["status"] == "completed" and session["seed"] == 11
    completed = [t for t in trials if t["status"] == "completed"]
    assert len(completed) == 12 == len(trials)

    sent = _journal_results(state_dir)
    assert len(sent) == len(completed)
    for trial in completed:
        key = next(k for k in sent if k.endswith(f"{session_id}:{trial['index']}"))
        assert sent[key]["response"] == trial["response"]
        assert trial["attempts"] == 1
        assert 0 <= trial["stimulus"]["lag"] <= 100
        assert trial["planned_at"] <= trial["dispatched_at"] <= trial["recorded_at"]
        assert trial["presented_at"] <= trial["responded_at"]
        assert trial["rig_id"] == "e2e-rig"


def test_cli_reads_back_the_session(cloop_cmd, run_env, sqlite_url, port, tmp_path) -> None:
    orchestrator = _run(cloop_cmd, run_env, RETENTION, sqlite_url, port, "--seed", "3", "--max-trials", "5",
                        "--no-prefect")
    rig = _start_rig(cloop_cmd, run_env, f"tcp://127.0.0.1:{port}", tmp_path / "s",
                     "--adapter", "simulated", "--truth", TRUTH, "--seed", "3")
    try:
        out, err = wait_process(orchestrator, 120)
    finally:
        rig.terminate()
        wait_process(rig, 20)
    assert orchestrator.returncode == 0, err
    session_id = out.splitlines()[0]
    with TrialStore(sqlite_url) as store:
        n_completed = store.trial_counts(session_id)["completed"]

    as_json = subprocess.run([*cloop_cmd, "trials", "latest", "--db", sqlite_url, "--format", "json"],
                             env=run_env, capture_output=True, text=True, check=True).stdout
    rows = json.loads(as_json)
    assert len(rows) == n_completed
    for row in rows:
        for key in ("index", "status", "attempts", "stimulus", "response", "dispatched_at", "presented_at",
                    "responded_at"):
            assert key in row
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}([+-]\d\d:\d\d|Z)", row["dispatched_at"])

    as_csv = subprocess.run([*cloop_cmd, "trials", session_id[:8], "--db", sqlite_url, "--format", "csv"],
                            env=run_env, capture_output=True, text=True, check=True).stdout
    table = list(csv.DictReader(io.StringIO(as_csv)))
    assert len(table) == n_completed
    assert {"stimulus.lag", "response.value"} <= set(table[0])
    assert [int(r["stimulus.lag"]) for r in table] == [r["stimulus"]["lag"] for r in rows]


def test_nan_response_is_stored_invalid_and_never_reaches_the_models(cloop_cmd, run_env, sqlite_url, port,
                                                                     tmp_path) -> None:
    protocol = tmp_path / "nan.yaml"
    protocol.write_text(RETENTION.read_text().replace("capabilities: [simulated]", "capabilities: ['null']"))
    orchestrator = _run(cloop_cmd, run_env, protocol, sqlite_url, port, "--seed", "1", "--max-trials", "3",
                        "--no-prefect", "--design", "random")
    rig = _start_rig(cloop_cmd, run_env, f"tcp://127.0.0.1:{port}", tmp_path / "s",
                     "--adapter", "rig_adapters.simulated:NullAdapter", "--option", "value=nan")
    try:
        out, err = wait_process(orchestrator, 120)
    finally:
        rig.terminate()
        wait_process(rig, 20)
    assert orchestrator.returncode == 0, err
    session_id = out.splitlines()[0]
    with TrialStore(sqlite_url) as store:
        trials = store.trials(session_id)
        states = store.model_states(session_id)
    assert [t["status"] for t in trials] == ["invalid"] * 3
    assert all(t["value"] is None and "not finite" in t["error"] for t in trials)
    raw = trials[0]["response"]["value"]
    assert raw == "NaN" or (isinstance(raw, float) and math.isnan(raw))
    # The models never saw a NaN: model probabilities stay at the prior.
    for state in states:
        assert state["probabilities"] == pytest.approx({"power": 0.5, "exponential": 0.5})


def test_run_without_rig_gives_up_with_a_clear_error(cloop_cmd, run_env, sqlite_url, port) -> None:
    orchestrator = _run(cloop_cmd, run_env, RETENTION, sqlite_url, port, "--wait-for-rig", "1.5", "--no-prefect")
    out, err = wait_process(orchestrator, 60)
    assert orchestrator.returncode == 1
    assert f"tcp://127.0.0.1:{port}" in err and "waiting" in err
    assert "no rig" in err.lower()
    session_id = out.splitlines()[0]
    with TrialStore(sqlite_url) as store:
        assert store.session(session_id)["status"] == "no_rig"


def test_demo_through_prefect_then_trials_csv(cloop_cmd, run_env, tmp_path) -> None:
    """The Quickstart path: `cloop demo` (Prefect flow, rig worker process, SQLite) then the CSV."""
    db = f"sqlite:///{tmp_path / 'demo.db'}"
    demo = subprocess.run([*cloop_cmd, "demo", "--db", db], env=run_env, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "cloop trials latest" in demo.stdout and db in demo.stdout
    assert "truth 'power', conclusion 'power'" in demo.stdout and "the conclusion is right" in demo.stdout
    assert "Traceback" not in demo.stderr and "httpx" not in demo.stderr, demo.stderr
    session_id = demo.stdout.splitlines()[0]
    with TrialStore(db) as store:
        completed = store.trial_counts(session_id)["completed"]
    assert completed >= 1
    as_csv = subprocess.run([*cloop_cmd, "trials", "latest", "--db", db, "--format", "csv"], env=run_env,
                            capture_output=True, text=True, check=True).stdout
    assert len(list(csv.DictReader(io.StringIO(as_csv)))) == completed
