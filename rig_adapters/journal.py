"""The rig's journal of presented trials: what makes presentation exactly-once per rig.

Results by (session, trial id), written as JSON lines and fsync'ed *before* the result is sent, so a
trial id seen again (a retry after a lost connection, or a worker killed and restarted with the same
``--state-dir``) is answered from here with ``cached=True`` instead of being presented twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ResultJournal"]

log = logging.getLogger("cloop.worker")


class ResultJournal:
    """Results by (session, trial id); optionally persisted as fsync'ed JSON lines in ``state_dir``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._results: dict[tuple[str, str], dict[str, Any]] = {}
        self._started: dict[tuple[str, str], int] = {}
        self._fh = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "a+", encoding="utf-8")
            self._lock_file(path)
            self._load(path)
            self._fh.seek(0, os.SEEK_END)
            if self._fh.tell() > 0:
                self._fh.seek(self._fh.tell() - 1)
                if self._fh.read(1) != "\n":  # a line torn by a crash: never glue the next record to it
                    self._fh.write("\n")
                    self._fh.flush()

    @staticmethod
    def key(session_id: str, trial_id: Any) -> tuple[str, str]:
        return (session_id, f"{type(trial_id).__name__}:{trial_id}")

    def _lock_file(self, path: Path) -> None:
        """Two workers sharing one journal would each think the other's trials are theirs: refuse."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; one worker per rig id is the rule
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            self._fh = None
            raise RuntimeError(f"another worker is already using the journal {path} "
                               "(same --rig-id and --state-dir): stop it first") from None

    def _load(self, path: Path) -> None:
        bad = 0
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                    k = (rec["session_id"], rec["key"])
                    if rec["event"] == "result":
                        self._results[k] = rec["result"]
                    elif rec["event"] == "start":
                        self._started[k] = self._started.get(k, 0) + 1
                except Exception:
                    bad += 1  # a line torn by a crash mid-write: ignore it
        if bad:
            log.warning("ignored %d unreadable line(s) in %s", bad, path)
        log.info("journal %s: %d stored result(s)", path, len(self._results))

    def _write(self, rec: dict[str, Any], durable: bool) -> None:
        if self._fh is None:
            return
        self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self._fh.flush()
        if durable:
            os.fsync(self._fh.fileno())

    def get(self, key: tuple[str, str]) -> dict[str, Any] | None:
        with self._lock:
            return self._results.get(key)

    def times_started(self, key: tuple[str, str]) -> int:
        with self._lock:
            return self._started.get(key, 0)

    def started(self, key: tuple[str, str], attempt: int) -> None:
        with self._lock:
            self._started[key] = self._started.get(key, 0) + 1
            self._write({"event": "start", "session_id": key[0], "key": key[1], "attempt": attempt,
                         "pid": os.getpid(), "t": time.time()}, durable=False)

    def store(self, key: tuple[str, str], attempt: int, result: dict[str, Any]) -> None:
        with self._lock:
            self._results[key] = result
            self._write({"event": "result", "session_id": key[0], "key": key[1], "attempt": attempt,
                         "pid": os.getpid(), "t": time.time(), "result": result}, durable=True)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
