"""Shared bits of the rig-network benchmarks: worker processes, key directories, percentiles."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import zmq

from orchestrator import keys as keyfiles
from orchestrator.transport import TrialCommand

NULL = "rig_adapters.simulated:NullAdapter"


def empty_trial(i: int, session: str = "bench", attempt: int = 1) -> TrialCommand:
    return TrialCommand(trial_id=i, attempt=attempt, index=i, session_id=session, stimulus={},
                        stimulus_type="abstract", response_kind="gaussian", timeout_s=5.0)


def make_keys(n_rigs: int) -> Path:
    k = Path(tempfile.mkdtemp(prefix="cloop-bench-keys-"))
    keyfiles.generate(k, "orchestrator")
    (k / "rigs").mkdir()
    for n in range(n_rigs):
        keyfiles.generate(k, f"rig{n}")
        (k / "rigs" / f"rig{n}.key").write_bytes((k / f"rig{n}.key").read_bytes())
    return k


def start_worker(endpoint: str, rig_id: str, *, keys: Path | None = None, key_name: str | None = None,
                 options: dict[str, Any] | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "rig_adapters.worker", "--connect", endpoint, "--adapter", NULL, "--rig-id", rig_id]
    args += ["--keys", str(keys), "--name", key_name or rig_id] if keys else ["--insecure"]
    for k, v in (options or {}).items():
        args += ["--option", f"{k}={v}"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "cpus": os.cpu_count(), "machine": platform.machine(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}  # other work on the box
