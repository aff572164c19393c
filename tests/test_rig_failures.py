"""The engine's answer to a rig that aborts (Escape) or refuses (its own hard limits) a trial."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import ROOT, wait_process

from orchestrator.control import request
from orchestrator.store import TrialStore

HERE = Path(__file__).resolve().parent


def _protocol(tmp_path: Path, adapter: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text((ROOT / "protocols" / "retention.yaml").read_text()
                    .replace("capabilities: [simulated]", f"capabilities: [{adapter}]")
                    .replace("model_probability: 0.99", "model_probability: 0.999999"))
    return path


def _session(cloop_cmd, run_env, tmp_path, port, adapter, capability, max_trials):  # noqa: ANN001, ANN202
    env = dict(run_env, PYTHONPATH=os.pathsep.join([str(HERE), run_env.get("PYTHONPATH", "")]))
    db = f"sqlite:///{tmp_path / 'c.db'}"
    run = subprocess.Popen([*cloop_cmd, "run", str(_protocol(tmp_path, capability)), "--db", db,
                            "--bind", f"tcp://127.0.0.1:{port}", "--no-prefect", "--design", "random",
                            "--max-trials", str(max_trials), "--wait-for-rig", "30"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rig = subprocess.Popen([*cloop_cmd, "rig", "--connect", f"tcp://127.0.0.1:{port}", "--adapter", adapter],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return run, rig, db


def test_escape_at_the_rig_abandons_the_trial_and_pauses(cloop_cmd, run_env, tmp_path, port) -> None:
    run, rig, db = _session(cloop_cmd, run_env, tmp_path, port, "adapters_for_tests:AbortOnSecondTrial", "abort_second", 4)
    try:
        deadline = time.time() + 90
        status = None
        while time.time() < deadline:
            time.sleep(0.3)
            try:
                with TrialStore(db) as store:
                    status = store.session("latest")["status"]
            except Exception:
                continue
            if status == "paused":
                break
        assert status == "paused"
        with TrialStore(db) as store:
            trials = store.trials("latest")
            assert [t["status"] for t in trials] == ["completed", "abandoned"]
            assert "aborted at the rig" in trials[1]["error"] and trials[1]["attempts"] == 1
            request(store, "latest", "stop")
        out, err = wait_process(run, 60)
        assert run.returncode == 0, err
    finally:
        rig.terminate()
        wait_process(rig, 20)
        if run.poll() is None:
            run.kill()
    with TrialStore(db) as store:
        assert store.session("latest")["status"] == "stopped"


def test_rig_refusal_fails_the_trial_without_retrying(cloop_cmd, run_env, tmp_path, port) -> None:
    run, rig, db = _session(cloop_cmd, run_env, tmp_path, port, "adapters_for_tests:RefuseEverything", "refuse_all", 2)
    try:
        out, err = wait_process(run, 90)
    finally:
        rig.terminate()
        wait_process(rig, 20)
    assert run.returncode == 0, err
    with TrialStore(db) as store:
        trials = store.trials("latest")
    assert [t["status"] for t in trials] == ["failed", "failed"]
    assert all(t["attempts"] == 1 and "amplitude above the rig's limit" in t["error"] for t in trials)
