"""The one table of legal session-status changes.

Every status write (`TrialStore.set_session_status`, `TrialStore.transition_status`) is checked
against it, so a finished session can never be reopened and a typo'd state never reaches the
database. Setting a session to the status it already has is always allowed (idempotent writes).
"""
from __future__ import annotations

from orchestrator.store.errors import IllegalTransition, StoreError
from orchestrator.store.schema import SESSION_STATUSES, SessionStatus as S

#: A session that is running or being asked to change while it runs.
_LIVE = (S.RUNNING, S.PAUSE_REQUESTED, S.PAUSED, S.CONTINUE_REQUESTED, S.STOP_REQUESTED)
#: States a later `cloop resume` (or `cloop stop`) starts from.
_RESUMABLE = (S.INTERRUPTED, S.NO_RIG, S.FAILED)
#: Closed records.
FINISHED = frozenset({S.COMPLETED.value, S.STOPPED.value, S.ABANDONED.value})

_ENDINGS = (S.COMPLETED, S.STOPPED, S.INTERRUPTED, S.FAILED)

LEGAL_TRANSITIONS: dict[str, frozenset[str]] = {
    status.value: frozenset(t.value for t in targets)
    for status, targets in {
        S.CREATED: (S.WAITING_FOR_RIG, S.RUNNING, S.NO_RIG, S.ABANDONED, *_ENDINGS, S.STOP_REQUESTED),
        S.WAITING_FOR_RIG: (S.RUNNING, S.NO_RIG, S.STOP_REQUESTED, S.PAUSE_REQUESTED, *_ENDINGS),
        S.RUNNING: (S.WAITING_FOR_RIG, S.PAUSE_REQUESTED, S.PAUSED, S.STOP_REQUESTED, *_ENDINGS),
        S.PAUSE_REQUESTED: (S.WAITING_FOR_RIG, S.RUNNING, S.PAUSED, S.CONTINUE_REQUESTED, S.STOP_REQUESTED,
                            *_ENDINGS),
        S.PAUSED: (S.WAITING_FOR_RIG, S.CONTINUE_REQUESTED, S.STOP_REQUESTED, *_ENDINGS),
        S.CONTINUE_REQUESTED: (S.WAITING_FOR_RIG, S.RUNNING, S.PAUSE_REQUESTED, S.PAUSED, S.STOP_REQUESTED,
                               *_ENDINGS),
        S.STOP_REQUESTED: _ENDINGS,
        S.INTERRUPTED: (S.WAITING_FOR_RIG, S.RUNNING, S.STOPPED, S.FAILED, S.ABANDONED, S.NO_RIG),
        S.NO_RIG: (S.WAITING_FOR_RIG, S.RUNNING, S.STOPPED, S.INTERRUPTED, S.FAILED, S.ABANDONED),
        S.FAILED: (S.WAITING_FOR_RIG, S.RUNNING, S.STOPPED, S.INTERRUPTED, S.NO_RIG, S.ABANDONED),
        S.COMPLETED: (),
        S.STOPPED: (),
        S.ABANDONED: (),
    }.items()
}
assert set(LEGAL_TRANSITIONS) == set(SESSION_STATUSES), "every status needs a row"


def check_status(status: str) -> str:
    """The status as stored, or StoreError naming the legal ones."""
    value = status.value if isinstance(status, S) else str(status)
    if value not in LEGAL_TRANSITIONS:
        raise StoreError(f"session status {value!r} not one of {SESSION_STATUSES}")
    return value


def is_legal(current: str, new: str) -> bool:
    """True if a session may go from `current` to `new` (same status: always)."""
    return current == new or new in LEGAL_TRANSITIONS.get(current, frozenset())


def check_transition(current: str, new: str, session_id: str = "") -> None:
    """Raise IllegalTransition naming both states if the change is not in the table."""
    if not is_legal(current, new):
        which = f"session {session_id} " if session_id else "a session "
        raise IllegalTransition(f"{which}cannot go from {current!r} to {new!r}")


def sources_of(new: str, expected: tuple[str, ...]) -> tuple[str, ...]:
    """The `expected` states that may legally lead to `new` (a compare-and-set's guard).

    An expected state from which the change is illegal is a programming error, not a race:
    it raises instead of being silently dropped.
    """
    bad = [e for e in expected if not is_legal(check_status(e), new)]
    if bad:
        raise IllegalTransition(f"a session cannot go from {bad[0]!r} to {new!r}")
    return tuple(expected)
