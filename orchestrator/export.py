"""Trial data out of the database into files: CSV, JSON, Parquet and NWB.

Every file is written to a temporary sibling and renamed into place, so a failed export never
leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from orchestrator.store import StoreError, iso, json_safe

TIME_COLUMNS = ("planned_at", "dispatched_at", "presented_at", "responded_at", "recorded_at")
RECORD_COLUMNS = ("index", "id", "status", "attempts", "stimulus", "response", "value", "error", "rig_id",
                  *TIME_COLUMNS)
FORMATS = ("csv", "parquet", "nwb")


class ExportError(StoreError):
    """The export cannot be made (empty session, unwritable path, missing optional package)."""


# --------------------------------------------------------------------------------------------
# records (used by `cloop trials` and the CSV export)


def trial_record(trial: dict[str, Any]) -> dict[str, Any]:
    """One trial as JSON-ready dict with ISO 8601 (microsecond, UTC) timestamps."""
    rec = {k: json_safe(trial.get(k)) for k in RECORD_COLUMNS if k not in TIME_COLUMNS}
    for k in TIME_COLUMNS:
        rec[k] = iso(trial.get(k))
    return rec


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Dotted-key flattening of nested dicts (lists are kept as JSON text)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(json_safe(value))
    else:
        out[prefix] = value


def flat_records(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Flatten ``stimulus``/``response`` into ``stimulus.<name>``/``response.<field>`` columns.

    Returns (columns, rows); columns keep the record order with the nested fields in
    first-seen order at the place of their parent.
    """
    rows: list[dict[str, Any]] = []
    nested: dict[str, list[str]] = {"stimulus": [], "response": []}
    for rec in records:
        row: dict[str, Any] = {}
        for key in RECORD_COLUMNS:
            if key in nested:
                sub: dict[str, Any] = {}
                if rec.get(key) is not None:
                    flatten(key, rec[key] if isinstance(rec[key], dict) else {"value": rec[key]}, sub)
                for col in sub:
                    if col not in nested[key]:
                        nested[key].append(col)
                row.update(sub)
            else:
                row[key] = rec.get(key)
        rows.append(row)
    columns: list[str] = []
    for key in RECORD_COLUMNS:
        columns.extend(nested[key] if key in nested else [key])
    return columns, rows


def csv_text(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """CSV with a header; missing cells empty."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# atomic writes


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it over ``target`` on success only."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ExportError(f"cannot write {target}: it is a directory")
    if not parent.is_dir():
        raise ExportError(f"cannot write {target}: directory {parent} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
