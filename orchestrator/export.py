"""Trial data out of the database into files: CSV, JSON, Parquet and NWB.

Every file is written to a temporary sibling and renamed into place, so a failed export never
leaves a half-written file behind.
"""
from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

from orchestrator.columns import RECORD_COLUMNS, TIME_COLUMNS, flatten
from orchestrator.store import StoreError, iso, json_safe, resolve_url

if TYPE_CHECKING:
    import pandas as pd

    from orchestrator.analysis import SessionData

FORMATS = ("csv", "parquet", "nwb")


class ExportError(StoreError):
    """The export cannot be made (empty session, unwritable path, missing optional package)."""


#: Optional packages and the extra of cloop that installs them.
EXTRAS = {"pyarrow": "analysis", "pynwb": "analysis", "hdmf": "analysis", "matplotlib": "analysis",
          "psycopg": "postgres"}
#: What each file suffix means when ``--format`` is not given.
SUFFIX_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".nwb": "nwb"}


def need(module: str, feature: str) -> ModuleType:
    """Import an optional package, or raise ExportError naming the extra that installs it."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != top:
            raise
        extra = EXTRAS.get(top, "analysis")
        raise ExportError(f"{feature} needs the optional package {top}: pip install 'cloop[{extra}]'") from None


def format_from_suffix(output: str | os.PathLike[str]) -> str:
    """The export format a file name asks for (``x.parquet`` -> parquet), or ExportError."""
    suffix = Path(output).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise ExportError(f"cannot tell the export format from {str(output)!r}; "
                          f"give --format ({', '.join(FORMATS)}) or name the file .csv, .parquet or .nwb")
    return SUFFIX_FORMATS[suffix]


def file_mode() -> int:
    """Permissions of a new export: 0666 minus the process umask, as `open()` would create it."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# --------------------------------------------------------------------------------------------
# records (used by `cloop trials` and the CSV export)


def trial_record(trial: dict[str, Any]) -> dict[str, Any]:
    """One trial as JSON-ready dict with ISO 8601 (microsecond, UTC) timestamps."""
    rec = {k: json_safe(trial.get(k)) for k in RECORD_COLUMNS if k not in TIME_COLUMNS}
    rec["trial_id"] = trial.get("id", trial.get("trial_id"))
    for k in TIME_COLUMNS:
        rec[k] = iso(trial.get(k))
    return rec


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
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=parent)
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# --------------------------------------------------------------------------------------------
# session export


def export_session(db_url: str | None, session: str, fmt: str, output: str | os.PathLike[str], *,
                   artifacts: str | os.PathLike[str] | None = None, **nwb_options: Any) -> Path:
    """Write one session to ``output`` as csv, parquet or nwb; returns the path written.

    Raises ExportError for an empty session, an unknown format or an unwritable path; the
    target is only replaced once the file is complete.
    """
    from orchestrator.analysis import image_refs, load_images, load_session

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (use one of {', '.join(FORMATS)})")
    output = Path(output)
    _check_writable(output)
    if fmt == "parquet":
        need("pyarrow", "Parquet export")
    elif fmt == "nwb":
        need("pynwb", "NWB export")
    data = load_session(db_url, session)
    if data.trials.empty:
        raise ExportError(f"session {data.session_id} has no trials; nothing to export")
    if fmt == "nwb":
        refs = image_refs([r.stimulus for r in data.rows])
        nwb_options["images"] = load_images(resolve_url(db_url), refs, artifacts) if refs else {}
    writer = {"csv": write_csv, "parquet": write_parquet, "nwb": write_nwb}[fmt]
    with atomic_path(output) as tmp:
        writer(data, tmp, **(nwb_options if fmt == "nwb" else {}))
    return output


def _check_writable(output: Path) -> None:
    """Fail before any database work if the output cannot be created."""
    parent = output.parent if str(output.parent) else Path(".")
    if output.is_dir():
        raise ExportError(f"cannot write {output}: it is a directory")
    if not parent.is_dir():
        raise ExportError(f"cannot write {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {output}: directory {parent} is not writable")
    if output.exists() and not os.access(output, os.W_OK):
        raise ExportError(f"cannot write {output}: file is not writable")


def session_metadata(data: "SessionData") -> dict[str, Any]:
    """JSON-safe session metadata stored alongside every export."""
    keep = ("id", "status", "protocol", "protocol_version", "protocol_sha256", "subject", "seed", "started_at",
            "stopped_at", "code_version", "bind", "design", "meta", "n_trials", "counts")
    meta = {k: json_safe(data.info.get(k)) for k in keep}
    meta["protocol_text"] = data.protocol_text
    meta["models"] = data.models
    return meta


def write_csv(data: "SessionData", path: Path) -> None:
    """Exactly the table ``cloop trials --format csv`` prints (flattened stimulus/response columns)."""
    Path(path).write_text(csv_text(*flat_records([trial_record(t) for t in data.rows])), encoding="utf-8")


def write_parquet(data: "SessionData", path: Path) -> None:
    """Typed columns (ints, floats, UTC timestamps); session metadata + protocol text in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(data.trials, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"cloop.session"] = json.dumps(session_metadata(data)).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


# --------------------------------------------------------------------------------------------
# NWB

NWB_TIME_COLUMNS = {k: k.replace("_at", "_time") for k in TIME_COLUMNS}


def write_nwb(data: "SessionData", path: Path, *, species: str | None = None, sex: str | None = None,
              age: str | None = None, experimenter: str | None = None, institution: str | None = None,
              lab: str | None = None, images: dict[str, Any] | None = None) -> None:
    """NWB 2 file: trials table (stimulus, responses, onset/offset), subject, protocol text, model states.

    Subject species/sex/age are not known to cloop; pass them (sex defaults to "U", unknown) or
    nwbinspector will report them missing. Model states go to ``processing["misc"]``; population
    responses and image pixels as `orchestrator.export_population` describes.

    ``start_time``/``stop_time`` are stimulus onset and response (seconds since session start);
    for trials never presented they fall back to dispatch/plan and record times. Exact times of
    every stage are in the ``*_time`` columns (NaN where they did not happen).
    """
    import datetime as dt
    import math

    from hdmf.common import DynamicTable, VectorData
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.file import Subject

    from orchestrator.export_population import add_images, add_population

    info = data.info
    start: dt.datetime = info["started_at"]
    df = data.trials

    def rel(v: Any) -> float:
        if v is None or v != v:
            return math.nan
        return (v.to_pydatetime() - start).total_seconds()

    desc = f"cloop closed-loop session: protocol {info['protocol']} {info['protocol_version']}"
    nwb = NWBFile(
        session_description=desc,
        identifier=data.session_id,
        session_start_time=start,
        timestamps_reference_time=start,
        session_id=data.session_id,
        protocol=data.protocol_text,
        experiment_description=_protocol_description(data.protocol_text) or desc,
        notes=json.dumps({k: v for k, v in session_metadata(data).items() if k != "protocol_text"}),
        experimenter=[experimenter] if experimenter else None,
        institution=institution,
        lab=lab,
        keywords=["closed-loop", "active learning", "model comparison", str(info["protocol"])],
    )
    nwb.subject = Subject(subject_id=str(info.get("subject") or "unknown"), species=species, sex=sex or "U", age=age,
                          description=f"cloop subject {info.get('subject')!r}")

    skip = {"index", "trial_id"} | set(TIME_COLUMNS)
    columns = [c for c in df.columns if c not in skip]
    nwb.add_trial_column("index", "trial index within the session (0-based)")
    nwb.add_trial_column("trial_id", "database id of the trial row")
    for c in columns:
        nwb.add_trial_column(c, _column_description(c))
    for k, name in NWB_TIME_COLUMNS.items():
        nwb.add_trial_column(name, f"{k.replace('_at', '')} time in s since session_start_time (NaN: did not happen)")
    starts: dict[int, float] = {}
    for row in df.to_dict("records"):
        times = {k: rel(row[k]) for k in TIME_COLUMNS}
        t0 = next((times[k] for k in ("presented_at", "dispatched_at", "planned_at") if not math.isnan(times[k])), 0.0)
        starts[int(row["trial_id"])] = t0
        t1 = next((times[k] for k in ("responded_at", "recorded_at") if not math.isnan(times[k]) and times[k] >= t0), t0)
        values = {c: _nwb_value(df[c].dtype, row[c]) for c in columns}
        nwb.add_trial(start_time=t0, stop_time=t1, index=int(row["index"]), trial_id=int(row["trial_id"]),
                      **values, **{NWB_TIME_COLUMNS[k]: times[k] for k in TIME_COLUMNS})

    if not data.probabilities.empty:
        module = nwb.create_processing_module("misc", "cloop: closed-loop model comparison and design decisions per trial")
        merged = data.probabilities.merge(data.decisions, on="index", how="left")
        cols = [VectorData(name="index", description="trial index", data=[int(v) for v in merged["index"]])]
        for m in data.models:
            cols.append(VectorData(name=f"p_{m}", description=f"posterior probability of model {m!r} after the trial",
                                   data=[float(v) for v in merged[m]]))
        for c, d in (("strategy", "design strategy that chose the stimulus"), ("reason", "why this stimulus")):
            cols.append(VectorData(name=c, description=d, data=[_text(v) for v in merged[c]]))
        for c, d in (("score", "acquisition value (NaN if none)"), ("compute_ms", "design computation time (ms)")):
            cols.append(VectorData(name=c, description=d, data=[float(v) for v in merged[c]]))
        module.add(DynamicTable(name="model_states", description="posterior model probabilities and design decision "
                                "per trial", columns=cols))
        if not data.parameters.empty:
            p = data.parameters
            module.add(DynamicTable(name="parameter_summaries", description="posterior mean and sd of each model "
                                    "parameter after each trial", columns=[
                VectorData(name="index", description="trial index", data=[int(v) for v in p["index"]]),
                VectorData(name="model", description="model name", data=[str(v) for v in p["model"]]),
                VectorData(name="parameter", description="parameter name", data=[str(v) for v in p["parameter"]]),
                VectorData(name="mean", description="posterior mean", data=[float(v) for v in p["mean"]]),
                VectorData(name="sd", description="posterior standard deviation", data=[float(v) for v in p["sd"]]),
            ]))
    add_population(nwb, data, starts)
    add_images(nwb, images or {})
    with NWBHDF5IO(str(path), "w") as io_:
        io_.write(nwb)


def _protocol_description(text: str) -> str | None:
    try:
        import yaml

        d = yaml.safe_load(text)
        desc = d.get("description") if isinstance(d, dict) else None
        return str(desc).strip() if desc else None
    except Exception:
        return None


def _column_description(c: str) -> str:
    if c.startswith("stimulus."):
        return f"stimulus parameter {c.split('.', 1)[1]!r}"
    if c.startswith("response."):
        return f"raw response field {c.split('.', 1)[1]!r} as sent by the rig"
    return {
        "status": "trial status: completed, invalid, failed, abandoned, planned or dispatched",
        "attempts": "number of dispatch attempts",
        "value": "validated response value (NaN if invalid or missing)",
        "error": "why the trial failed or its response was invalid (empty if none)",
        "rig_id": "rig that answered (empty if none)",
    }.get(c, c)


def _text(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


def _nwb_value(dtype: Any, v: Any) -> Any:
    import numpy as np

    if np.issubdtype(dtype, np.integer):
        return int(v)
    if np.issubdtype(dtype, np.floating):
        return float(v)
    if np.issubdtype(dtype, np.bool_):
        return bool(v)
    return _text(v)


# --------------------------------------------------------------------------------------------
# reading exports back (round-trip checks, and for analysts who only have the file)


def read_export(path: str | os.PathLike[str], fmt: str | None = None) -> "pd.DataFrame":
    """Read the trials table of a csv / parquet / nwb export back as the analysis DataFrame."""
    from orchestrator.columns import normalize_frame, time_column, typed_column

    import pandas as pd

    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".").lower()
    if fmt == "csv":
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
        cols = {}
        for c in raw.columns:
            vals = [None if v == "" else v for v in raw[c]]
            if c in TIME_COLUMNS:
                cols[c] = time_column(vals)
            else:
                cols[c] = typed_column([_parse_scalar(v) for v in vals])
        df = pd.DataFrame(cols)
        if "value" in df:
            df["value"] = df["value"].astype("float64")
        return normalize_frame(df)
    if fmt == "parquet":
        return normalize_frame(pd.read_parquet(path))
    if fmt == "nwb":
        import datetime as dt
        import math

        from pynwb import NWBHDF5IO

        with NWBHDF5IO(str(path), "r") as io_:
            nwb = io_.read()
            start = nwb.session_start_time
            t = nwb.trials.to_dataframe()
        out: dict[str, Any] = {}
        for c in t.columns:
            if c in ("start_time", "stop_time") or c in NWB_TIME_COLUMNS.values():
                continue
            vals = list(t[c])
            if t[c].dtype == object or pd.api.types.is_string_dtype(t[c].dtype):
                vals = [None if v == "" else (v.decode() if isinstance(v, bytes) else v) for v in vals]
            out[c] = vals
        for k, name in NWB_TIME_COLUMNS.items():
            out[k] = [None if (v is None or math.isnan(v)) else start + dt.timedelta(microseconds=round(v * 1e6))
                      for v in t[name]]
        order = ["index", "trial_id"] + [c for c in out if c not in ("index", "trial_id") and c not in TIME_COLUMNS] \
            + list(TIME_COLUMNS)
        df = pd.DataFrame({c: (time_column(out[c]) if c in TIME_COLUMNS else typed_column(_py(out[c]))) for c in order})
        for c in ("value",):
            if c in df:
                df[c] = df[c].astype("float64")
        return normalize_frame(df)
    raise ExportError(f"cannot read {path}: unknown format {fmt!r}")


def _py(values: list[Any]) -> list[Any]:
    return [v.item() if hasattr(v, "item") else v for v in values]


def _parse_scalar(v: str | None) -> Any:
    if v is None:
        return None
    if v in ("NaN", "Infinity", "-Infinity"):
        return v
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v
