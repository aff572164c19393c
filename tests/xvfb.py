"""A virtual X display (Xvfb) for tests that open real PsychoPy windows.

One Xvfb per test process, started on first use on a free display number and stopped after exit:
pyglet keeps its X connection for the life of the process, so every display test must share it.
Missing Xvfb or PsychoPy skips the test on a laptop and fails it under CI=true.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
SCREEN = "1024x768x24"
_server: subprocess.Popen | None = None
_display: str | None = None


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason} (required under CI=true)")
    pytest.skip(reason)


def _free_display() -> int:
    for n in range(90, 200):
        if not Path(f"/tmp/.X{n}-lock").exists() and not Path(f"/tmp/.X11-unix/X{n}").exists():
            return n
    raise RuntimeError("no free X display number in :90..:199")


def _reap_when_we_exit(xvfb_pid: int) -> None:
    """Kill Xvfb once this process has exited (not at atexit: pyglet still holds its X connection
    then, and Xlib turns a vanished server into a fatal IO error and a non-zero exit status)."""
    subprocess.Popen(["sh", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 0.5; done; kill {xvfb_pid}"],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)


def xvfb_display() -> str:
    """Start (once) and return the DISPLAY of a private Xvfb; DISPLAY is set for this process."""
    global _server, _display
    _need(shutil.which("Xvfb") is not None, "Xvfb is not installed (apt-get install -y xvfb libgl1-mesa-dri)")
    try:
        import psychopy  # noqa: F401
    except ImportError:
        _need(False, "psychopy is not installed (see docs/install-psychopy.md)")
    if _server is not None and _server.poll() is None and _display:
        return _display
    for _attempt in range(3):
        n = _free_display()
        proc = subprocess.Popen(["Xvfb", f":{n}", "-screen", "0", SCREEN, "-nolisten", "tcp", "-noreset"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            if Path(f"/tmp/.X11-unix/X{n}").exists():
                break
            time.sleep(0.05)
        if proc.poll() is None and Path(f"/tmp/.X11-unix/X{n}").exists():
            _server, _display = proc, f":{n}"
            os.environ["DISPLAY"] = _display
            _reap_when_we_exit(proc.pid)
            return _display
        proc.kill()
    _need(False, "Xvfb did not start")
    raise AssertionError("unreachable")


def press_key(key: str, *, hold_s: float = 0.03) -> None:
    """Press and release `key` through the X server (XTEST), as a real keyboard would."""
    _need(shutil.which("xdotool") is not None, "xdotool is not installed (apt-get install -y xdotool)")
    subprocess.run(["xdotool", "key", "--delay", str(int(hold_s * 1000)), key], check=True,
                   env={**os.environ, "DISPLAY": _display or os.environ.get("DISPLAY", "")}, timeout=10)
