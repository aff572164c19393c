"""`cloop run` + `cloop rig` as real processes; the rig is SIGKILLed mid-trial and restarted: the
database ends with every trial completed and every failed attempt recorded, and no trial was
presented to completion twice."""

from __future__ import annotations

import collections
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from test_transport_helpers import Workers, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
TRUTH = "power:a=0.9,b=0.4"


def _journal(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def test_cloop_run_survives_a_rig_killed_mid_trial(tmp_path: Path) -> None:
    db_file = tmp_path / "e2e.db"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    journal = state / "rig-1.journal.jsonl"
    log = open(tmp_path / "run.log", "wb")
    run = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", str(REPO / "protocols" / "retention.yaml"),
         "--db", f"sqlite:///{db_file}", "--bind", endpoint, "--insecure", "--seed", "4", "--max-trials", "8",
         "--design", "random", "--no-prefect"],
        stdout=subprocess.PIPE, stderr=log, text=True)
    opts = {"truth": TRUTH, "seed": 4, "trial_seconds": 0.4}
    kills = 0
    try:
        with Workers(tmp_path) as workers:
            rig = workers.start(endpoint, "rig-1", adapter="simulated", state_dir=state, options=opts)
            for _ in range(2):
                starts = sum(r["event"] == "start" for r in _journal(journal))
                if not wait_until(lambda: sum(r["event"] == "start" for r in _journal(journal)) > starts, 120):
                    break
                time.sleep(0.15)  # inside the 0.4 s presentation
                rig.send_signal(signal.SIGKILL)
                rig.wait()
                kills += 1
                rig = workers.start(endpoint, "rig-1", adapter="simulated", state_dir=state, options=opts)
            out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    assert run.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert kills == 2
    session_id = out.splitlines()[0].strip()
    con = sqlite3.connect(db_file)
    trials = con.execute("select id, status, attempts from trials where session_id = ?", (session_id,)).fetchall()
    attempts = con.execute("select trial_id, attempt, status, error from trial_attempts order by trial_id, attempt"
                           ).fetchall()
    con.close()
    assert trials and all(status == "completed" for _, status, _ in trials), trials
    by_trial = collections.defaultdict(list)
    for trial_id, attempt, status, error in attempts:
        by_trial[trial_id].append((attempt, status, error))
    retried = {t: rows for t, rows in by_trial.items() if len(rows) > 1}
    assert len(retried) >= 1, attempts  # the killed attempts are in the database...
    for rows in retried.values():
        assert [a for a, _, _ in rows] == list(range(1, len(rows) + 1))
        assert all(err and "RigLost" in err for _, status, err in rows[:-1]), rows  # ...with the reason
    results = collections.Counter(r["key"] for r in _journal(journal) if r["event"] == "result")
    assert results and max(results.values()) == 1  # never presented to completion twice
