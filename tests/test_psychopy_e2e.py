"""`cloop run` + `cloop rig --adapter psychopy` as real processes on a virtual screen.

1. The orientation-tuning protocol answered by the simulated subject on the display.
2. A contrast-detection protocol answered by key presses (real X key events via xdotool).
Both check what reached the database: completed trials with flip times and frame counts.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from test_psychopy_display import assert_duration
from xvfb import press_key, xvfb_display

pytestmark = pytest.mark.display

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import free_port  # noqa: E402

DETECTION = """
name: contrast_detection
version: "1"
description: Yes/no detection of a Gabor; 'right' = seen, 'left' = not seen.
stimulus:
  type: gabor
  parameters:
    contrast: {kind: continuous, low: 0.005, high: 0.5, units: fraction, log: true}
  fixed: {sf: 2.0, size: 4, orientation: 45}
  duration_s: 0.2
response: {kind: bernoulli, timeout_s: 10}
models:
  - name: weibull
    formula: "0.02 + 0.96 * (1 - exp(-(contrast / a) ** b))"
    priors:
      a: {dist: lognormal, mu: -3, sigma: 1}
      b: {dist: gamma, shape: 4, rate: 1.5}
  - name: guessing
    formula: "g"
    priors:
      g: {dist: beta, alpha: 2, beta: 2}
design: {strategy: random}
stopping: {max_trials: 6}
rig: {capabilities: [psychopy], wait_for_rig_s: 60}
"""


def _rig_yaml(tmp_path: Path, shots: int = 2) -> Path:
    path = tmp_path / "rig.yaml"
    path.write_text(yaml.safe_dump({
        "rig_id": "xvfb-rig",
        "monitor": {"distance_cm": 57, "width_cm": 40, "resolution": [1024, 768], "refresh_hz": 60},
        "display": {"size": [800, 600], "software_vsync": True, "screenshot_dir": str(tmp_path / "shots"),
                    "screenshots": shots, "photodiode": {"enabled": True, "size_px": 40}},
        "keyboard": {"keys": {"left": 0, "right": 1}},
    }))
    return path


def _run_session(tmp_path: Path, protocol: Path, rig_options: list[str], extra_run: list[str],
                 during: "callable | None" = None, timeout: float = 150) -> tuple[str, list[dict]]:
    display = xvfb_display()
    env = {**os.environ, "DISPLAY": display, "PYTHONUNBUFFERED": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("CLOOP_DB", None)
    db = f"sqlite:///{tmp_path / 'cloop.db'}"
    cloop = [sys.executable, "-m", "orchestrator"]
    subprocess.run(cloop + ["db", "upgrade", "--db", db], check=True, env=env, capture_output=True, timeout=60)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    run = subprocess.Popen(cloop + ["run", str(protocol), "--db", db, "--bind", endpoint, "--insecure",
                                    "--no-prefect", "--seed", "3", *extra_run],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rig = subprocess.Popen(cloop + ["rig", "--connect", endpoint, "--insecure", "--adapter", "psychopy",
                                    *rig_options], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    helper = threading.Thread(target=during, args=(stop,), daemon=True) if during else None
    if helper:
        helper.start()
    try:
        out, err = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        out, err = run.communicate()
        rig.terminate()
        raise AssertionError(f"cloop run timed out\n{out}\n{err}\nrig:\n{rig.communicate()[1][-3000:]}")
    finally:
        stop.set()
        if helper:
            helper.join(timeout=5)
        rig.terminate()
    rig_err = rig.communicate(timeout=20)[1]
    assert run.returncode == 0, f"run failed\n{out}\n{err[-3000:]}\nrig:\n{rig_err[-3000:]}"
    con = sqlite3.connect(tmp_path / "cloop.db")
    con.row_factory = sqlite3.Row
    rows = [dict(r) for r in con.execute("SELECT * FROM trials ORDER BY idx" if _has(con, "idx") else
                                         "SELECT * FROM trials ORDER BY id")]
    con.close()
    return out + err, rows


def _has(con: sqlite3.Connection, column: str) -> bool:
    return any(r[1] == column for r in con.execute("PRAGMA table_info(trials)"))


def _check_presentation(row: dict, frames: int) -> dict:
    assert row["status"] == "completed", row
    response = json.loads(row["response"])
    timing = json.loads(row["timing"])
    worker = timing.get("worker", timing)
    assert worker["onset_flip"] < worker["offset_flip"] <= worker["responded_at"] + 1e-6 or \
        worker["onset_flip"] < worker["responded_at"]
    assert response["frames_requested"] == frames == response["frames_shown"] + response["frames_skipped"]
    assert response["dropped_frames"] == response["dropped_frames_psychopy"]
    assert_duration(response, frames / 60)
    return response


def test_orientation_tuning_on_virtual_screen(tmp_path: Path) -> None:
    rig_yaml = _rig_yaml(tmp_path)
    output, rows = _run_session(
        tmp_path, ROOT / "protocols" / "orientation_tuning.yaml",
        ["--truth", "von_mises", "--seed", "2", "-o", "response=simulated", "-o", f"rig_config={rig_yaml}"],
        ["--max-trials", "6", "--design", "random"])
    assert "completed" in output
    assert len(rows) == 6
    for row in rows:
        response = _check_presentation(row, frames=30)
        assert isinstance(response["value"], int) and response["source"] == "simulated"
    shots = sorted((tmp_path / "shots").glob("grating_trial*.png"))
    assert [p.name for p in shots] == ["grating_trial0000.png", "grating_trial0001.png"]


def test_keyboard_protocol_end_to_end(tmp_path: Path) -> None:
    protocol = tmp_path / "detection.yaml"
    protocol.write_text(DETECTION)
    rig_yaml = _rig_yaml(tmp_path, shots=1)
    rng = random.Random(11)
    pressed: list[str] = []

    def observer(stop: threading.Event) -> None:
        """A subject pressing left/right every 0.4 s; presses between trials are ignored by design."""
        time.sleep(3)
        while not stop.is_set():
            key = rng.choice(["Left", "Right"])
            try:
                press_key(key)
            except subprocess.SubprocessError:
                return
            pressed.append(key.lower())
            stop.wait(0.4)

    output, rows = _run_session(tmp_path, protocol, ["-o", "response=keyboard", "-o", f"rig_config={rig_yaml}"],
                                [], during=observer)
    assert len(rows) == 6
    for row in rows:
        response = _check_presentation(row, frames=12)
        assert response["source"] == "keyboard"
        assert response["key"] in ("left", "right") and response["key"] in pressed
        assert response["value"] == (1 if response["key"] == "right" else 0)
        assert 0 <= response["rt_s"] < 10
        assert row["value"] == response["value"]
    assert (tmp_path / "shots" / "gabor_trial0000.png").exists()
