"""`cloop run` + `cloop rig --adapter stimulator` over a serial line to an emulated device (pty).

The protocol allows amplitudes up to 100 uA; the rig's own config allows 50. Trials above 50
must fail with the rig's reason and never reach the device; the others are delivered over the
serial line protocol and answered by the simulated subject.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tty
from pathlib import Path

import pytest
import yaml

from conftest import free_port
from rig_adapters.serial_driver import LineProtocolEmulator

pytest.importorskip("serial", reason="pyserial is not installed (pip install -e '.[psychopy]')")

PROTOCOL = """
name: microstim_detection
version: "1"
stimulus:
  type: pulse_train
  parameters:
    amplitude: {kind: continuous, low: 1, high: 100, units: uA}
  fixed: {frequency: 100, pulse_width: 200, train_duration: 20, channel: 1}
response: {kind: bernoulli, timeout_s: 5}
models:
  - name: logistic
    formula: "1 / (1 + exp(-(amplitude - m) / s))"
    priors:
      m: {dist: uniform, low: 1, high: 100}
      s: {dist: gamma, shape: 2, rate: 0.2}
  - name: flat
    formula: "p"
    priors:
      p: {dist: beta, alpha: 1, beta: 1}
design: {strategy: random}
stopping: {max_trials: 10}
rig: {capabilities: [stimulator], max_attempts: 2, wait_for_rig_s: 60}
"""


def test_refusals_fail_trials_with_reason_and_never_reach_the_device(tmp_path: Path) -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    device = LineProtocolEmulator(master, time_scale=1.0).start()
    try:
        (tmp_path / "p.yaml").write_text(PROTOCOL)
        (tmp_path / "rig.yaml").write_text(yaml.safe_dump({"stimulator": {
            "driver": "serial", "port": os.ttyname(slave), "timeout_s": 2,
            "limits": {"amplitude": {"min": 0, "max": 50}, "frequency": {"min": 1, "max": 300},
                       "pulse_width": {"min": 50, "max": 500}, "train_duration": {"min": 1, "max": 1000},
                       "channel": {"min": 0, "max": 3}}}}))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("CLOOP_DB", None)
        db = f"sqlite:///{tmp_path / 'cloop.db'}"
        cloop = [sys.executable, "-m", "orchestrator"]
        subprocess.run(cloop + ["db", "upgrade", "--db", db], check=True, env=env, capture_output=True, timeout=60)
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        run = subprocess.Popen(cloop + ["run", str(tmp_path / "p.yaml"), "--db", db, "--bind", endpoint,
                                        "--insecure", "--no-prefect", "--seed", "5"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rig = subprocess.Popen(cloop + ["rig", "--connect", endpoint, "--insecure", "--adapter", "stimulator",
                                        "--truth", "logistic:m=30,s=5", "-o", "response=simulated",
                                        "-o", f"rig_config={tmp_path / 'rig.yaml'}"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = run.communicate(timeout=150)
        finally:
            rig.terminate()
            rig_err = rig.communicate(timeout=20)[1]
        assert run.returncode == 0, f"{out}\n{err[-3000:]}\nrig:\n{rig_err[-3000:]}"
    finally:
        device.stop()
        os.close(slave)
        os.close(master)

    con = sqlite3.connect(tmp_path / "cloop.db")
    rows = con.execute('SELECT status, stimulus, response, error, timing FROM trials ORDER BY "index"').fetchall()
    con.close()
    assert len(rows) == 10
    delivered = []
    for status, stimulus, response, error, timing in rows:
        amplitude = json.loads(stimulus)["amplitude"]
        if amplitude > 50:
            assert status == "failed"
            assert "[refused]" in error and f"amplitude={amplitude:g}uA outside rig limit [0, 50]" in error
        else:
            assert status == "completed", error
            assert json.loads(response)["value"] in (0, 1)
            worker = json.loads(timing)["worker"]
            assert worker["commanded_at"] <= worker["train_started_at"] < worker["train_finished_at"]
            assert worker["train_finished_at"] - worker["train_started_at"] >= 0.015  # the device took 20 ms
            delivered.append(amplitude)
    assert delivered and len(delivered) < 10  # the random design drew both kinds
    trains = [line for line in device.received if line.startswith("TRAIN")]
    assert len(trains) == len(delivered)
    for line, amplitude in zip(trains, delivered):
        assert f"amp={amplitude:.6g} freq=100 pw=200 dur=20" in line and " ch=1 " in line
