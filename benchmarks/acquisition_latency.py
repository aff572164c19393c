"""Stimulus flip -> population vector at the orchestrator, through a real rig worker. Prints JSON.

Per cell: a recording-system emulator in its own process publishes Poisson spike trains stamped at
30 kHz (Open Ephys ZMQ Interface messages in 5 ms processing blocks, or LSL spike events pushed
every 2 ms with a heartbeat); ``cloop rig --adapter rig_adapters.sources.emulate:FlipPresenter``
runs the response source in its own process; the real :class:`RigServer` dispatches trials. The
latency of a trial is the outcome's arrival at the orchestrator minus the end of its response
window (flip + latency_s + window_s, both on this machine's clock): what the closed loop waits
beyond the window itself. Target: p99 <= 20 ms for 100 and 1,000 units.

    python benchmarks/acquisition_latency.py [--trials 200] [--units 100 1000] [--sources openephys lsl]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from orchestrator.transport import RigServer, TrialCommand
from rig_adapters.sources.emulate import LslEmulator, OpenEphysEmulator, poisson_trains

FS = 30000.0
WINDOW_S, LATENCY_S = 0.2, 0.05
TARGET_MS = 20.0


def _protocol(n_units: int) -> str:
    return (f"name: bench\nresponse: {{kind: population, units: {n_units}, window_s: {WINDOW_S}, "
            f"latency_s: {LATENCY_S}, timeout_s: 10}}\n")


def _rig(endpoint: str, rig_yaml: Path, source: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "rig", "--connect", endpoint, "--insecure",
                             "--rig-id", f"bench-{source}", "--adapter", "rig_adapters.sources.emulate:FlipPresenter",
                             "-o", f"rig_config={rig_yaml}", "-o", f"response={source}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def _serve(source: str, n_units: int, rate_hz: float, duration_s: float, conn: Any) -> None:
    """Child process: the recording PC (so its work never competes with the orchestrator's threads)."""
    trains = poisson_trains(n_units, rate_hz, duration_s, FS, seed=n_units, electrodes=max(1, n_units // 4))
    if source == "openephys":
        emu: Any = OpenEphysEmulator(trains, sample_rate=FS, acq_start_epoch=time.time() - 0.5, block_samples=150)
        # the stream's unit keys are "Electrode k#s"; the protocol's ids are "0".."N-1"
        section = {"endpoints": [emu.endpoint], "max_delay_s": 1.0,
                   "unit_map": {str(i): f"{e}#{s}" for i, (e, s) in enumerate(trains.keys)}}
        emu.start()
        conn.send({"openephys": section})
    else:
        name = f"cloop-bench-{n_units}-{os.getpid()}"
        emu = LslEmulator(name=name, kind="events")
        emu.start_events(emu.stream_time() + trains.samples / FS, trains.units.tolist(), heartbeat=-1)
        conn.send({"lsl": {"name": name, "heartbeat_value": "-1", "max_delay_s": 1.0}})
    conn.recv()  # until told to stop
    emu.close()


def _emulator(source: str, n_units: int, rate_hz: float, duration_s: float) -> tuple[Any, Any, dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_serve, args=(source, n_units, rate_hz, duration_s, child), daemon=True)
    proc.start()
    return proc, parent, parent.recv()


def measure(source: str, n_units: int, trials: int, warmup: int, rate_hz: float) -> dict[str, Any]:
    duration = (trials + warmup) * (WINDOW_S + LATENCY_S + 0.2) + 120
    emu_proc, emu_conn, sources = _emulator(source, n_units, rate_hz, duration)
    with tempfile.TemporaryDirectory() as tmp, RigServer("tcp://127.0.0.1:0", insecure=True) as srv:
        rig_yaml = Path(tmp) / "rig.yaml"
        rig_yaml.write_text(yaml.safe_dump({"sources": sources}))
        srv.set_session("bench", _protocol(n_units))
        proc = _rig(srv.endpoint, rig_yaml, source)
        at_orchestrator: list[float] = []
        at_worker: list[float] = []
        failures: dict[str, int] = {}
        try:
            srv.wait_for_rigs([], 1, 120)
            time.sleep(0.5)
            for i in range(warmup + trials):
                cmd = TrialCommand(trial_id=i, attempt=1, index=i, session_id="bench", stimulus={},
                                   stimulus_type="image", response_kind="population", timeout_s=10.0)
                try:
                    out = srv.run_trial(cmd)
                except Exception as exc:  # counted, not hidden
                    code = getattr(exc, "code", type(exc).__name__)
                    failures[code] = failures.get(code, 0) + 1
                    continue
                if len(out.response["value"]) != n_units:
                    failures["wrong_length"] = failures.get("wrong_length", 0) + 1
                window_end = out.timing["presented_at"] + LATENCY_S + WINDOW_S
                if i >= warmup:
                    at_orchestrator.append((out.received_at - window_end) * 1000)
                    at_worker.append((out.timing["responded_at"] - window_end) * 1000)
                time.sleep(0.02)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            emu_conn.send("stop")
            emu_proc.join(timeout=10)
    o, w = np.asarray(at_orchestrator), np.asarray(at_worker)
    cell: dict[str, Any] = {
        "source": source, "format": "zmq_interface" if source == "openephys" else "lsl_events",
        "units": n_units, "spike_rate_hz_per_unit": rate_hz, "sample_rate_hz": FS,
        "stream_block_ms": 5.0 if source == "openephys" else 2.0,
        "window_s": WINDOW_S, "latency_s": LATENCY_S, "trials": int(o.size), "failures": failures,
    }
    if o.size:
        cell.update({"p50_ms": round(float(np.percentile(o, 50)), 3), "p99_ms": round(float(np.percentile(o, 99)), 3),
                     "max_ms": round(float(o.max()), 3),
                     "worker_p50_ms": round(float(np.percentile(w, 50)), 3),
                     "worker_p99_ms": round(float(np.percentile(w, 99)), 3),
                     "meets_target": bool(np.percentile(o, 99) <= TARGET_MS)})
    return cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--units", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--sources", nargs="+", default=["openephys", "lsl"], choices=["openephys", "lsl"])
    ap.add_argument("--rate", type=float, default=10.0, help="spikes/s per unit")
    args = ap.parse_args()
    load_before = os.getloadavg()
    cells = [measure(s, n, args.trials, args.warmup, args.rate) for s in args.sources for n in args.units]
    print(json.dumps({
        "benchmark": "acquisition_latency",
        "what": "stimulus flip -> population vector at the orchestrator, minus the response window's end",
        "target": f"p99 <= window end + {TARGET_MS:g} ms",
        "machine": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "cells": cells,
    }, indent=2))


if __name__ == "__main__":
    main()
