"""Versioned msgpack wire format shared by the orchestrator and the rig workers.

Every message is one msgpack map with ``v`` (protocol version) and ``type``. Decoding is strict:
the size is checked before unpacking, msgpack extension types are refused, every field is
validated by a pydantic model (extra fields forbidden, no type coercion), and any problem raises
:class:`MessageError` naming the message type and the field at fault. Hostile bytes therefore
never reach the engine as trial data.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

import msgpack
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError, field_validator

PROTOCOL_VERSION = 1
#: Largest encoded message accepted (protocol texts are a few kB; 1 MiB leaves ample room).
MAX_MESSAGE_BYTES = 1 << 20
#: Deepest nesting of free-form payloads (stimulus, response, timing, meta).
MAX_DEPTH = 16

WORKER_TYPES = frozenset({"hello", "result", "heartbeat", "error", "bye"})
ORCHESTRATOR_TYPES = frozenset({"welcome", "trial", "heartbeat", "error", "bye"})


class MessageError(ValueError):
    """A message could not be encoded or decoded; ``field`` names the culprit (dotted path)."""

    def __init__(self, message: str, *, field: str | None = None, msg_type: str | None = None) -> None:
        where = ".".join(p for p in (msg_type, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.field = field
        self.msg_type = msg_type
        self.reason = message


def _check_plain(value: Any, path: str, depth: int = 0, allow_nonfinite: bool = False) -> None:
    """Refuse anything but JSON-like data, so payloads can be stored as JSON unchanged.

    ``allow_nonfinite`` is for responses only: a rig whose sensor yields NaN must still deliver it,
    so the orchestrator can store the trial as invalid (with the raw value) instead of losing it.
    """
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not (allow_nonfinite or math.isfinite(value)):
            raise ValueError(f"{path}: non-finite number {value!r}")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]", depth + 1, allow_nonfinite)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: key {key!r} is not a string")
            _check_plain(item, f"{path}.{key}", depth + 1, allow_nonfinite)
        return
    raise ValueError(f"{path}: type {type(value).__name__} is not allowed (JSON-like values only)")


_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

Name = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]
Tag = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^(\*|[A-Za-z0-9_.:@-]+)$")]
TrialId = Union[Annotated[StrictInt, Field(ge=0)], Annotated[StrictStr, Field(min_length=1, max_length=128)]]
Timestamp = Annotated[float, Field(ge=0)]


class _Base(BaseModel):
    model_config = _STRICT
    v: Literal[1] = PROTOCOL_VERSION


class Capabilities(BaseModel):
    """What a rig can present (stimulus types, ``*`` = any) and which response kinds it records."""

    model_config = _STRICT
    stimulus_types: list[Tag] = Field(max_length=64)
    response_kinds: list[Tag] = Field(max_length=16)


class ClockInfo(BaseModel):
    """The worker's clock reading when it sent ``hello`` (epoch seconds) and what clock it is."""

    model_config = _STRICT
    time: Timestamp
    source: Annotated[StrictStr, Field(max_length=64)] = "time.time"


# ----------------------------------------------------------------------------- worker -> orchestrator
class Hello(_Base):
    type: Literal["hello"] = "hello"
    rig_id: Name
    adapters: list[Name] = Field(min_length=1, max_length=16)
    capabilities: Capabilities
    software_version: Annotated[StrictStr, Field(max_length=64)]
    clock: ClockInfo
    pid: StrictInt | None = None
    hostname: Annotated[StrictStr, Field(max_length=255)] | None = None


class Result(_Base):
    type: Literal["result"] = "result"
    trial_id: TrialId
    attempt: Annotated[StrictInt, Field(ge=1, le=1000)]
    session_id: Annotated[StrictStr, Field(max_length=128)]
    response: dict[str, Any]
    timing: dict[str, Timestamp | None]
    cached: bool = False  # True: a stored result replayed for a repeated trial id, not presented again
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("response")
    @classmethod
    def _response(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_plain(value, "response", allow_nonfinite=True)
        if "value" not in value:
            raise ValueError("must contain the key 'value'")
        return value

    @field_validator("meta")
    @classmethod
    def _meta(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_plain(value, "meta")
        return value


# ----------------------------------------------------------------------------- orchestrator -> worker
class Welcome(_Base):
    type: Literal["welcome"] = "welcome"
    rig_id: Name
    session_id: Annotated[StrictStr, Field(max_length=128)] | None = None
    protocol_text: StrictStr | None = None
    heartbeat_s: Annotated[float, Field(gt=0, le=60)]
    liveness: Annotated[StrictInt, Field(ge=1, le=100)]
    server_time: Timestamp


class Trial(_Base):
    type: Literal["trial"] = "trial"
    trial_id: TrialId
    attempt: Annotated[StrictInt, Field(ge=1, le=1000)]
    index: Annotated[StrictInt, Field(ge=0)]
    session_id: Annotated[StrictStr, Field(max_length=128)]
    stimulus: dict[str, Any]
    stimulus_type: Name
    response_kind: Name
    timeout_s: Annotated[float, Field(gt=0, le=86400)]

    @field_validator("stimulus")
    @classmethod
    def _stimulus(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_plain(value, "stimulus")
        return value


# ----------------------------------------------------------------------------- both directions
class Heartbeat(_Base):
    """Liveness, and NTP-style clock samples: echo the peer's last ``sent_at`` with its arrival time."""

    type: Literal["heartbeat"] = "heartbeat"
    sent_at: Timestamp
    echo_sent_at: Timestamp | None = None
    echo_received_at: Timestamp | None = None
    #: worker only: the session its adapter has finished starting (ends the server's start-up grace)
    session_ready: Annotated[StrictStr, Field(max_length=128)] | None = None


class ErrorMessage(_Base):
    type: Literal["error"] = "error"
    code: Name = "error"
    message: Annotated[StrictStr, Field(max_length=4096)]
    trial_id: TrialId | None = None
    attempt: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None


class Bye(_Base):
    type: Literal["bye"] = "bye"
    reason: Annotated[StrictStr, Field(max_length=1024)] = ""


Message = Annotated[
    Union[Hello, Result, Welcome, Trial, Heartbeat, ErrorMessage, Bye], Field(discriminator="type")
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)
_TYPES = {"hello", "result", "welcome", "trial", "heartbeat", "error", "bye"}


def encode(msg: BaseModel, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """Serialise a message model; refuse to produce anything the peer would reject for size."""
    data = msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)
    if len(data) > max_bytes:
        raise MessageError(f"encoded size {len(data)} B exceeds the limit of {max_bytes} B",
                           msg_type=getattr(msg, "type", None))
    return data


def _reject_ext(code: int, data: bytes) -> Any:
    raise MessageError(f"msgpack extension type {code} is not allowed")


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc[1:]:  # loc[0] is the union tag
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def decode(data: bytes, *, sender: Literal["worker", "orchestrator"] | None = None,
           max_bytes: int = MAX_MESSAGE_BYTES) -> Any:
    """Parse and validate one message; raise :class:`MessageError` naming the field at fault.

    ``sender`` additionally rejects message types that the given side never sends (e.g. a
    ``trial`` coming from a worker), so a confused or hostile peer cannot inject them.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageError(f"message of {len(data)} B exceeds the limit of {max_bytes} B")
    if len(data) == 0:
        raise MessageError("empty message")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True)
    except MessageError:
        raise
    except Exception as exc:  # msgpack raises ValueError, ExtraData, FormatError, StackError, ...
        raise MessageError(f"not a valid msgpack document ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise MessageError(f"expected a msgpack map, got {type(raw).__name__}")
    version = raw.get("v")
    if type(version) is not int:
        raise MessageError(f"missing or non-integer protocol version ({version!r})", field="v")
    if version != PROTOCOL_VERSION:
        raise MessageError(f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})",
                           field="v")
    msg_type = raw.get("type")
    if not isinstance(msg_type, str) or msg_type not in _TYPES:
        raise MessageError(f"unknown message type {msg_type!r}", field="type")
    if sender == "worker" and msg_type not in WORKER_TYPES:
        raise MessageError(f"a worker may not send {msg_type!r} messages", field="type")
    if sender == "orchestrator" and msg_type not in ORCHESTRATOR_TYPES:
        raise MessageError(f"the orchestrator may not send {msg_type!r} messages", field="type")
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = _format_loc(tuple(first.get("loc", ())))
        raise MessageError(f"{first.get('msg', 'invalid')} (got {_short(first.get('input'))})",
                           field=field or None, msg_type=msg_type) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
