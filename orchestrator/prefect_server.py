"""A temporary Prefect API server that `cloop` starts, owns and stops (when no PREFECT_API_URL is set).

Prefect would otherwise start its own temporary server as a child in the terminal's process group:
the experimenter's first Ctrl-C (meant as "pause the session") kills it, and every later call of the
flow engine retries against a dead server for minutes. This one is an owned child process
(orchestrator.children): Ctrl-C at the terminal reaches only `cloop`, and the server ends when `cloop`
ends, even after a SIGKILL. With PREFECT_API_URL set (a lab's own server) nothing is
started.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from orchestrator.children import start_owned, stop_owned

log = logging.getLogger("cloop.prefect")

STARTUP_TIMEOUT_S = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))


class PrefectServerError(RuntimeError):
    """The temporary Prefect server did not come up."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(timeout_s: float = STARTUP_TIMEOUT_S) -> tuple[subprocess.Popen, str]:
    """Start Prefect's API app under uvicorn in its own session; return (process, API URL) once healthy."""
    import httpx

    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    process = start_owned(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            if process.poll() is not None:
                error = (process.stderr.read() or b"").decode(errors="replace").strip().splitlines()
                raise PrefectServerError(f"the temporary Prefect server exited with code {process.returncode}"
                                         + (f": {error[-1]}" if error else ""))
            try:
                if client.get(f"{url}/health").status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                stop_server(process)
                raise PrefectServerError(f"the temporary Prefect server did not answer within {timeout_s:g} s "
                                         "(set PREFECT_API_URL to use a running server)")
            time.sleep(0.1)


def stop_server(process: subprocess.Popen) -> None:
    """Terminate the server and reap it."""
    stop_owned(process)
    if process.stderr is not None:
        process.stderr.close()


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Within: Prefect talks to PREFECT_API_URL if set, else to a temporary server this process owns."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    log.debug("starting a temporary Prefect server")
    process, url = start_server()
    log.debug("temporary Prefect server pid %d at %s", process.pid, url)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        stop_server(process)


def _drain_prefect_workers(timeout_s: float = 5.0) -> None:
    """Send Prefect's queued logs and events while the server still runs (they would retry at exit)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:  # pragma: no cover - a Prefect without these services
        return
    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=timeout_s, at_exit=False)
        except Exception as exc:  # noqa: BLE001 - flushing cosmetics must never fail a finished session
            log.debug("could not drain %s: %s", worker.__name__, exc)
