"""The ORM schema of the trial database and the status vocabularies of its rows.

The tables are made only by Alembic (alembic/versions); this module is what the migrations were
generated from and what the repositories query. Trial and attempt statuses are checked by the
database; session statuses are checked in Python against `transitions.LEGAL_TRANSITIONS`, so a new
state needs no migration.
"""
from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from orchestrator.store.values import to_utc, utcnow


class TrialStatus(str, enum.Enum):
    """Where a trial is in its life: planned before dispatch, then exactly one final state."""

    PLANNED = "planned"
    DISPATCHED = "dispatched"
    COMPLETED = "completed"
    INVALID = "invalid"
    FAILED = "failed"
    ABANDONED = "abandoned"


class AttemptStatus(str, enum.Enum):
    """One dispatch of a trial to a rig."""

    DISPATCHED = "dispatched"
    COMPLETED = "completed"
    INVALID = "invalid"
    FAILED = "failed"


class SessionStatus(str, enum.Enum):
    """A session's state; requests from another terminal (pause/continue/stop) are states too."""

    CREATED = "created"
    WAITING_FOR_RIG = "waiting_for_rig"
    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    INTERRUPTED = "interrupted"
    NO_RIG = "no_rig"
    FAILED = "failed"
    ABANDONED = "abandoned"
    PAUSE_REQUESTED = "pause_requested"
    PAUSED = "paused"
    CONTINUE_REQUESTED = "continue_requested"
    STOP_REQUESTED = "stop_requested"


TRIAL_STATUSES = tuple(s.value for s in TrialStatus)
OPEN_STATUSES = (TrialStatus.PLANNED.value, TrialStatus.DISPATCHED.value)
SESSION_STATUSES = tuple(s.value for s in SessionStatus)
ATTEMPT_STATUSES = tuple(s.value for s in AttemptStatus)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """``DateTime(timezone=True)`` that always binds and returns aware UTC datetimes.

    SQLite stores no offset, so values are converted to UTC before writing and re-tagged as
    UTC on read; PostgreSQL's timestamptz round-trips natively.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> dt.datetime | None:
        return to_utc(value)

    def process_result_value(self, value: Any, dialect: Any) -> dt.datetime | None:
        return to_utc(value)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Longest subject name the schema holds (checked before any write, so PostgreSQL never truncates).
SUBJECT_NAME_MAX = 200


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime()}


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class Subject(Base):
    __tablename__ = "subjects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(SUBJECT_NAME_MAX), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ProtocolRow(Base):
    __tablename__ = "protocols"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(50))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Rig(Base):
    __tablename__ = "rigs"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    adapters: Mapped[Any | None] = mapped_column(JSON)
    capabilities: Mapped[Any | None] = mapped_column(JSON)
    software_version: Mapped[str | None] = mapped_column(String(100))
    info: Mapped[Any | None] = mapped_column(JSON)
    first_seen: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(default=utcnow)


class SessionRow(Base):
    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    protocol_id: Mapped[int] = mapped_column(ForeignKey("protocols.id"), index=True)
    subject_id: Mapped[int | None] = mapped_column(ForeignKey("subjects.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), default=SessionStatus.CREATED.value)
    seed: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    stopped_at: Mapped[dt.datetime | None]
    code_version: Mapped[str | None] = mapped_column(String(100))
    bind: Mapped[str | None] = mapped_column(String(200))
    design: Mapped[Any | None] = mapped_column(JSON)
    meta: Mapped[Any | None] = mapped_column(JSON)

    protocol: Mapped[ProtocolRow] = relationship()
    subject: Mapped[Subject | None] = relationship()


class Trial(Base):
    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("session_id", "index", name="uq_trials_session_index"),
        CheckConstraint(f"status IN ({_in(TRIAL_STATUSES)})", name="status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=TrialStatus.PLANNED.value)
    stimulus: Mapped[Any] = mapped_column(JSON)
    response: Mapped[Any | None] = mapped_column(JSON)
    value: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    rig_id: Mapped[str | None] = mapped_column(ForeignKey("rigs.id"))
    timing: Mapped[Any | None] = mapped_column(JSON)
    planned_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    dispatched_at: Mapped[dt.datetime | None]
    presented_at: Mapped[dt.datetime | None]
    responded_at: Mapped[dt.datetime | None]
    recorded_at: Mapped[dt.datetime | None]


class TrialAttempt(Base):
    __tablename__ = "trial_attempts"
    __table_args__ = (
        UniqueConstraint("trial_id", "attempt", name="uq_trial_attempts_trial_attempt"),
        CheckConstraint(f"status IN ({_in(ATTEMPT_STATUSES)})", name="status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    rig_id: Mapped[str | None] = mapped_column(ForeignKey("rigs.id"))
    status: Mapped[str] = mapped_column(String(20), default=AttemptStatus.DISPATCHED.value)
    error: Mapped[str | None] = mapped_column(Text)
    dispatched_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    worker_times: Mapped[Any | None] = mapped_column(JSON)  # raw, worker clock
    mapped_times: Mapped[Any | None] = mapped_column(JSON)  # mapped to the orchestrator clock


class ModelState(Base):
    __tablename__ = "model_states"
    id: Mapped[int] = mapped_column(primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), unique=True)
    probabilities: Mapped[Any | None] = mapped_column(JSON)
    summaries: Mapped[Any | None] = mapped_column(JSON)
    decision: Mapped[Any | None] = mapped_column(JSON)
    decision_ms: Mapped[float | None] = mapped_column(Float)
    recorded_at: Mapped[dt.datetime | None]


class SessionLease(Base):
    """Which orchestrator process runs a session (one row per session; holder NULL = free)."""

    __tablename__ = "session_leases"
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(300))
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    acquired_at: Mapped[dt.datetime | None]
    renewed_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]


class PopulationResponse(Base):
    """A trial's population response: one little-endian float array, NaN for masked units."""

    __tablename__ = "population_responses"
    __table_args__ = (CheckConstraint("dtype IN ('float32', 'float64')", name="dtype"),)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"), primary_key=True)
    n_units: Mapped[int] = mapped_column(Integer)
    n_masked: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(8))
    data: Mapped[bytes] = mapped_column(LargeBinary)
