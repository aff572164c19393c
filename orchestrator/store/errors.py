"""The store's exceptions: each one is a problem the user can act on, with a one-line message."""
from __future__ import annotations


class StoreError(Exception):
    """Base class for problems the user can fix (bad URL, unknown session, old schema)."""


class SchemaError(StoreError):
    """The database is missing or not at the Alembic head revision."""


class SessionNotFound(StoreError, LookupError):
    """No session matches the given id / prefix / "latest"."""


class IllegalTransition(StoreError):
    """A session status change that `transitions.LEGAL_TRANSITIONS` does not allow."""


class LeaseHeld(StoreError):
    """Another live orchestrator holds the session's lease."""

    def __init__(self, session_id: str, holder: str, expires_in_s: float | None) -> None:
        self.session_id = session_id
        self.holder = holder
        self.expires_in_s = expires_in_s
        super().__init__(f"session {session_id} is being run by another orchestrator ({holder}); "
                         f"stop that one first")


class LeaseLost(StoreError):
    """This process's lease was taken over (it stalled past its TTL) or released elsewhere."""
