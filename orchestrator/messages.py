"""Versioned msgpack wire format shared by the orchestrator and the rig workers.

Every message is one msgpack map with ``v`` (protocol version) and ``type``. Decoding is strict:
the size is checked before unpacking, msgpack extension types are refused, every field is
validated by a pydantic model (extra fields forbidden, no type coercion), and any problem raises
:class:`MessageError` naming the message type and the field at fault. Hostile bytes therefore
never reach the engine as trial data.

Cheap checks run first, so a hostile message costs microseconds, not a full validation: the byte
size, msgpack's own limits on map/array/string lengths (checked from the headers, before anything is
built), the top-level keys of the message type, and a budget of values in free-form payloads.
Timestamps must be plausible epoch seconds (2000..2100): a clock in nanoseconds, or 1e300, is refused
at the wire with the raw value in the message, before it can reach a clock mapping or the database.
Bytes are allowed in exactly one place: the pixels of an image stimulus (:mod:`orchestrator.wire_images`).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

import msgpack
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter,
                      ValidationError, field_validator)

from orchestrator.wire_images import MAX_IMAGE_BYTES, ImagePayloadError, check_image_payload

PROTOCOL_VERSION = 1
#: Largest encoded message accepted (protocol texts are a few kB; 1 MiB leaves ample room).
MAX_MESSAGE_BYTES = 1 << 20
#: Largest ``trial`` message: an image stimulus carries its pixels (see orchestrator.wire_images).
MAX_TRIAL_BYTES = MAX_MESSAGE_BYTES + MAX_IMAGE_BYTES
#: Deepest nesting of free-form payloads (stimulus, response, timing, meta).
MAX_DEPTH = 16
#: Most keys in any one map and items in any one array (a population response of 10,000 units fits).
MAX_MAP_KEYS = 1024
MAX_ARRAY_ITEMS = 65536
#: Most values in one free-form payload, a flat list of numbers counting as one (a population
#: response is one list); bounds the cost of checking a message whatever its nesting.
MAX_PAYLOAD_VALUES = 20_000
#: Plausible range of a timestamp on the wire, epoch seconds: 2000-01-01 .. 2100-01-01 UTC.
EPOCH_MIN_S = 946_684_800.0
EPOCH_MAX_S = 4_102_444_800.0

WORKER_TYPES = frozenset({"hello", "result", "heartbeat", "error", "bye"})
ORCHESTRATOR_TYPES = frozenset({"welcome", "trial", "heartbeat", "error", "bye"})


class MessageError(ValueError):
    """A message could not be encoded or decoded; ``field`` names the culprit (dotted path)."""

    def __init__(self, message: str, *, field: str | None = None, msg_type: str | None = None,
                 trial_id: Any = None, attempt: int | None = None) -> None:
        where = ".".join(p for p in (msg_type, field) if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.field = field
        self.msg_type = msg_type
        self.reason = message
        #: for a refused ``result``/``trial`` whose trial id and attempt were themselves valid: the attempt
        #: it answers, so the receiver can fail that attempt now instead of waiting for its timeout
        self.trial_id = trial_id
        self.attempt = attempt


def _check_plain(value: Any, path: str, depth: int = 0, allow_nonfinite: bool = False,
                 budget: list[int] | None = None) -> None:
    """Refuse anything but JSON-like data, so payloads can be stored as JSON unchanged.

    ``allow_nonfinite`` is for responses only: a rig whose sensor yields NaN must still deliver it,
    so the orchestrator can store the trial as invalid (with the raw value) instead of losing it.
    ``budget`` counts the values left (:data:`MAX_PAYLOAD_VALUES` per payload; a flat list of
    numbers is one value, checked in one pass).
    """
    if budget is None:
        budget = [MAX_PAYLOAD_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"{path}: more than {MAX_PAYLOAD_VALUES} values in one payload")
    if depth > MAX_DEPTH:
        raise ValueError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not (allow_nonfinite or math.isfinite(value)):
            raise ValueError(f"{path}: non-finite number {value!r}")
        return
    if isinstance(value, list):
        if all(type(item) is float or type(item) is int for item in value):  # flat numbers: one pass
            if not allow_nonfinite and not all(map(math.isfinite, value)):
                bad = next(i for i, item in enumerate(value) if not math.isfinite(item))
                raise ValueError(f"{path}[{bad}]: non-finite number {value[bad]!r}")
            return
        for i, item in enumerate(value):
            _check_plain(item, f"{path}[{i}]", depth + 1, allow_nonfinite, budget)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{path}: key {key!r} is not a string")
            _check_plain(item, f"{path}.{key}", depth + 1, allow_nonfinite, budget)
        return
    raise ValueError(f"{path}: type {type(value).__name__} is not allowed (JSON-like values only)")


_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)

Name = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:@-]+$")]
Tag = Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^(\*|[A-Za-z0-9_.:@-]+)$")]
TrialId = Union[Annotated[StrictInt, Field(ge=0)], Annotated[StrictStr, Field(min_length=1, max_length=128)]]


def _plausible_epoch(value: float) -> float:
    if not EPOCH_MIN_S <= value <= EPOCH_MAX_S:
        hint = next((f" (in {unit}?)" for scale, unit in ((1e9, "nanoseconds"), (1e6, "microseconds"),
                                                           (1e3, "milliseconds"))
                     if EPOCH_MIN_S * scale <= value <= EPOCH_MAX_S * scale), "")
        raise ValueError(f"{value!r} is not a plausible time in epoch seconds (2000..2100){hint}")
    return value


#: Epoch seconds from a rig or orchestrator clock (``time.time()``), refused outside 2000..2100.
Timestamp = Annotated[float, AfterValidator(_plausible_epoch)]


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
        image = value.get("image")
        if isinstance(image, dict):  # the one place bytes may travel: an image's pixels
            try:
                check_image_payload(image, "stimulus.image")
            except ImagePayloadError as exc:
                raise ValueError(str(exc)) from None
            _check_plain({k: v for k, v in value.items() if k != "image"}, "stimulus")
        else:
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


_FIELDS: dict[str, frozenset[str]] = {
    model.model_fields["type"].default: frozenset(model.model_fields)
    for model in (Hello, Result, Welcome, Trial, Heartbeat, ErrorMessage, Bye)
}


def size_limit(msg_type: str | None) -> int:
    """Largest encoded size of a message of this type (a trial may carry an image's pixels)."""
    return MAX_TRIAL_BYTES if msg_type == "trial" else MAX_MESSAGE_BYTES


def encode(msg: BaseModel, *, max_bytes: int | None = None) -> bytes:
    """Serialise a message model; refuse to produce anything the peer would reject for size."""
    msg_type = getattr(msg, "type", None)
    limit = size_limit(msg_type) if max_bytes is None else max_bytes
    data = msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)
    if len(data) > limit:
        raise MessageError(f"encoded size {len(data)} B exceeds the limit of {limit} B", msg_type=msg_type)
    return data


def build(model: type[_Base], **fields: Any) -> Any:
    """Construct a message, turning a validation failure into a one-line :class:`MessageError`
    naming the field and the raw value (what a rig reports when its adapter produced bad data)."""
    msg_type = model.model_fields["type"].default
    try:
        return model(**fields)
    except ValidationError as exc:
        raise _message_error(exc, msg_type, offset=0, raw=fields) from None


def _reject_ext(code: int, data: bytes) -> Any:
    raise MessageError(f"msgpack extension type {code} is not allowed")


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _attempt_of(raw: dict[str, Any]) -> tuple[Any, int | None]:
    """The (trial id, attempt) a raw trial/result names, if both are themselves valid."""
    trial_id, attempt = raw.get("trial_id"), raw.get("attempt")
    valid_id = (type(trial_id) is int and trial_id >= 0) or (isinstance(trial_id, str) and 0 < len(trial_id) <= 128)
    if valid_id and type(attempt) is int and 1 <= attempt <= 1000:
        return trial_id, attempt
    return None, None


def _message_error(exc: ValidationError, msg_type: str, *, offset: int, raw: dict[str, Any]) -> MessageError:
    first = exc.errors(include_url=False)[0]
    field = _format_loc(tuple(first.get("loc", ()))[offset:])
    trial_id, attempt = _attempt_of(raw) if msg_type in ("result", "trial") else (None, None)
    text = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return MessageError(f"{text} (got {_short(first.get('input'))})", field=field or None, msg_type=msg_type,
                        trial_id=trial_id, attempt=attempt)


def decode(data: bytes, *, sender: Literal["worker", "orchestrator"] | None = None,
           max_bytes: int | None = None) -> Any:
    """Parse and validate one message; raise :class:`MessageError` naming the field at fault.

    ``sender`` additionally rejects message types that the given side never sends (e.g. a
    ``trial`` coming from a worker), so a confused or hostile peer cannot inject them.
    ``max_bytes`` caps every type; by default each type has its own limit (:func:`size_limit`).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected bytes, got {type(data).__name__}")
    ceiling = max_bytes if max_bytes is not None else (MAX_MESSAGE_BYTES if sender == "worker" else MAX_TRIAL_BYTES)
    if len(data) > ceiling:
        raise MessageError(f"message of {len(data)} B exceeds the limit of {ceiling} B")
    if len(data) == 0:
        raise MessageError("empty message")
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_reject_ext, use_list=True,
                              max_map_len=MAX_MAP_KEYS, max_array_len=MAX_ARRAY_ITEMS,
                              max_str_len=MAX_MESSAGE_BYTES, max_bin_len=MAX_IMAGE_BYTES)
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
    limit = size_limit(msg_type) if max_bytes is None else max_bytes
    if len(data) > limit:
        raise MessageError(f"message of {len(data)} B exceeds the limit of {limit} B for {msg_type!r}")
    unknown = raw.keys() - _FIELDS[msg_type]
    if unknown:  # before pydantic: one set difference, whatever the number of stray keys
        names = sorted(unknown)
        raise MessageError(f"unknown field(s) {', '.join(repr(n[:40]) for n in names[:3])}"
                           + (f" and {len(names) - 3} more" if len(names) > 3 else ""),
                           field=names[0][:40], msg_type=msg_type, trial_id=_attempt_of(raw)[0],
                           attempt=_attempt_of(raw)[1])
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise _message_error(exc, msg_type, offset=1, raw=raw) from None


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
