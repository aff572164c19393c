"""The trial database: SQLAlchemy 2.0 ORM, Alembic-managed schema and the `TrialStore` API.

Every trial row is written *before* it is dispatched (status ``planned``) and completed after
the response arrives, so a crash never loses what was asked of the subject. The schema is made
and upgraded only by Alembic (`upgrade(url)` / ``cloop db upgrade``); `TrialStore` refuses a
database that is not at the head revision instead of silently creating tables.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

DEFAULT_URL = "sqlite:///./cloop.db"
TRIAL_STATUSES = ("planned", "dispatched", "completed", "invalid", "failed", "abandoned")
OPEN_STATUSES = ("planned", "dispatched")
#: Session statuses are checked in Python only (no DB constraint), so the engine can add states
#: without a migration.
SESSION_STATUSES = ("created", "waiting_for_rig", "running", "completed", "stopped", "interrupted",
                    "no_rig", "failed", "abandoned",
                    # requests from another terminal (cloop pause|continue|stop), honoured at trial boundaries
                    "pause_requested", "paused", "continue_requested", "stop_requested")
ATTEMPT_STATUSES = ("dispatched", "completed", "invalid", "failed")


class StoreError(Exception):
    """Base class for problems the user can fix (bad URL, unknown session, old schema)."""


class SchemaError(StoreError):
    """The database is missing or not at the Alembic head revision."""


class SessionNotFound(StoreError, LookupError):
    """No session matches the given id / prefix / "latest"."""


# --------------------------------------------------------------------------------------------
# helpers


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
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    if isinstance(value, str):
        return to_utc(dt.datetime.fromisoformat(value))
    if hasattr(value, "item"):  # numpy scalar
        return to_utc(value.item())
    raise TypeError(f"not a timestamp: {value!r}")


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


def _json_dumps(obj: Any) -> str:
    return json.dumps(json_safe(obj), allow_nan=False)


def _as_dict(obj: Any) -> dict[str, Any]:
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
        "score": _finite_or_none(get("score")),
        "compute_ms": json_safe(get("compute_ms")),
    }


def normalize_url(url: str) -> str:
    """Pick an installed PostgreSQL driver for bare ``postgresql://`` URLs (psycopg 3 here)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                return "postgresql+psycopg://" + url[len(prefix):]
            return "postgresql://" + url[len(prefix):]
    return url


def resolve_url(db: str | None = None) -> str:
    """The database URL: ``--db`` if given, else ``$CLOOP_DB``, else ``sqlite:///./cloop.db``."""
    url = db or os.environ.get("CLOOP_DB") or DEFAULT_URL
    url = normalize_url(url.strip())
    try:
        make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"invalid database URL {url!r}: {exc}") from None
    return url


def display_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


# --------------------------------------------------------------------------------------------
# ORM


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


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime()}


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


class Subject(Base):
    __tablename__ = "subjects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
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
    status: Mapped[str] = mapped_column(String(20), default="created")
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
    status: Mapped[str] = mapped_column(String(20), default="planned")
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
    status: Mapped[str] = mapped_column(String(20), default="dispatched")
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


# --------------------------------------------------------------------------------------------
# engine + migrations


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory databases."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    database = u.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return None
    if database.startswith("file:"):
        database = database[5:].split("?", 1)[0]
    return Path(database)


def make_engine(url: str) -> Engine:
    """Create an Engine; SQLite connections get WAL, foreign keys and a busy timeout."""
    url = normalize_url(url)
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "future": True}
    engine = create_engine(url, **kwargs)
    if _is_sqlite(url):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no branch
            cur = dbapi_conn.cursor()
            if _sqlite_path(url) is not None:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    return engine


def alembic_dir() -> Path:
    """The Alembic script directory, from a wheel or a source checkout."""
    from orchestrator.resources import alembic_dir as shipped_alembic_dir

    return shipped_alembic_dir()


def alembic_config(url: str, connection: Any = None) -> Any:
    """An Alembic Config built in code (no alembic.ini): script location + URL/connection."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    cfg.attributes["url"] = normalize_url(url)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest migration id in ``alembic/versions``."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(DEFAULT_URL)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is stamped with (None if it has no alembic_version)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> str | None:
    """Create or upgrade the schema with Alembic (the only way the schema is made).

    Returns the revision the database is at afterwards.
    """
    from alembic import command

    url = resolve_url(url)
    path = _sqlite_path(url)
    if path is not None and not path.parent.exists():
        raise StoreError(f"cannot create database {path}: directory {path.parent} does not exist")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(url, conn), revision)
        return current_revision(engine)
    except OperationalError as exc:
        raise StoreError(f"cannot open database {display_url(url)}: {exc.orig}") from None
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    """Alembic downgrade (used by migration tests)."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(url, conn), revision)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------
# TrialStore


def _outcome_parts(outcome: Any) -> tuple[str | None, dict[str, Any], dict[str, Any], int | None]:
    """(rig_id, response, timing, attempt) from a transport TrialOutcome or a dict."""
    d = _as_dict(outcome)
    response = d.get("response")
    if response is None:
        response = {}
    elif not isinstance(response, dict):
        response = {"value": response}
    timing = d.get("timing") or {}
    if not isinstance(timing, dict):
        timing = _as_dict(timing)
    mapped = d.get("mapped_timing")
    if isinstance(mapped, dict):  # transport.TrialOutcome: raw worker clock + mapped copy
        timing = {"worker": dict(timing), "mapped": dict(mapped)}
        for key in ("clock_offset_s", "clock_rtt_s", "dispatched_at", "received_at", "cached"):
            if d.get(key) is not None:
                timing[key] = d[key]
    return d.get("rig_id"), response, timing, d.get("attempt")


_TIME_KEYS = ("presented_at", "responded_at")


def split_timing(timing: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a timing dict into (raw worker times, times mapped to the orchestrator clock).

    Understands ``{"worker": {...}, "mapped": {...}}`` as well as flat dicts whose
    orchestrator-clock keys are ``presented_at``/``responded_at`` and whose raw keys are
    prefixed ``worker_`` (or live under ``raw``).
    """
    worker = timing.get("worker") or timing.get("raw") or {}
    mapped = timing.get("mapped") or timing.get("orchestrator") or {}
    if not isinstance(worker, dict):
        worker = {}
    if not isinstance(mapped, dict):
        mapped = {}
    explicit = bool(mapped)
    worker = dict(worker)
    mapped = dict(mapped)
    for key, val in timing.items():
        if explicit:  # nested form: flat keys (clock offset, rtt, ...) stay only in trials.timing
            break
        if isinstance(val, dict):
            continue
        if key.startswith("worker_"):
            worker.setdefault(key[len("worker_"):], val)
        elif key.endswith("_at") or key in ("offset_s", "rtt_s", "clock_offset_s"):
            mapped.setdefault(key, val)
    if not mapped and worker:  # nothing mapped: the worker times are the best we have
        mapped = {k: v for k, v in worker.items() if k in _TIME_KEYS}
    return worker, mapped


def _trial_dict(t: Trial) -> dict[str, Any]:
    return {
        "id": t.id,
        "session_id": t.session_id,
        "index": t.index,
        "status": t.status,
        "attempts": t.attempts,
        "stimulus": t.stimulus,
        "response": t.response,
        "value": t.value,
        "error": t.error,
        "rig_id": t.rig_id,
        "planned_at": t.planned_at,
        "dispatched_at": t.dispatched_at,
        "presented_at": t.presented_at,
        "responded_at": t.responded_at,
        "recorded_at": t.recorded_at,
        "timing": t.timing,
    }


class TrialStore:
    """All reads and writes of experiment data go through here (one short transaction each)."""

    def __init__(self, url: str | None = None, *, auto_upgrade: bool = False) -> None:
        self.url = resolve_url(url)
        path = _sqlite_path(self.url)
        if auto_upgrade:
            upgrade(self.url)
        elif path is not None and not path.exists():
            raise SchemaError(
                f"no database at {path}; create it with `cloop db upgrade --db {self.url}`"
            )
        self.engine = make_engine(self.url)
        try:
            current = current_revision(self.engine)
        except OperationalError as exc:
            self.engine.dispose()
            raise StoreError(f"cannot open database {display_url(self.url)}: {exc.orig}") from None
        head = head_revision()
        if current != head:
            self.engine.dispose()
            at = "has no cloop schema" if current is None else f"is at revision {current}"
            raise SchemaError(
                f"database {display_url(self.url)} {at}, expected {head}; "
                f"run `cloop db upgrade --db {display_url(self.url)}`"
            )
        self._sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    # -- plumbing ---------------------------------------------------------------------------

    def _tx(self) -> Session:
        return self._sessionmaker.begin()  # type: ignore[return-value]

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> "TrialStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @staticmethod
    def _trial(s: Session, trial_id: int) -> Trial:
        t = s.get(Trial, trial_id)
        if t is None:
            raise StoreError(f"no trial with id {trial_id}")
        return t

    @staticmethod
    def _ensure_rig(s: Session, rig_id: str | None) -> None:
        if rig_id and s.get(Rig, rig_id) is None:
            s.add(Rig(id=rig_id))
            s.flush()

    # -- protocols, subjects, rigs -----------------------------------------------------------

    def add_protocol(self, loaded: Any) -> int:
        """Store the protocol text once per content hash; return its id."""
        proto = getattr(loaded, "protocol", None)
        name = getattr(proto, "name", None) or "unknown"
        version = str(getattr(proto, "version", None) or "")
        return self._get_or_create(
            select(ProtocolRow.id).where(ProtocolRow.sha256 == loaded.sha256),
            lambda: ProtocolRow(name=name, version=version, sha256=loaded.sha256, text=loaded.text),
        )

    def subject(self, name: str) -> int:
        """Id of the subject with this name, created on first use."""
        if not name or not name.strip():
            raise StoreError("subject name must not be empty")
        return self._get_or_create(select(Subject.id).where(Subject.name == name), lambda: Subject(name=name))

    def _get_or_create(self, find: Any, make: Callable[[], Any]) -> int:
        """Id of the row `find` selects, inserting `make()` if there is none.

        Two orchestrators starting sessions at once may both miss and both insert; the unique
        constraint lets one win, and the loser reads the winner's row instead of failing.
        """
        with self._sessionmaker() as s:
            found = s.scalar(find)
            if found is not None:
                return int(found)
            row = make()
            s.add(row)
            try:
                s.commit()
                return int(row.id)
            except IntegrityError:
                s.rollback()
            found = s.scalar(find)
            if found is None:
                raise StoreError("row vanished right after a concurrent insert")
            return int(found)

    def upsert_rig(self, info: Any) -> None:
        """Record a rig (from its `hello`): adapters, capabilities, software version, last seen."""
        d = _as_dict(info)
        rig_id = d.get("rig_id") or d.get("id")
        if not rig_id:
            raise StoreError("rig info has no rig_id")
        now = utcnow()
        with self._tx() as s:
            row = s.get(Rig, rig_id)
            if row is None:
                row = Rig(id=rig_id, first_seen=now)
                s.add(row)
            row.adapters = json_safe(d.get("adapters"))
            row.capabilities = json_safe(d.get("capabilities"))
            row.software_version = d.get("software_version")
            row.info = json_safe(d)
            row.last_seen = now

    # -- sessions ---------------------------------------------------------------------------

    def create_session(
        self,
        *,
        protocol_id: int,
        subject_id: int | None,
        seed: int,
        bind: str | None = None,
        design: Any = None,
        code_version: str | None = None,
        status: str = "running",
        meta: Any = None,
        session_id: str | None = None,
    ) -> str:
        """Insert a session row and return its uuid4 hex id."""
        if status not in SESSION_STATUSES:
            raise StoreError(f"session status {status!r} not one of {SESSION_STATUSES}")
        sid = session_id or uuid.uuid4().hex
        with self._tx() as s:
            s.add(
                SessionRow(
                    id=sid,
                    protocol_id=protocol_id,
                    subject_id=subject_id,
                    seed=int(seed),
                    bind=bind,
                    design=json_safe(design),
                    code_version=code_version,
                    status=status,
                    meta=json_safe(meta),
                    started_at=utcnow(),
                )
            )
        return sid

    def set_session_status(self, session_id: str, status: str, stopped: bool = False) -> None:
        """Change a session's status; ``stopped=True`` also stamps stopped_at."""
        if status not in SESSION_STATUSES:
            raise StoreError(f"session status {status!r} not one of {SESSION_STATUSES}")
        with self._tx() as s:
            row = s.get(SessionRow, session_id)
            if row is None:
                raise SessionNotFound(f"no session {session_id!r}")
            row.status = status
            if stopped:
                row.stopped_at = utcnow()

    def transition_status(self, session_id: str, expected: tuple[str, ...], status: str,
                          stopped: bool = False) -> bool:
        """Atomically set `status` only if the current status is one of `expected` (compare-and-set).

        Pause/continue/stop requests from other processes race with the engine's own transitions;
        a conditional UPDATE makes the winner well defined on SQLite and PostgreSQL alike.
        """
        if status not in SESSION_STATUSES:
            raise StoreError(f"session status {status!r} not one of {SESSION_STATUSES}")
        values: dict[str, Any] = {"status": status}
        if stopped:
            values["stopped_at"] = utcnow()
        with self._tx() as s:
            result = s.execute(
                update(SessionRow)
                .where(SessionRow.id == session_id, SessionRow.status.in_(expected))
                .values(**values)
            )
            return bool(result.rowcount)

    def resolve_session(self, session: str) -> str:
        """Full session id from an id, a unique id prefix, or "latest"."""
        session = (session or "").strip()
        if not session:
            raise SessionNotFound("session id must not be empty")
        with self._sessionmaker() as s:
            if session == "latest":
                sid = s.scalar(
                    select(SessionRow.id).order_by(SessionRow.started_at.desc(), SessionRow.id.desc()).limit(1)
                )
                if sid is None:
                    raise SessionNotFound("no sessions in the database yet")
                return sid
            if s.get(SessionRow, session) is not None:
                return session
            matches = list(
                s.scalars(select(SessionRow.id).where(SessionRow.id.startswith(session, autoescape=True)).limit(3))
            )
        if not matches:
            raise SessionNotFound(f"no session matches {session!r}")
        if len(matches) > 1:
            raise SessionNotFound(f"session prefix {session!r} is ambiguous ({', '.join(m[:12] for m in matches)}, ...)")
        return matches[0]

    def _session_dict(self, s: Session, row: SessionRow) -> dict[str, Any]:
        counts = dict(
            s.execute(
                select(Trial.status, func.count()).where(Trial.session_id == row.id).group_by(Trial.status)
            ).all()
        )
        return {
            "id": row.id,
            "status": row.status,
            "protocol": row.protocol.name,
            "protocol_version": row.protocol.version,
            "protocol_sha256": row.protocol.sha256,
            "protocol_id": row.protocol_id,
            "subject": row.subject.name if row.subject else None,
            "seed": row.seed,
            "started_at": row.started_at,
            "stopped_at": row.stopped_at,
            "code_version": row.code_version,
            "bind": row.bind,
            "design": row.design,
            "meta": row.meta,
            "n_trials": sum(counts.values()),
            "counts": {k: counts.get(k, 0) for k in TRIAL_STATUSES},
        }

    def sessions(self) -> list[dict[str, Any]]:
        """All sessions, oldest first, with trial counts per status."""
        with self._sessionmaker() as s:
            rows = s.scalars(select(SessionRow).order_by(SessionRow.started_at, SessionRow.id)).all()
            return [self._session_dict(s, r) for r in rows]

    def session(self, session: str) -> dict[str, Any]:
        """One session's metadata (id / prefix / "latest"), including the protocol text."""
        sid = self.resolve_session(session)
        with self._sessionmaker() as s:
            row = s.get(SessionRow, sid)
            assert row is not None
            d = self._session_dict(s, row)
            d["protocol_text"] = row.protocol.text
            return d

    # -- trials -----------------------------------------------------------------------------

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
            s.add(ModelState(trial_id=t.id, decision=_decision_json(fields), decision_ms=_float(fields["compute_ms"])))
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
            row = s.scalar(select(TrialAttempt).where(TrialAttempt.trial_id == trial_id, TrialAttempt.attempt == attempt))
            if row is None:
                s.add(TrialAttempt(trial_id=trial_id, attempt=int(attempt), rig_id=rig_id, dispatched_at=now,
                                   status="dispatched"))
            else:
                row.rig_id, row.dispatched_at, row.status, row.error, row.finished_at = rig_id, now, "dispatched", None, None

    def record_attempt_failure(self, trial_id: int, attempt: int, reason: str) -> None:
        """One dispatch attempt failed (rig lost, timeout); the trial goes back to ``planned``."""
        now = utcnow()
        with self._tx() as s:
            t = self._trial(s, trial_id)
            row = s.scalar(select(TrialAttempt).where(TrialAttempt.trial_id == trial_id, TrialAttempt.attempt == attempt))
            if row is None:
                row = TrialAttempt(trial_id=trial_id, attempt=int(attempt), rig_id=t.rig_id, dispatched_at=now)
                s.add(row)
            row.status, row.error, row.finished_at = "failed", str(reason), now
            t.error = str(reason)
            t.attempts = max(t.attempts, int(attempt))
            if t.status in OPEN_STATUSES:
                t.status = "planned"

    def complete_trial(self, trial_id: int, outcome: Any, value: float | None, error: str | None = None) -> None:
        """Record the response: ``completed`` with its validated value, or ``invalid`` with the error.

        The raw response is always kept (non-finite numbers as "NaN"/"Infinity" strings).
        """
        rig_id, response, timing, attempt_no = _outcome_parts(outcome)
        worker, mapped = split_timing(timing)
        invalid = value is None or error is not None
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            invalid, error = True, error or f"non-finite value {value!r}"
            value = None
        if invalid and not error:
            error = "response failed validation"
        now = utcnow()
        with self._tx() as s:
            t = self._trial(s, trial_id)
            if t.status not in OPEN_STATUSES:
                raise StoreError(f"trial {trial_id} is already {t.status}")
            self._ensure_rig(s, rig_id)
            attempt = int(attempt_no or t.attempts or 1)
            row = s.scalar(select(TrialAttempt).where(TrialAttempt.trial_id == trial_id, TrialAttempt.attempt == attempt))
            if row is None:
                row = TrialAttempt(trial_id=trial_id, attempt=attempt, rig_id=rig_id or t.rig_id,
                                   dispatched_at=t.dispatched_at or now)
                s.add(row)
            row.rig_id = rig_id or row.rig_id
            row.status = "invalid" if invalid else "completed"
            row.error = error
            row.finished_at = now
            row.worker_times = json_safe(worker) or None
            row.mapped_times = json_safe(mapped) or None
            t.status = "invalid" if invalid else "completed"
            t.response = json_safe(response)
            t.value = None if invalid else float(value)  # type: ignore[arg-type]
            t.error = error
            t.attempts = max(t.attempts, attempt)
            t.rig_id = rig_id or t.rig_id
            t.timing = json_safe(timing) or None
            t.presented_at = _maybe_utc(mapped.get("presented_at"))
            t.responded_at = _maybe_utc(mapped.get("responded_at"))
            t.recorded_at = now

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
                row.decision = _decision_json(fields)
                row.decision_ms = _float(fields["compute_ms"])

    # -- reading ----------------------------------------------------------------------------

    def trials(self, session: str) -> list[dict[str, Any]]:
        """Trials of a session (id / prefix / "latest") in index order; timestamps aware UTC."""
        sid = self.resolve_session(session)
        with self._sessionmaker() as s:
            rows = s.scalars(select(Trial).where(Trial.session_id == sid).order_by(Trial.index, Trial.id)).all()
            return [_trial_dict(t) for t in rows]

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

    def attempt_rows(self, session: str) -> list[dict[str, Any]]:
        """Every dispatch attempt of a session's trials, in trial/attempt order."""
        sid = self.resolve_session(session)
        with self._sessionmaker() as s:
            rows = s.execute(
                select(Trial.index, TrialAttempt)
                .join(TrialAttempt, TrialAttempt.trial_id == Trial.id)
                .where(Trial.session_id == sid)
                .order_by(Trial.index, TrialAttempt.attempt)
            ).all()
            return [
                {"index": idx, "trial_id": a.trial_id, "attempt": a.attempt, "rig_id": a.rig_id,
                 "status": a.status, "error": a.error, "dispatched_at": a.dispatched_at,
                 "finished_at": a.finished_at, "worker_times": a.worker_times, "mapped_times": a.mapped_times}
                for idx, a in rows
            ]

    def model_states(self, session: str) -> list[dict[str, Any]]:
        """Per-trial model probabilities, summaries and design decisions, in trial order."""
        sid = self.resolve_session(session)
        with self._sessionmaker() as s:
            rows = s.execute(
                select(Trial.index, Trial.id, Trial.status, ModelState)
                .join(ModelState, ModelState.trial_id == Trial.id)
                .where(Trial.session_id == sid)
                .order_by(Trial.index)
            ).all()
            return [
                {"index": idx, "trial_id": tid, "status": status, "probabilities": m.probabilities,
                 "summaries": m.summaries, "decision": m.decision, "decision_ms": m.decision_ms,
                 "recorded_at": m.recorded_at}
                for idx, tid, status, m in rows
            ]

    def observations(self, session_id: str) -> list[tuple[dict[str, Any], float]]:
        """(stimulus, value) of completed trials in order: what a resumed engine replays."""
        with self._sessionmaker() as s:
            rows = s.execute(
                select(Trial.stimulus, Trial.value)
                .where(Trial.session_id == session_id, Trial.status == "completed")
                .order_by(Trial.index)
            ).all()
            return [(stim, float(v)) for stim, v in rows]

    def open_trials(self, session_id: str) -> list[dict[str, Any]]:
        """Planned or dispatched trials of a session (to redispatch on resume)."""
        with self._sessionmaker() as s:
            rows = s.scalars(
                select(Trial).where(Trial.session_id == session_id, Trial.status.in_(OPEN_STATUSES)).order_by(Trial.index)
            ).all()
            return [_trial_dict(t) for t in rows]

    def next_index(self, session_id: str) -> int:
        """The index the next planned trial should get."""
        with self._sessionmaker() as s:
            top = s.scalar(select(func.max(Trial.index)).where(Trial.session_id == session_id))
            return 0 if top is None else int(top) + 1

    def rigs(self) -> list[dict[str, Any]]:
        """Known rigs."""
        with self._sessionmaker() as s:
            return [
                {"id": r.id, "adapters": r.adapters, "capabilities": r.capabilities,
                 "software_version": r.software_version, "first_seen": r.first_seen, "last_seen": r.last_seen}
                for r in s.scalars(select(Rig).order_by(Rig.id))
            ]

    def iter_sessions_ids(self) -> Iterator[str]:
        """Session ids, oldest first."""
        with self._sessionmaker() as s:
            yield from s.scalars(select(SessionRow.id).order_by(SessionRow.started_at, SessionRow.id)).all()


def _decision_json(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: fields.get(k) for k in ("stimulus", "strategy", "reason", "score")}


def _finite_or_none(v: Any) -> float | None:
    f = _float(v)
    return f if f is not None and math.isfinite(f) else None


def _float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _maybe_utc(v: Any) -> dt.datetime | None:
    try:
        return to_utc(v)
    except (TypeError, ValueError):
        return None
