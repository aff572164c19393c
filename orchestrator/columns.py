"""The column vocabulary shared by analysis DataFrames, `cloop trials` and every export format.

One place says what the columns of a trials table are called, in which order, and how a stored
value becomes a typed column: ``stimulus.<parameter>``, ``value``, ``response.<field>``, then the
timestamps (timezone-aware UTC, microseconds). analysis and export both read it; neither
imports the other for it.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from orchestrator.store import json_safe

if TYPE_CHECKING:
    import pandas as pd

TIME_COLUMNS = ("planned_at", "dispatched_at", "presented_at", "responded_at", "recorded_at")
RECORD_COLUMNS = ("index", "trial_id", "status", "attempts", "stimulus", "value", "response", "error", "rig_id",
                  *TIME_COLUMNS)
TRIAL_HEAD = ("index", "trial_id", "status", "attempts")
TRIAL_TAIL = ("error", "rig_id", *TIME_COLUMNS)
#: How non-finite floats are spelled in JSON columns (PostgreSQL's json has no NaN).
SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Dotted-key flattening of nested dicts (lists are kept as JSON text)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(json_safe(value))
    else:
        out[prefix] = value


def flat_columns(rows: list[Any], key: str) -> dict[str, list[Any]]:
    """``key.<field>`` columns of the nested dict `key` of every row, fields in first-seen order."""
    flats: list[dict[str, Any]] = []
    order: list[str] = []
    for r in rows:
        sub: dict[str, Any] = {}
        value = r.get(key)
        if value is not None:
            flatten(key, value if isinstance(value, dict) else {"value": value}, sub)
        for k in sub:
            if k not in order:
                order.append(k)
        flats.append(sub)
    return {c: [f.get(c) for f in flats] for c in order}


def numeric_or_none(values: list[Any]) -> list[Any] | None:
    """Values as numbers if every non-missing value is numeric (incl. "NaN"/"Infinity" strings), else None."""
    out: list[Any] = []
    for v in values:
        if v is None:
            out.append(None)
        elif isinstance(v, bool):
            return None
        elif isinstance(v, (int, float)):
            out.append(v)
        elif isinstance(v, str) and v in SPECIAL_FLOATS:
            out.append(SPECIAL_FLOATS[v])
        else:
            return None
    return out


def typed_column(values: list[Any]) -> "pd.Series":
    """int64 when all values are present integers, float64 when numeric, else the values as they are."""
    import pandas as pd

    nums = numeric_or_none(values)
    if nums is None:
        if values and all(isinstance(v, bool) for v in values):
            return pd.Series(values, dtype=bool)
        return pd.Series([None if v is None else v for v in values], dtype=object)
    if nums and all(isinstance(v, int) and not isinstance(v, bool) for v in nums):
        return pd.Series(nums, dtype="int64")
    return pd.Series([math.nan if v is None else float(v) for v in nums], dtype="float64")


def time_column(values: list[Any]) -> "pd.Series":
    """Timezone-aware UTC datetimes with microsecond resolution (NaT where missing)."""
    import pandas as pd

    return pd.Series(pd.to_datetime(pd.Series(values, dtype=object), utc=True)).astype("datetime64[us, UTC]")


def normalize_frame(df: "pd.DataFrame") -> "pd.DataFrame":
    """Canonical dtypes for comparing frames from different sources (db, CSV, Parquet, NWB).

    Text columns become object with None for missing values (pandas 3 would otherwise pick its
    string dtype with NaN), timestamps datetime64[us, UTC].
    """
    import pandas as pd

    out = {}
    for c in df.columns:
        s = df[c]
        if c in TIME_COLUMNS:
            out[c] = time_column(list(s.astype(object).where(s.notna(), None)))
        elif pd.api.types.is_string_dtype(s.dtype) or s.dtype == object:
            out[c] = typed_column([None if (v is None or (isinstance(v, float) and math.isnan(v))) else
                                   (v.item() if hasattr(v, "item") else v) for v in s.astype(object)])
        else:
            out[c] = s.reset_index(drop=True)
    return pd.DataFrame(out)
