"""Helper processes `cloop` starts and owns (the temporary Prefect server, the demo's simulated rig).

They run in a session of their own, so the experimenter's Ctrl-C at the terminal reaches only
`cloop` (which pauses, then stops, the session), and they end when `cloop` ends, even after a
SIGKILL (Linux PR_SET_PDEATHSIG), so no orphan is left behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Any, Callable

PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int) -> Callable[[], None]:
    def before_exec() -> None:
        """Child side, before exec: SIGTERM when the parent ends, and never outlive it."""
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # not Linux: the parent's own stop is the only guard
            pass
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return before_exec


def start_owned(args: list[str], **popen: Any) -> subprocess.Popen:
    """Popen `args` in its own session, tied to this process's life."""
    return subprocess.Popen(args, start_new_session=True, preexec_fn=_die_with(os.getpid()), **popen)


def stop_owned(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Terminate the process (SIGKILL if it does not end within timeout_s) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
