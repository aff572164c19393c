"""What the store's reads return: frozen records, detached from the database session.

A record cannot be changed by the caller and cannot lazily touch the database after its
transaction ended. Records also answer ``record["field"]`` and ``record.get("field")`` with the
same names as their attributes, so code written against the earlier dict-shaped reads keeps working.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Iterator


class _Readable:
    """Read-only mapping access by field name (``rec["status"]`` == ``rec.status``)."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        """The field's value, or `default` if the record has no such field."""
        return getattr(self, key, default)

    def keys(self) -> list[str]:
        """Field names in declaration order."""
        return [f.name for f in dataclasses.fields(self)]  # type: ignore[arg-type]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def as_dict(self) -> dict[str, Any]:
        """A plain (shallow) dict copy."""
        return {k: getattr(self, k) for k in self.keys()}


@dataclasses.dataclass(frozen=True)
class SessionRecord(_Readable):
    """One session with its protocol identity and trial counts per status."""

    id: str
    status: str
    protocol: str
    protocol_version: str
    protocol_sha256: str
    protocol_id: int
    subject: str | None
    seed: int
    started_at: dt.datetime
    stopped_at: dt.datetime | None
    code_version: str | None
    bind: str | None
    design: Any
    meta: Any
    n_trials: int
    counts: dict[str, int]
    protocol_text: str | None = None  # only from `TrialStore.session` (one session, full detail)


@dataclasses.dataclass(frozen=True)
class TrialRecord(_Readable):
    """One trial as stored; ``value`` is the validated scalar, ``population`` a vector response."""

    id: int
    session_id: str
    index: int
    status: str
    attempts: int
    stimulus: Any
    response: Any
    value: float | None
    error: str | None
    rig_id: str | None
    planned_at: dt.datetime
    dispatched_at: dt.datetime | None
    presented_at: dt.datetime | None
    responded_at: dt.datetime | None
    recorded_at: dt.datetime | None
    timing: Any


@dataclasses.dataclass(frozen=True)
class AttemptRecord(_Readable):
    """One dispatch attempt of a trial, with the rig's raw and mapped times."""

    index: int
    trial_id: int
    attempt: int
    rig_id: str | None
    status: str
    error: str | None
    dispatched_at: dt.datetime
    finished_at: dt.datetime | None
    worker_times: Any
    mapped_times: Any


@dataclasses.dataclass(frozen=True)
class ModelStateRecord(_Readable):
    """The posterior after a trial and the decision that chose its stimulus."""

    index: int
    trial_id: int
    status: str
    probabilities: Any
    summaries: Any
    decision: Any
    decision_ms: float | None
    recorded_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class RigRecord(_Readable):
    """A rig as last seen in its `hello`."""

    id: str
    adapters: Any
    capabilities: Any
    software_version: str | None
    first_seen: dt.datetime
    last_seen: dt.datetime


@dataclasses.dataclass(frozen=True)
class LeaseRecord(_Readable):
    """Who holds a session's lease and until when (holder None: free)."""

    session_id: str
    holder: str | None
    host: str | None
    pid: int | None
    acquired_at: dt.datetime | None
    renewed_at: dt.datetime | None
    expires_at: dt.datetime | None
