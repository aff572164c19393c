"""The analysts' Python API: one session's trials, model probabilities and design decisions as DataFrames.

```python
from orchestrator import analysis
df = analysis.trials("sqlite:///cloop.db", session="latest")
df.groupby("stimulus.lag")["value"].mean()
```

Column names match `cloop trials --format csv` and `cloop export`: ``stimulus.<parameter>``,
``response.<field>``, ``value`` (the validated response), timestamps as timezone-aware UTC
datetimes. Everything reads through `TrialStore`, so ``session`` may be an id, a unique prefix
or ``"latest"``. Population sessions: `population_responses` gives (trial metadata, trials x units
array); `stimulus_images` the exact pixels of every image shown, by sha256.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.columns import (
    SPECIAL_FLOATS as _SPECIAL,
    TIME_COLUMNS,
    TRIAL_HEAD,
    TRIAL_TAIL,
    flat_columns as _flat_columns,
    normalize_frame,
    numeric_or_none,
    time_column,
    typed_column,
)
from orchestrator.store import SessionRecord, StoreError, TrialRecord, TrialStore, resolve_url

__all__ = ["TIME_COLUMNS", "TRIAL_HEAD", "TRIAL_TAIL", "SessionData", "decisions", "load_session",
           "model_probabilities", "normalize_frame", "numeric_or_none", "parameter_summaries",
           "population_responses", "sessions", "stimulus_images", "unit_ids", "time_column", "trials", "trials_frame", "typed_column"]


@dataclass
class SessionData:
    """Everything recorded about one session, loaded once (used by export and report too)."""

    info: SessionRecord
    trials: pd.DataFrame
    probabilities: pd.DataFrame
    decisions: pd.DataFrame
    parameters: pd.DataFrame
    evidence: pd.DataFrame
    attempts: pd.DataFrame
    models: list[str] = field(default_factory=list)
    rows: list[TrialRecord] = field(default_factory=list)  # the store's trial records, unflattened
    population_ids: list[int] = field(default_factory=list)  # trial ids of the rows of `population`
    population: np.ndarray | None = None  # trials x units (population sessions only)

    @property
    def session_id(self) -> str:
        return str(self.info.id)

    @property
    def protocol_text(self) -> str:
        return str(self.info.protocol_text or "")


# --------------------------------------------------------------------------------------------
# column typing


def trials_frame(rows: list[TrialRecord]) -> pd.DataFrame:
    """Store trial records -> the analysts' trials DataFrame (one row per trial, index order)."""
    cols: dict[str, pd.Series] = {
        "index": pd.Series([r.index for r in rows], dtype="int64"),
        "trial_id": pd.Series([r.id for r in rows], dtype="int64"),
        "status": pd.Series([r.status for r in rows], dtype=object),
        "attempts": pd.Series([r.attempts for r in rows], dtype="int64"),
    }
    for name, values in _flat_columns(rows, "stimulus").items():
        cols[name] = typed_column(values)
    cols["value"] = pd.Series([math.nan if r.value is None else float(r.value) for r in rows], dtype="float64")
    for name, values in _flat_columns(rows, "response").items():
        cols[name] = typed_column(values)
    cols["error"] = pd.Series([r.error for r in rows], dtype=object)
    cols["rig_id"] = pd.Series([r.rig_id for r in rows], dtype=object)
    for name in TIME_COLUMNS:
        cols[name] = time_column([getattr(r, name) for r in rows])
    return pd.DataFrame(cols)


def _stimulus_frame(pairs: list[tuple[int, dict[str, Any] | None]]) -> dict[str, pd.Series]:
    cols = _flat_columns([{"stimulus": s} for _, s in pairs], "stimulus")
    return {k: typed_column(v) for k, v in cols.items()}


# --------------------------------------------------------------------------------------------
# loading


def load_session(db_url: str | None = None, session: str = "latest") -> SessionData:
    """Read one session (id, unique prefix or "latest") completely."""
    with TrialStore(resolve_url(db_url)) as store:
        info = store.session(session)
        sid = info.id
        trial_rows = store.trials(sid)
        states = store.model_states(sid)
        attempt_rows = store.attempt_rows(sid)
        population_ids, population = store.population_responses(sid)
    trials_df = trials_frame(trial_rows)

    models: list[str] = []
    for s in states:
        for name in (s.probabilities or {}):
            if name not in models:
                models.append(name)
    prob = pd.DataFrame({
        "index": pd.Series([s.index for s in states], dtype="int64"),
        "status": pd.Series([s.status for s in states], dtype=object),
        **{m: pd.Series([_num((s.probabilities or {}).get(m)) for s in states], dtype="float64")
           for m in models},
    })
    prob.attrs["models"] = models

    decisions = pd.DataFrame({
        "index": pd.Series([s.index for s in states], dtype="int64"),
        "strategy": pd.Series([(s.decision or {}).get("strategy") for s in states], dtype=object),
        "reason": pd.Series([(s.decision or {}).get("reason") for s in states], dtype=object),
        "score": pd.Series([_num((s.decision or {}).get("score")) for s in states], dtype="float64"),
        "compute_ms": pd.Series([_num(s.decision_ms) for s in states], dtype="float64"),
        **_stimulus_frame([(s.index, (s.decision or {}).get("stimulus")) for s in states]),
    })

    prow: list[dict[str, Any]] = []
    erow: list[dict[str, Any]] = []
    for s in states:
        for model, summ in (s.summaries or {}).items():
            if not isinstance(summ, dict):
                continue
            erow.append({"index": s.index, "model": model, "log_evidence": _num(summ.get("log_evidence")),
                         "ess": _num(summ.get("ess"))})
            for pname, mom in (summ.get("params") or {}).items():
                if isinstance(mom, dict):
                    prow.append({"index": s.index, "model": model, "parameter": pname,
                                 "mean": _num(mom.get("mean")), "sd": _num(mom.get("sd"))})
    parameters = pd.DataFrame(prow, columns=["index", "model", "parameter", "mean", "sd"])
    evidence = pd.DataFrame(erow, columns=["index", "model", "log_evidence", "ess"])

    att = pd.DataFrame({
        "index": pd.Series([a.index for a in attempt_rows], dtype="int64"),
        "trial_id": pd.Series([a.trial_id for a in attempt_rows], dtype="int64"),
        "attempt": pd.Series([a.attempt for a in attempt_rows], dtype="int64"),
        "status": pd.Series([a.status for a in attempt_rows], dtype=object),
        "rig_id": pd.Series([a.rig_id for a in attempt_rows], dtype=object),
        "error": pd.Series([a.error for a in attempt_rows], dtype=object),
        "dispatched_at": time_column([a.dispatched_at for a in attempt_rows]),
        "finished_at": time_column([a.finished_at for a in attempt_rows]),
    })
    return SessionData(info, trials_df, prob, decisions, parameters, evidence, att, models, trial_rows,
                       population_ids, population if population_ids else None)


def _num(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str):
        return _SPECIAL.get(v, math.nan)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def trials(db_url: str | None = None, session: str = "latest") -> pd.DataFrame:
    """One row per trial: index, status, attempts, ``stimulus.*``, ``value``, ``response.*``, error, rig, times."""
    with TrialStore(resolve_url(db_url)) as store:
        return trials_frame(store.trials(session))


def model_probabilities(db_url: str | None = None, session: str = "latest") -> pd.DataFrame:
    """Posterior model probabilities after each trial: columns index, status, one per model."""
    return load_session(db_url, session).probabilities


def decisions(db_url: str | None = None, session: str = "latest") -> pd.DataFrame:
    """The design decision behind each trial: strategy, reason, score, compute_ms, chosen ``stimulus.*``."""
    return load_session(db_url, session).decisions


def parameter_summaries(db_url: str | None = None, session: str = "latest") -> pd.DataFrame:
    """Per trial, model and parameter: posterior mean and sd (long format)."""
    return load_session(db_url, session).parameters


def sessions(db_url: str | None = None) -> pd.DataFrame:
    """All sessions with protocol, subject, status, times and trial counts."""
    with TrialStore(resolve_url(db_url)) as store:
        rows = store.sessions()
    recs = [{"id": r.id, "status": r.status, "protocol": r.protocol, "protocol_version": r.protocol_version,
             "subject": r.subject, "seed": r.seed, "started_at": r.started_at, "stopped_at": r.stopped_at,
             "n_trials": r.n_trials, **{f"n_{k}": v for k, v in r.counts.items()}} for r in rows]
    df = pd.DataFrame(recs, columns=["id", "status", "protocol", "protocol_version", "subject", "seed", "started_at",
                                     "stopped_at", "n_trials", "n_planned", "n_dispatched", "n_completed",
                                     "n_invalid", "n_failed", "n_abandoned"])
    for c in ("started_at", "stopped_at"):
        df[c] = time_column(list(df[c]))
    return df


# --------------------------------------------------------------------------------------------
# population responses and image stimuli

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def unit_ids(protocol_text: str, n_units: int) -> list[Any]:
    """The protocol's unit ids (``response.units`` as a list), else 0..N-1."""
    try:
        import yaml

        units = ((yaml.safe_load(protocol_text) or {}).get("response") or {}).get("units")
    except Exception:  # an unparsable stored text still has its data
        units = None
    if isinstance(units, list) and len(units) == n_units:
        return list(units)
    return list(range(n_units))


def population_responses(db_url: str | None = None, session: str = "latest") -> tuple[pd.DataFrame, np.ndarray]:
    """A population session's responses: (trial metadata DataFrame, trials x units float64 array).

    Row i of the array is the response of the trial in row i of the frame (completed trials with
    a stored vector, in trial order); NaN marks a unit masked on that trial. The frame has the
    columns of `trials` plus ``n_units`` and ``n_masked``; ``frame.attrs["units"]`` names the
    array's columns (the protocol's unit ids, else 0..N-1).
    """
    with TrialStore(resolve_url(db_url)) as store:
        info = store.session(session)
        rows = {r.id: r for r in store.trials(info.id)}
        ids, responses = store.population_responses(info.id)
    meta = trials_frame([rows[i] for i in ids])
    meta["n_units"] = pd.Series([responses.shape[1]] * len(ids), dtype="int64")
    meta["n_masked"] = pd.Series(np.isnan(responses).sum(axis=1) if ids else [], dtype="int64")
    meta.attrs["units"] = unit_ids(info.protocol_text or "", responses.shape[1])
    meta.attrs["session_id"] = info.id
    return meta, responses


def image_refs(stimuli: list[Any]) -> list[str]:
    """The sha256 image references (``{"image": hex}``) among stimuli, first-seen order, no repeats."""
    seen: dict[str, None] = {}
    for stim in stimuli:
        ref = stim.get("image") if isinstance(stim, dict) else None
        if isinstance(ref, str) and _SHA256.match(ref):
            seen.setdefault(ref, None)
    return list(seen)


def stimulus_images(db_url: str | None = None, session: str = "latest",
                    artifacts: str | Path | None = None) -> dict[str, np.ndarray]:
    """The exact uint8 pixels of every image a session showed, by sha256.

    Images live in the artifact store beside a SQLite database (``<db path>.artifacts/``), or
    where `artifacts` / ``$CLOOP_ARTIFACTS`` says (PostgreSQL sessions).
    """
    url = resolve_url(db_url)
    with TrialStore(url) as store:
        refs = image_refs([t.stimulus for t in store.trials(session)])
    if not refs:
        return {}
    return load_images(url, refs, artifacts)


def load_images(db_url: str, refs: list[str], artifacts: str | Path | None = None) -> dict[str, np.ndarray]:
    """Read image artifacts by sha256 (each verified against its hash by the artifact store)."""
    try:
        from orchestrator.artifacts import ArtifactError, ArtifactStore
    except ImportError:
        raise StoreError("this session references image artifacts, but this cloop has no artifact store") from None
    images = ArtifactStore.for_database(db_url, artifacts)
    try:
        return {sha: images.get(sha) for sha in refs}
    except ArtifactError as exc:
        raise StoreError(str(exc)) from None
