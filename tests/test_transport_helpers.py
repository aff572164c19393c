"""Shared helpers for the rig-network tests (no tests here): real worker processes and a raw DEALER."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from orchestrator import messages as m
from orchestrator.transport import TrialCommand

NULL_ADAPTER = "rig_adapters.simulated:NullAdapter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd(i: int, *, session: str = "s1", attempt: int = 1, timeout_s: float = 5.0,
        stimulus: dict[str, Any] | None = None) -> TrialCommand:
    return TrialCommand(trial_id=f"{session}:{i}", attempt=attempt, index=i, session_id=session,
                        stimulus=stimulus if stimulus is not None else {"lag": i}, stimulus_type="abstract",
                        response_kind="gaussian", timeout_s=timeout_s)


class Workers:
    """Starts `python -m rig_adapters.worker` processes; kills every one of them on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen] = []
        self._n = 0

    def start(self, endpoint: str, rig_id: str, *, adapter: str = NULL_ADAPTER, insecure: bool = True,
              keys: Path | None = None, name: str | None = None, state_dir: Path | None = None,
              options: dict[str, Any] | None = None) -> subprocess.Popen:
        args = [sys.executable, "-m", "rig_adapters.worker", "--connect", endpoint, "--adapter", adapter,
                "--rig-id", rig_id]
        if insecure:
            args.append("--insecure")
        if keys is not None:
            args += ["--keys", str(keys)]
        if name is not None:
            args += ["--name", name]
        if state_dir is not None:
            args += ["--state-dir", str(state_dir)]
        for k, v in (options or {}).items():
            args += ["--option", f"{k}={v}"]
        self._n += 1
        log = open(self.log_dir / f"worker-{rig_id}-{self._n}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log")))

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


class RawRig:
    """A hand-driven DEALER: says exactly what a test tells it to, to probe the server's reactions."""

    def __init__(self, endpoint: str, *, curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            self.sock.curve_publickey, self.sock.curve_secretkey, self.sock.curve_serverkey = curve
        self.sock.connect(endpoint)

    def send(self, msg: Any) -> None:
        self.sock.send(msg if isinstance(msg, bytes) else m.encode(msg))

    def hello(self, rig_id: str = "raw", *, adapters: tuple[str, ...] = ("null",), clock: float | None = None) -> None:
        self.send(m.Hello(rig_id=rig_id, adapters=list(adapters),
                          capabilities=m.Capabilities(stimulus_types=["*"], response_kinds=["gaussian", "bernoulli"]),
                          software_version="test", clock=m.ClockInfo(time=clock if clock is not None else time.time())))

    def recv(self, timeout: float = 2.0, *, skip_heartbeats: bool = True) -> Any | None:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000):
                return None
            msg = m.decode(self.sock.recv(), sender="orchestrator")
            if skip_heartbeats and msg.type == "heartbeat":
                continue
            return msg

    def expect(self, msg_type: str, timeout: float = 2.0) -> Any:
        msg = self.recv(timeout)
        assert msg is not None, f"no {msg_type} within {timeout} s"
        assert msg.type == msg_type, f"expected {msg_type}, got {msg!r}"
        return msg

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
