"""`TrialStore`: the one object through which experiment data is read and written.

It opens the database, refuses one that is not at the Alembic head revision, and combines the
repositories (sessions, trials, leases); each call is one short transaction.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from orchestrator.store.database import (
    current_revision,
    display_url,
    head_revision,
    make_engine,
    resolve_url,
    sqlite_path,
    upgrade,
)
from orchestrator.store.errors import SchemaError, StoreError
from orchestrator.store.lease import LeaseRepository
from orchestrator.store.sessions import SessionRepository
from orchestrator.store.trials import TrialRepository


class TrialStore(SessionRepository, TrialRepository, LeaseRepository):
    """All reads and writes of experiment data go through here (one short transaction each)."""

    def __init__(self, url: str | None = None, *, auto_upgrade: bool = False) -> None:
        self.url = resolve_url(url)
        path = sqlite_path(self.url)
        if auto_upgrade:
            upgrade(self.url)
        elif path is not None and not path.exists():
            raise SchemaError(f"no database at {path}; create it with `cloop db upgrade --db {self.url}`")
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

    def close(self) -> None:
        """Release pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> "TrialStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
