"""Trials, their dispatch attempts, responses (scalar or population) and the model state after each.

Write-ahead order: `plan_trial` commits the ``planned`` row before the stimulus is dispatched,
`complete_trial` commits the response before the models see it, so a crash never loses what was
asked of the subject or what it answered.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.store import population
from orchestrator.store.base import Repository
from orchestrator.store.errors import StoreError
from orchestrator.store.outcome import OutcomeLike, read_outcome
from orchestrator.store.records import AttemptRecord, ModelStateRecord, TrialRecord
from orchestrator.store.schema import (
    OPEN_STATUSES,
    TRIAL_STATUSES,
    ModelState,
    PopulationResponse,
    Trial,
    TrialAttempt,
)
from orchestrator.store.values import as_float, decision_fields, decision_json, json_safe, maybe_utc, utcnow

if TYPE_CHECKING:
    import numpy as np


def _trial_record(t: Trial) -> TrialRecord:
    return TrialRecord(t.id, t.session_id, t.index, t.status, t.attempts, t.stimulus, t.response, t.value, t.error,
                       t.rig_id, t.planned_at, t.dispatched_at, t.presented_at, t.responded_at, t.recorded_at, t.timing)


class TrialRepository(Repository):
    """Reads and writes of trials, attempts, population responses and model states."""

    # -- writing ------------------------------------------------------------------------------

    def plan_trial(self, session_id: str, index: int, decision: Any) -> int:
        """Write the ``planned`` trial row (before dispatch) and the decision that chose it."""
        fields = decision_fields(decision)
        if not isinstance(fields.get("stimulus"), dict):
            raise StoreError(f"decision for trial {index} has no stimulus dict")
        now = utcnow()
        with self._tx() as s:
            t = Trial(session_id=session_id, index=int(index), status="planned", stimulus=fields["stimulus"],
                      attempts=0, planned_at=now)
            s.add(t)
            s.flush()
            s.add(ModelState(trial_id=t.id, decision=decision_json(fields), decision_ms=as_float(fields["compute_ms"])))
            return t.id

    def mark_dispatched(self, trial_id: int, attempt: int, rig_id: str | None) -> None:
        """The trial was sent to a rig: bump status/attempts and open an attempt row."""
        now = utcnow()
        with self._tx() as s:
            t = self._trial(s, trial_id)
            if t.status not in OPEN_STATUSES:
                raise StoreError(f"trial {trial_id} is {t.status}; cannot dispatch it")
            self._ensure_rig(s, rig_id)
            t.status = "dispatched"
            t.attempts = max(t.attempts, int(attempt))
            t.dispatched_at = now
            t.rig_id = rig_id
            row = self._attempt(s, trial_id, attempt)
            if row is None:
                s.add(TrialAttempt(trial_id=trial_id, attempt=int(attempt), rig_id=rig_id, dispatched_at=now,
                                   status="dispatched"))
            else:
                row.rig_id, row.dispatched_at, row.status, row.error, row.finished_at = rig_id, now, "dispatched", None, None

    @staticmethod
    def _attempt(s: Session, trial_id: int, attempt: int) -> TrialAttempt | None:
        return s.scalar(select(TrialAttempt).where(TrialAttempt.trial_id == trial_id, TrialAttempt.attempt == attempt))

    def record_attempt_failure(self, trial_id: int, attempt: int, reason: str) -> None:
        """One dispatch attempt failed (rig lost, timeout); the trial goes back to ``planned``."""
        now = utcnow()
        with self._tx() as s:
            t = self._trial(s, trial_id)
            row = self._attempt(s, trial_id, attempt)
            if row is None:
                row = TrialAttempt(trial_id=trial_id, attempt=int(attempt), rig_id=t.rig_id, dispatched_at=now)
                s.add(row)
            row.status, row.error, row.finished_at = "failed", str(reason), now
            t.error = str(reason)
            t.attempts = max(t.attempts, int(attempt))
            if t.status in OPEN_STATUSES:
                t.status = "planned"

    def complete_trial(self, trial_id: int, outcome: OutcomeLike | Mapping[str, Any],
                       value: "float | np.ndarray | None", error: str | None = None) -> None:
        """Record the response: ``completed`` with its validated value, or ``invalid`` with the error.

        ``value`` is the validated scalar, or a population vector (NaN = masked unit) that goes to
        the typed ``population_responses`` table; its raw list is then not repeated in the
        response JSON. The raw response is otherwise always kept (non-finite numbers as strings).
        """
        out = read_outcome(outcome)
        packed = None
        if population.is_population(value):
            try:
                packed = population.encode(value)
            except StoreError as exc:
                value, error = None, error or str(exc)
        elif value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            value, error = None, error or f"non-finite value {value!r}"
        invalid = value is None or error is not None
        if invalid and not error:
            error = "response failed validation"
        response = dict(out.response)
        if packed is not None and not invalid:
            response.pop("value", None)
        now = utcnow()
        with self._tx() as s:
            t = self._trial(s, trial_id)
            if t.status not in OPEN_STATUSES:
                raise StoreError(f"trial {trial_id} is already {t.status}")
            self._ensure_rig(s, out.rig_id)
            attempt = int(out.attempt or t.attempts or 1)
            row = self._attempt(s, trial_id, attempt)
            if row is None:
                row = TrialAttempt(trial_id=trial_id, attempt=attempt, rig_id=out.rig_id or t.rig_id,
                                   dispatched_at=t.dispatched_at or now)
                s.add(row)
            status = "invalid" if invalid else "completed"
            row.rig_id = out.rig_id or row.rig_id
            row.status, row.error, row.finished_at = status, error, now
            row.worker_times = json_safe(out.worker) or None
            row.mapped_times = json_safe(out.mapped) or None
            t.status, t.error = status, error
            t.response = json_safe(response)
            t.value = None if invalid or packed is not None else float(value)  # type: ignore[arg-type]
            t.attempts = max(t.attempts, attempt)
            t.rig_id = out.rig_id or t.rig_id
            t.timing = out.timing or None
            t.presented_at = maybe_utc(out.mapped.get("presented_at"))
            t.responded_at = maybe_utc(out.mapped.get("responded_at"))
            t.recorded_at = now
            if packed is not None and not invalid:
                s.add(PopulationResponse(trial_id=trial_id, n_units=packed.n_units, n_masked=packed.n_masked,
                                         dtype=packed.dtype, data=packed.data))

    def fail_trial(self, trial_id: int, reason: str) -> None:
        """Give up on a trial (attempts exhausted, safety violation, ...)."""
        with self._tx() as s:
            t = self._trial(s, trial_id)
            t.status, t.error, t.recorded_at = "failed", str(reason), utcnow()

    def abandon_open_trials(self, session_id: str, reason: str = "session ended") -> int:
        """Mark every planned/dispatched trial of a session ``abandoned``; returns how many."""
        now = utcnow()
        with self._tx() as s:
            rows = s.scalars(select(Trial).where(Trial.session_id == session_id, Trial.status.in_(OPEN_STATUSES))).all()
            for t in rows:
                t.status, t.error, t.recorded_at = "abandoned", reason, now
            return len(rows)

    def record_model_state(self, trial_id: int, probabilities: Any, summaries: Any, decision: Any = None) -> None:
        """Posterior after this trial's response (probabilities, per-model summaries).

        ``decision`` (a Decision or dict) overrides the one stored by `plan_trial` if given.
        """
        now = utcnow()
        with self._tx() as s:
            self._trial(s, trial_id)
            row = s.scalar(select(ModelState).where(ModelState.trial_id == trial_id))
            if row is None:
                row = ModelState(trial_id=trial_id)
                s.add(row)
            row.probabilities = json_safe(probabilities)
            row.summaries = json_safe(summaries)
            row.recorded_at = now
            if decision is not None:
                fields = decision_fields(decision)
                row.decision = decision_json(fields)
                row.decision_ms = as_float(fields["compute_ms"])

    # -- reading ------------------------------------------------------------------------------

    def trials(self, session: str) -> list[TrialRecord]:
        """Trials of a session (id / prefix / "latest") in index order; timestamps aware UTC."""
        sid = self.resolve_session(session)  # type: ignore[attr-defined]
        with self._sessionmaker() as s:
            rows = s.scalars(select(Trial).where(Trial.session_id == sid).order_by(Trial.index, Trial.id)).all()
            return [_trial_record(t) for t in rows]

    def trial_counts(self, session_id: str) -> dict[str, int]:
        """Number of trials per status (every status present, zeros included)."""
        with self._sessionmaker() as s:
            counts = dict(
                s.execute(
                    select(Trial.status, func.count()).where(Trial.session_id == session_id).group_by(Trial.status)
                ).all()
            )
        return {k: int(counts.get(k, 0)) for k in TRIAL_STATUSES}

    def attempts(self, trial_id: int) -> int:
        """Dispatch attempts recorded so far for one trial (0 if none)."""
        with self._sessionmaker() as s:
            n = s.scalar(select(func.max(TrialAttempt.attempt)).where(TrialAttempt.trial_id == trial_id))
            t = s.get(Trial, trial_id)
            return max(int(n or 0), int(t.attempts) if t is not None else 0)

    def attempt_rows(self, session: str) -> list[AttemptRecord]:
        """Every dispatch attempt of a session's trials, in trial/attempt order."""
        sid = self.resolve_session(session)  # type: ignore[attr-defined]
        with self._sessionmaker() as s:
            rows = s.execute(
                select(Trial.index, TrialAttempt)
                .join(TrialAttempt, TrialAttempt.trial_id == Trial.id)
                .where(Trial.session_id == sid)
                .order_by(Trial.index, TrialAttempt.attempt)
            ).all()
            return [AttemptRecord(idx, a.trial_id, a.attempt, a.rig_id, a.status, a.error, a.dispatched_at,
                                  a.finished_at, a.worker_times, a.mapped_times) for idx, a in rows]

    def model_states(self, session: str) -> list[ModelStateRecord]:
        """Per-trial model probabilities, summaries and design decisions, in trial order."""
        sid = self.resolve_session(session)  # type: ignore[attr-defined]
        with self._sessionmaker() as s:
            rows = s.execute(
                select(Trial.index, Trial.id, Trial.status, ModelState)
                .join(ModelState, ModelState.trial_id == Trial.id)
                .where(Trial.session_id == sid)
                .order_by(Trial.index)
            ).all()
            return [ModelStateRecord(idx, tid, status, m.probabilities, m.summaries, m.decision, m.decision_ms,
                                     m.recorded_at) for idx, tid, status, m in rows]

    def observations(self, session_id: str) -> list[tuple[dict[str, Any], "float | np.ndarray"]]:
        """(stimulus, value) of completed trials in order: what a resumed engine replays.

        A population trial's value is its stored vector (NaN = masked unit).
        """
        with self._sessionmaker() as s:
            rows = s.execute(
                select(Trial.stimulus, Trial.value, PopulationResponse.data, PopulationResponse.dtype)
                .outerjoin(PopulationResponse, PopulationResponse.trial_id == Trial.id)
                .where(Trial.session_id == session_id, Trial.status == "completed")
                .order_by(Trial.index)
            ).all()
            return [(stim, population.decode(data, dtype) if data is not None else float(v))
                    for stim, v, data, dtype in rows]

    def population_responses(self, session: str) -> tuple[list[int], "np.ndarray"]:
        """(trial ids, trials x units float64 array) of a session's stored population responses.

        Rows follow trial order; a unit that is masked (NaN) in one trial stays NaN there.
        """
        import numpy as np

        sid = self.resolve_session(session)  # type: ignore[attr-defined]
        with self._sessionmaker() as s:
            rows = s.execute(
                select(Trial.id, PopulationResponse.n_units, PopulationResponse.dtype, PopulationResponse.data)
                .join(PopulationResponse, PopulationResponse.trial_id == Trial.id)
                .where(Trial.session_id == sid)
                .order_by(Trial.index)
            ).all()
        if not rows:
            return [], np.empty((0, 0), dtype=np.float64)
        widths = {int(n) for _, n, _, _ in rows}
        if len(widths) > 1:
            raise StoreError(f"session {sid} has population responses of different sizes {sorted(widths)}")
        out = np.empty((len(rows), widths.pop()), dtype=np.float64)
        for i, (_, _, dtype, data) in enumerate(rows):
            out[i] = population.decode(data, dtype)
        return [int(r[0]) for r in rows], out

    def open_trials(self, session_id: str) -> list[TrialRecord]:
        """Planned or dispatched trials of a session (to redispatch on resume)."""
        with self._sessionmaker() as s:
            rows = s.scalars(
                select(Trial).where(Trial.session_id == session_id, Trial.status.in_(OPEN_STATUSES)).order_by(Trial.index)
            ).all()
            return [_trial_record(t) for t in rows]

    def next_index(self, session_id: str) -> int:
        """The index the next planned trial should get."""
        with self._sessionmaker() as s:
            top = s.scalar(select(func.max(Trial.index)).where(Trial.session_id == session_id))
            return 0 if top is None else int(top) + 1
