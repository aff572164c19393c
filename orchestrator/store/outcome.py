"""The rig's answer as the store reads it: the fields of the rig vocabulary's ``TrialOutcome``.

The store depends on the outcome's shape, not on the module that defines it, so it never imports
the rig network (zmq). One shape: ``timing`` holds the rig's raw clock, ``mapped_timing`` the same
keys mapped to the orchestrator's clock. A mapping with the same keys is accepted too (tests,
offline imports).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from orchestrator.store.values import json_safe

#: Transport facts stored beside the two clocks in ``trials.timing``.
_CLOCK_KEYS = ("clock_offset_s", "clock_rtt_s", "dispatched_at", "received_at", "cached")


@runtime_checkable
class OutcomeLike(Protocol):
    """What `TrialStore.complete_trial` reads from an outcome."""

    attempt: int
    rig_id: str
    response: dict[str, Any]
    timing: dict[str, float | None]
    mapped_timing: dict[str, float | None]


@dataclass(frozen=True)
class StoredOutcome:
    """An outcome reduced to what the trial and attempt rows keep."""

    rig_id: str | None
    attempt: int | None
    response: dict[str, Any]
    worker: dict[str, Any]
    mapped: dict[str, Any]
    timing: dict[str, Any]  # the ``trials.timing`` JSON: worker, mapped and the clock facts


def read_outcome(outcome: OutcomeLike | Mapping[str, Any]) -> StoredOutcome:
    """Normalise a ``TrialOutcome`` (or a mapping with its field names) for storage."""
    if isinstance(outcome, Mapping):
        get = outcome.get
    else:
        def get(key: str, default: Any = None) -> Any:
            return getattr(outcome, key, default)
    response = get("response")
    if response is None:
        response = {}
    elif not isinstance(response, Mapping):
        response = {"value": response}
    worker = dict(get("timing") or {})
    mapped = dict(get("mapped_timing") or {})
    timing: dict[str, Any] = {}
    if worker:
        timing["worker"] = worker
    if mapped:
        timing["mapped"] = mapped
    for key in _CLOCK_KEYS:
        if get(key) is not None:
            timing[key] = get(key)
    attempt = get("attempt")
    return StoredOutcome(get("rig_id"), None if attempt is None else int(attempt), dict(response),
                         worker, mapped, json_safe(timing))
