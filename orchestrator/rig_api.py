"""The rig vocabulary the engine speaks: a trial command, a rig's outcome, and typed failures.

No sockets here (no zmq import): the engine, the simulator and tests depend on these names without
depending on the network. :mod:`orchestrator.transport` implements them over ZeroMQ and re-exports
them, so ``from orchestrator.transport import RigLost`` keeps working.

A failed attempt carries a :class:`FailureReason` fixed when it is raised; callers switch on
``exc.reason`` rather than parsing messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from orchestrator import messages as m


class FailureReason(enum.Enum):
    """Why one dispatch attempt of a trial produced no outcome."""

    RIG_LOST = "rig_lost"            # the rig died, disconnected, restarted or went silent
    TIMEOUT = "timeout"              # the rig stayed alive but did not answer in time
    REFUSED = "refused"              # the rig's own hard limits refused the stimulus: retrying cannot help
    ABORTED = "aborted"              # the operator aborted the trial at the rig
    ADAPTER_FAILED = "adapter_failed"  # the rig's adapter raised while presenting
    SESSION_FAILED = "session_failed"  # the rig's adapter could not start the session
    BAD_RESULT = "bad_result"        # the rig answered for another session or with an unusable result
    SHUTDOWN = "shutdown"            # the orchestrator's rig server closed while the trial was out

    @property
    def retryable(self) -> bool:
        """Whether another attempt (same trial id, next attempt number) can succeed."""
        return self not in (FailureReason.REFUSED, FailureReason.ABORTED)


#: Worker error codes (``error.code`` on the wire) with a reason of their own; any other code an
#: adapter reports counts as :attr:`FailureReason.ADAPTER_FAILED`.
_REASON_OF_CODE: dict[str, FailureReason] = {
    "refused": FailureReason.REFUSED,
    "aborted": FailureReason.ABORTED,
    "adapter_failed": FailureReason.ADAPTER_FAILED,
    "session_failed": FailureReason.SESSION_FAILED,
    "session_mismatch": FailureReason.BAD_RESULT,
    "bad_result": FailureReason.BAD_RESULT,
}


def reason_of_code(code: str) -> FailureReason:
    """The failure reason a worker's error code stands for."""
    return _REASON_OF_CODE.get(code, FailureReason.ADAPTER_FAILED)


class TransportError(RuntimeError):
    """Base class of rig-network failures."""


class NoRigError(TransportError):
    """No suitable rig registered (or came back) within the allowed time."""


class AttemptFailed(TransportError):
    """One dispatch attempt of a trial failed; the engine may retry with ``attempt + 1``."""

    def __init__(self, reason: FailureReason, message: str, *, rig_id: str | None = None,
                 trial_id: Any = None, attempt: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.rig_id = rig_id
        self.trial_id = trial_id
        self.attempt = attempt


class RigLost(AttemptFailed):
    """The rig died, disconnected, restarted or went silent while the trial was in flight."""

    def __init__(self, message: str, *, rig_id: str | None = None, trial_id: Any = None,
                 attempt: int | None = None, reason: FailureReason = FailureReason.RIG_LOST) -> None:
        super().__init__(reason, message, rig_id=rig_id, trial_id=trial_id, attempt=attempt)


class TrialTimeout(AttemptFailed):
    """The rig stayed alive but did not answer within the trial's timeout."""

    def __init__(self, message: str, *, rig_id: str | None = None, trial_id: Any = None,
                 attempt: int | None = None) -> None:
        super().__init__(FailureReason.TIMEOUT, message, rig_id=rig_id, trial_id=trial_id, attempt=attempt)


class TrialRejected(AttemptFailed):
    """The worker answered with an error for this trial; ``code`` is its wire code.

    Codes: ``adapter_failed`` (present raised), ``aborted`` (operator abort), ``refused`` (hard
    limits), ``session_failed`` (the adapter could not start the session), ``session_mismatch``,
    or an adapter's own code; ``reason`` is the :class:`FailureReason` the code stands for.
    """

    def __init__(self, message: str, *, code: str = "adapter_failed", rig_id: str | None = None,
                 trial_id: Any = None, attempt: int | None = None) -> None:
        super().__init__(reason_of_code(code), message, rig_id=rig_id, trial_id=trial_id, attempt=attempt)
        self.code = code


@dataclass(frozen=True)
class TrialCommand:
    """One presentation request. ``timeout_s`` is the subject's response window (sent to the rig)."""

    trial_id: int | str
    attempt: int
    index: int
    session_id: str
    stimulus: dict[str, Any]
    stimulus_type: str
    response_kind: str
    timeout_s: float

    def wire_fields(self) -> dict[str, Any]:
        """The command as plain msgpack-able values (numpy scalars from design code included)."""
        return dict(trial_id=plain(self.trial_id), attempt=int(self.attempt), index=int(self.index),
                    session_id=self.session_id, stimulus=plain(self.stimulus),
                    stimulus_type=self.stimulus_type, response_kind=self.response_kind,
                    timeout_s=float(self.timeout_s))

    def message(self) -> m.Trial:
        """The wire ``trial`` message."""
        return m.Trial(**self.wire_fields())


def plain(value: Any) -> Any:
    """numpy scalars/arrays and tuples (as design code produces them) to plain msgpack-able values."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (bool, int, float, str, bytes)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)  # numpy scalar or array, torch tensor
    return plain(tolist()) if callable(tolist) else value


@dataclass(frozen=True)
class TrialOutcome:
    """A rig's answer to one trial attempt, with its times on both clocks."""

    trial_id: int | str
    attempt: int
    rig_id: str
    response: dict[str, Any]           # as sent by the rig: {"value": ..., extras}
    timing: dict[str, float | None]    # raw worker clock (epoch s)
    mapped_timing: dict[str, float | None]  # same keys on the orchestrator clock (worker - offset)
    clock_offset_s: float | None
    clock_rtt_s: float | None
    dispatched_at: float               # orchestrator epoch s
    received_at: float                 # orchestrator epoch s
    cached: bool                       # the rig replayed a stored result (not presented again)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def round_trip_s(self) -> float:
        return self.received_at - self.dispatched_at


@dataclass(frozen=True)
class RigInfo:
    """A registered rig as announced in its ``hello`` (plus what the server learnt about it)."""

    rig_id: str
    adapters: tuple[str, ...]
    stimulus_types: tuple[str, ...]
    response_kinds: tuple[str, ...]
    software_version: str
    hostname: str | None
    pid: int | None
    key_name: str | None          # allow-list file stem of the Curve key it used (None: insecure)
    peer_address: str | None
    registered_at: float          # orchestrator epoch s
    clock_offset_s: float | None  # worker clock minus orchestrator clock
    clock_rtt_s: float | None
    session_ready: str | None = None  # session whose start the rig's adapter has completed
    start_error: str | None = None    # why the adapter could not start the session, if it failed

    def as_dict(self) -> dict[str, Any]:
        return {
            "rig_id": self.rig_id, "adapters": list(self.adapters),
            "capabilities": {"stimulus_types": list(self.stimulus_types),
                             "response_kinds": list(self.response_kinds)},
            "software_version": self.software_version, "hostname": self.hostname, "pid": self.pid,
            "key_name": self.key_name, "peer_address": self.peer_address,
            "registered_at": self.registered_at, "clock_offset_s": self.clock_offset_s,
            "clock_rtt_s": self.clock_rtt_s, "session_ready": self.session_ready,
        }

    def offers(self, capabilities: list[str] | tuple[str, ...]) -> bool:
        """A rig qualifies if any wanted capability names one of its adapters or stimulus types."""
        if not capabilities:
            return True
        have = set(self.adapters) | set(self.stimulus_types)
        return bool(have & set(capabilities))
