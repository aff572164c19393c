"""`cloop rig` bad input: one line naming the flag, exit 2, no traceback, before any socket exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TRUTH = "power:a=0.9,b=0.5"


def run_rig(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", "rig", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(("connect", "words"), [
    ("127.0.0.1:5555", "expected tcp://HOST:PORT"),
    ("tcp://127.0.0.1", "both a host and a port"),
    ("tcp://:5555", "both a host and a port"),
    ("tcp://127.0.0.1:99999", "not a number in 1..65535"),
    ("tcp://127.0.0.1:http", "not a number in 1..65535"),
    ("http://127.0.0.1:5555", "unsupported scheme 'http'"),
    ("tcp://*:5555", "bind address"),
])
def test_bad_connect_is_one_line_naming_the_flag(connect: str, words: str) -> None:
    proc = run_rig("--connect", connect, "--truth", TRUTH)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --connect ") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_state_dir_and_rig_id_are_refused(tmp_path: Path) -> None:
    afile = tmp_path / "file"
    afile.write_text("x")
    for extra, flag in ((["--state-dir", str(afile)], "--state-dir"),
                        (["--state-dir", str(afile / "sub")], "--state-dir"),
                        (["--rig-id", "booth/1"], "--rig-id")):
        proc = run_rig("--connect", "tcp://127.0.0.1:5555", "--truth", TRUTH, *extra)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("warning:")]
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag} "), proc.stderr
    assert afile.read_text() == "x"


def test_python_m_rig_adapters_runs_the_rig_command_alone() -> None:
    for module in ("rig_adapters", "rig_adapters.worker"):
        proc = subprocess.run([sys.executable, "-m", module, "--connect", "nope", "--truth", TRUTH],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "error: --connect 'nope'" in proc.stderr, proc.stderr
