"""Sessions, the protocols and subjects they reference, and the rigs that ran them."""
from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from orchestrator.store.base import Repository
from orchestrator.store.errors import SessionNotFound, StoreError
from orchestrator.store.records import RigRecord, SessionRecord
from orchestrator.store.schema import SUBJECT_NAME_MAX, TRIAL_STATUSES, ProtocolRow, Rig, SessionRow, Subject, Trial
from orchestrator.store.transitions import check_status, check_transition, sources_of
from orchestrator.store.values import as_dict, json_safe, utcnow


def check_subject_name(name: str) -> str:
    """The subject name as stored, or StoreError naming the limit (checked before any write)."""
    if not name or not name.strip():
        raise StoreError("subject name must not be empty")
    if len(name) > SUBJECT_NAME_MAX:
        raise StoreError(f"subject name is {len(name)} characters long; at most {SUBJECT_NAME_MAX} are allowed")
    return name


class SessionRepository(Repository):
    """Reads and writes of sessions, protocols, subjects and rigs."""

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
        check_subject_name(name)
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
        d = as_dict(info)
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

    def rig_keys(self) -> dict[str, str]:
        """Rig id -> the allow-list key name that first registered it, so the binding outlives a restart."""
        with self._sessionmaker() as s:
            return {r.id: r.info["key_name"] for r in s.scalars(select(Rig))
                    if isinstance(r.info, dict) and isinstance(r.info.get("key_name"), str)}

    def rigs(self) -> list[RigRecord]:
        """Known rigs."""
        with self._sessionmaker() as s:
            return [RigRecord(r.id, r.adapters, r.capabilities, r.software_version, r.first_seen, r.last_seen)
                    for r in s.scalars(select(Rig).order_by(Rig.id))]

    # -- session status -----------------------------------------------------------------------

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
        status = check_status(status)
        sid = session_id or uuid.uuid4().hex
        with self._tx() as s:
            s.add(SessionRow(id=sid, protocol_id=protocol_id, subject_id=subject_id, seed=int(seed), bind=bind,
                             design=json_safe(design), code_version=code_version, status=status,
                             meta=json_safe(meta), started_at=utcnow()))
        return sid

    def set_session_status(self, session_id: str, status: str, stopped: bool = False) -> None:
        """Change a session's status (checked against the transition table); ``stopped`` stamps stopped_at."""
        status = check_status(status)
        with self._tx() as s:
            row = s.get(SessionRow, session_id)
            if row is None:
                raise SessionNotFound(f"no session {session_id!r}")
            check_transition(row.status, status, session_id)
            row.status = status
            if stopped:
                row.stopped_at = utcnow()

    def transition_status(self, session_id: str, expected: tuple[str, ...], status: str,
                          stopped: bool = False) -> bool:
        """Atomically set `status` only if the current status is one of `expected` (compare-and-set).

        Pause/continue/stop requests from other processes race with the engine's own transitions;
        a conditional UPDATE makes the winner well defined on SQLite and PostgreSQL alike. Every
        expected state must legally lead to `status` (the transition table).
        """
        status = check_status(status)
        guard = sources_of(status, tuple(expected))
        values: dict[str, Any] = {"status": status}
        if stopped:
            values["stopped_at"] = utcnow()
        with self._tx() as s:
            result = s.execute(
                update(SessionRow).where(SessionRow.id == session_id, SessionRow.status.in_(guard)).values(**values)
            )
            return bool(result.rowcount)

    # -- reading sessions ---------------------------------------------------------------------

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

    def _session_record(self, s: Session, row: SessionRow, with_text: bool = False) -> SessionRecord:
        counts = dict(
            s.execute(
                select(Trial.status, func.count()).where(Trial.session_id == row.id).group_by(Trial.status)
            ).all()
        )
        return SessionRecord(
            id=row.id, status=row.status, protocol=row.protocol.name, protocol_version=row.protocol.version,
            protocol_sha256=row.protocol.sha256, protocol_id=row.protocol_id,
            subject=row.subject.name if row.subject else None, seed=row.seed, started_at=row.started_at,
            stopped_at=row.stopped_at, code_version=row.code_version, bind=row.bind, design=row.design,
            meta=row.meta, n_trials=sum(counts.values()), counts={k: counts.get(k, 0) for k in TRIAL_STATUSES},
            protocol_text=row.protocol.text if with_text else None,
        )

    def sessions(self) -> list[SessionRecord]:
        """All sessions, oldest first, with trial counts per status."""
        with self._sessionmaker() as s:
            rows = s.scalars(select(SessionRow).order_by(SessionRow.started_at, SessionRow.id)).all()
            return [self._session_record(s, r) for r in rows]

    def session(self, session: str) -> SessionRecord:
        """One session's metadata (id / prefix / "latest"), including the protocol text."""
        sid = self.resolve_session(session)
        with self._sessionmaker() as s:
            row = s.get(SessionRow, sid)
            assert row is not None
            return self._session_record(s, row, with_text=True)

    def iter_sessions_ids(self) -> Iterator[str]:
        """Session ids, oldest first."""
        with self._sessionmaker() as s:
            yield from s.scalars(select(SessionRow.id).order_by(SessionRow.started_at, SessionRow.id)).all()
