"""The trial database: schema, Alembic lifecycle, typed repositories and the session lease.

Every trial row is written *before* it is dispatched (status ``planned``) and completed after
the response arrives, so a crash never loses what was asked of the subject. The schema is made
and upgraded only by Alembic (`upgrade(url)` / ``cloop db upgrade``); `TrialStore` refuses a
database that is not at the head revision instead of silently creating tables.

Modules: `schema` (tables, status enums), `database` (URLs, engines, migrations), `transitions`
(the legal session-status changes), `records` (what reads return), `sessions` / `trials` /
`lease` (the repositories), `population` (vector responses), `values` (UTC and JSON conversions).
"""
from __future__ import annotations

from orchestrator.store.database import (
    DEFAULT_URL,
    alembic_config,
    alembic_dir,
    current_revision,
    display_url,
    downgrade,
    head_revision,
    is_sqlite,
    make_engine,
    normalize_url,
    resolve_url,
    sqlite_path,
    upgrade,
)
from orchestrator.store.errors import (
    IllegalTransition,
    LeaseHeld,
    LeaseLost,
    SchemaError,
    SessionNotFound,
    StoreError,
)
from orchestrator.store.lease import DEFAULT_TTL_S, Holder, LeaseKeeper, pid_alive
from orchestrator.store.outcome import OutcomeLike, read_outcome
from orchestrator.store.records import (
    AttemptRecord,
    LeaseRecord,
    ModelStateRecord,
    RigRecord,
    SessionRecord,
    TrialRecord,
)
from orchestrator.store.schema import (
    ATTEMPT_STATUSES,
    OPEN_STATUSES,
    SESSION_STATUSES,
    SUBJECT_NAME_MAX,
    TRIAL_STATUSES,
    AttemptStatus,
    Base,
    ModelState,
    PopulationResponse,
    ProtocolRow,
    Rig,
    SessionLease,
    SessionRow,
    SessionStatus,
    Subject,
    Trial,
    TrialAttempt,
    TrialStatus,
    UTCDateTime,
)
from orchestrator.store.sessions import check_subject_name
from orchestrator.store.transitions import FINISHED, LEGAL_TRANSITIONS, check_transition, is_legal
from orchestrator.store.trial_store import TrialStore
from orchestrator.store.values import decision_fields, iso, json_safe, to_utc, utcnow

__all__ = [
    "ATTEMPT_STATUSES", "DEFAULT_TTL_S", "DEFAULT_URL", "FINISHED", "LEGAL_TRANSITIONS", "OPEN_STATUSES",
    "SESSION_STATUSES", "SUBJECT_NAME_MAX", "TRIAL_STATUSES", "AttemptRecord", "AttemptStatus", "Base",
    "Holder", "IllegalTransition", "LeaseHeld", "LeaseKeeper", "LeaseLost", "LeaseRecord", "ModelState",
    "ModelStateRecord", "OutcomeLike", "PopulationResponse", "ProtocolRow", "Rig", "RigRecord", "SchemaError",
    "SessionLease", "SessionNotFound", "SessionRecord", "SessionRow", "SessionStatus", "StoreError", "Subject",
    "Trial", "TrialAttempt", "TrialRecord", "TrialStatus", "TrialStore", "UTCDateTime", "alembic_config",
    "alembic_dir", "check_subject_name", "check_transition", "current_revision", "decision_fields",
    "display_url", "downgrade", "head_revision", "iso", "is_legal", "is_sqlite", "json_safe", "make_engine",
    "normalize_url", "pid_alive", "read_outcome", "resolve_url", "sqlite_path", "to_utc", "upgrade", "utcnow",
]
