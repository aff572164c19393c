"""A session through a real Prefect server and a process worker, as a lab runs it.

Real processes: `prefect server start` (local, SQLite, private PREFECT_HOME), `cloop deploy` (creates the
process work pool and the deployment), `prefect worker start --type process`, a simulated rig worker,
and `prefect deployment run ... --watch`. The flow run must complete, be named protocol/subject/session,
and the lab database must hold the session's trials.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port, need, wait_process
from orchestrator.store import TrialStore

TRUTH = "power:a=0.9025,b=0.4861"


def _wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"prefect server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_session_runs_on_prefect_server_and_process_worker(tmp_path: Path, sqlite_url: str, cloop_cmd: list[str],
                                                           run_env: dict[str, str]) -> None:
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent))
    need(prefect is not None, "the prefect CLI is not installed next to this Python (pip install -e '.[prefect]')")
    api_port, rig_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}/api"
    env = dict(run_env, PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="5",
               PREFECT_LOGGING_LEVEL="INFO")
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    started: list[subprocess.Popen] = []

    def spawn(args: list[str], log: str, environ: dict[str, str] = env) -> subprocess.Popen:
        p = subprocess.Popen(args, env=environ, stdout=open(tmp_path / log, "ab"), stderr=subprocess.STDOUT,
                             cwd=tmp_path)
        started.append(p)
        return p

    try:
        server = spawn([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(api_port)], "server.log",
                       server_env)
        _wait_healthy(api, server, tmp_path / "server.log")

        deploy = subprocess.run(
            [*cloop_cmd, "deploy", "--name", "room-1", "--pool", "lab-pool", "--db", sqlite_url,
             "--bind", f"tcp://127.0.0.1:{rig_port}", "--insecure", "--max-trials", "4", "--wait-for-rig", "60"],
            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert "deployment cloop-lab-session/room-1" in deploy.stdout and "'lab-pool'" in deploy.stdout

        spawn([prefect, "worker", "start", "--pool", "lab-pool", "--type", "process"], "worker.log")
        spawn([*cloop_cmd, "rig", "--connect", f"tcp://127.0.0.1:{rig_port}", "--adapter", "simulated", "--truth",
               TRUTH, "--seed", "6", "--trial-seconds", "0.05", "--insecure"], "rig.log")

        run = subprocess.Popen(
            [prefect, "deployment", "run", "cloop-lab-session/room-1", "-p", "subject=mouse-p", "--watch",
             "--watch-interval", "1", "--watch-timeout", "150"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        out, _ = wait_process(run, 180)
        worker_log = (tmp_path / "worker.log").read_text()
        assert run.returncode == 0, out + "\n--- worker ---\n" + worker_log[-4000:]
        assert "Completed" in out, out
    finally:
        for p in reversed(started):
            _stop(p)

    with TrialStore(sqlite_url) as store:
        (session,) = store.sessions()
        trials = store.trials(session["id"])
    assert session["subject"] == "mouse-p" and session["status"] == "completed", session
    assert 1 <= len(trials) <= 4 and all(t["status"] == "completed" for t in trials)
    assert [t["index"] for t in trials] == list(range(len(trials)))
    # The flow run was renamed once the session existed: protocol/subject/session id.
    assert f"retention/mouse-p/{session['id']}" in "".join(out.split()), out
    assert "run-trials" in out and "register-session" in out and "migrate-database" in out
