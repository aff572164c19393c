"""What every repository shares: one sessionmaker, one short transaction per call."""
from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.store.errors import StoreError
from orchestrator.store.schema import Rig, Trial


class Repository:
    """Plumbing for the repositories `TrialStore` is made of."""

    url: str
    engine: Engine
    _sessionmaker: sessionmaker[Session]

    def _tx(self) -> Session:
        """A session inside a transaction that commits on exit (rolls back on error)."""
        return self._sessionmaker.begin()  # type: ignore[return-value]

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
