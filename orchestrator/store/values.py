"""Value conversions the store applies on the way in: UTC timestamps and JSON-safe values.

One clock (aware UTC datetimes) and one JSON dialect (non-finite floats as strings) for every
backend, so SQLite and PostgreSQL hold the same data.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
from typing import Any


def utcnow() -> dt.datetime:
    """Timezone-aware now in UTC (the only clock the store writes)."""
    return dt.datetime.now(dt.timezone.utc)


def to_utc(value: Any) -> dt.datetime | None:
    """Coerce epoch seconds, ISO strings or datetimes to an aware UTC datetime.

    Naive datetimes are taken to be UTC already (SQLite drops tzinfo on the way in).
    """
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)
    if isinstance(value, bool):
        raise TypeError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            return None
        try:
            return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
        except (OverflowError, OSError, ValueError) as exc:  # e.g. nanoseconds sent as seconds
            raise ValueError(f"timestamp {value!r} is not plausible epoch seconds") from exc
    if isinstance(value, str):
        return to_utc(dt.datetime.fromisoformat(value))
    if hasattr(value, "item"):  # numpy scalar
        return to_utc(value.item())
    raise TypeError(f"not a timestamp: {value!r}")


def maybe_utc(value: Any) -> dt.datetime | None:
    """`to_utc`, or None for a value that is no plausible timestamp (kept raw elsewhere)."""
    try:
        return to_utc(value)
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def iso(value: dt.datetime | None) -> str | None:
    """ISO 8601 with microseconds and an explicit UTC offset (the export format)."""
    if value is None:
        return None
    return to_utc(value).isoformat(timespec="microseconds")  # type: ignore[union-attr]


def json_safe(obj: Any) -> Any:
    """Make a value storable in a JSON column on every backend.

    PostgreSQL's json type rejects NaN/Infinity, so non-finite floats become the strings
    "NaN", "Infinity", "-Infinity" (the raw value of an invalid response stays visible).
    numpy scalars/arrays become Python numbers/lists, datetimes ISO strings.
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, dt.datetime):
        return iso(obj)
    if isinstance(obj, (dt.date, dt.time)):
        return obj.isoformat()
    if hasattr(obj, "tolist"):  # numpy array or scalar
        return json_safe(obj.tolist())
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj))
    if hasattr(obj, "model_dump"):
        return json_safe(obj.model_dump())
    return str(obj)


def json_dumps(obj: Any) -> str:
    """The JSON serializer of every engine (strict: no NaN literals reach the database)."""
    return json.dumps(json_safe(obj), allow_nan=False)


def as_dict(obj: Any) -> dict[str, Any]:
    """Accept a dict, a dataclass, a pydantic model or any object with attributes."""
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "model_dump"):
        return dict(obj.model_dump())
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


def as_float(v: Any) -> float | None:
    """A float, or None for anything that is not a number."""
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def finite_or_none(v: Any) -> float | None:
    """A finite float, or None."""
    f = as_float(v)
    return f if f is not None and math.isfinite(f) else None


def decision_fields(decision: Any) -> dict[str, Any]:
    """Extract (stimulus, strategy, reason, score, compute_ms) from a Decision or a dict.

    Kept duck-typed so the store never imports the (heavy) design package.
    """
    if decision is None:
        return {}
    get = decision.get if isinstance(decision, dict) else (lambda k, d=None: getattr(decision, k, d))
    return {
        "stimulus": json_safe(get("stimulus")),
        "strategy": get("strategy"),
        "reason": get("reason"),
        "score": finite_or_none(get("score")),
        "compute_ms": json_safe(get("compute_ms")),
    }


def decision_json(fields: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a decision (compute time lives in its own column)."""
    return {k: fields.get(k) for k in ("stimulus", "strategy", "reason", "score")}
