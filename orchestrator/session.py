"""A session's life around the closed loop: register it, open the rig server, wait for rigs, run, close.

Shared by the Prefect flow (orchestrator.flows), `cloop run` without Prefect, and `cloop demo`, so
all three behave the same. The engine itself (orchestrator.engine) knows nothing of sockets or flows.
"""

from __future__ import annotations

import logging
import secrets
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Protocol as TypingProtocol

from orchestrator import code_version
from orchestrator.engine import SessionControl, SessionResult, TrialReport, run_session
from orchestrator.control import SessionController
from orchestrator.protocol import LoadedProtocol, parse_protocol_text
from orchestrator.store import LeaseKeeper, LeaseLost, TrialStore, check_subject_name, is_legal, upgrade

log = logging.getLogger("cloop.session")

#: Seconds a session's lease outlives its last renewal (renewed every third of it); a killed
#: orchestrator's lease is free at once on the same host, after this long from another one.
LEASE_TTL_S = 15.0


class SessionObserver(TypingProtocol):
    """Watches a session in this process (live progress, the demo starting its rig)."""

    def waiting(self, endpoint: str, message: str) -> None: ...

    def trial(self, report: TrialReport) -> None: ...


_observers: list[SessionObserver] = []


@contextmanager
def observing(observer: SessionObserver) -> Iterator[None]:
    """Attach an observer to every session run in this process, also inside a Prefect flow."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


class NoRigError(RuntimeError):
    """No rig with the required capabilities connected in time."""


@dataclass(frozen=True)
class SessionRequest:
    """Everything `cloop run` was asked; stored with the session so it can be resumed as it was."""

    protocol_path: str
    db_url: str
    bind: str = "tcp://127.0.0.1:5555"
    subject: str = "anonymous"
    seed: int | None = None
    max_trials: int | None = None
    design: str | None = None
    keys_dir: str | None = None
    insecure: bool = False
    wait_for_rig_s: float | None = None


def _waiting_note(message: str) -> None:
    """The rig server's waiting notes: the first is what the observers already printed, later ones news."""
    log.log(logging.DEBUG if message.startswith("waiting up to") else logging.INFO, message)


def new_seed() -> int:
    """A fresh 31-bit seed; recorded with the session so the session can be reproduced."""
    return secrets.randbelow(2**31 - 1)


def register_session(request: SessionRequest, loaded: LoadedProtocol) -> tuple[str, int]:
    """Migrate the database, store protocol/subject/session rows; return (session id, seed)."""
    check_subject_name(request.subject)  # before anything is written (the column holds 200 characters)
    upgrade(request.db_url)
    store = TrialStore(request.db_url)
    try:
        seed = request.seed if request.seed is not None else new_seed()
        protocol_id = store.add_protocol(loaded)
        subject_id = store.subject(request.subject)
        session_id = store.create_session(
            protocol_id=protocol_id,
            subject_id=subject_id,
            seed=seed,
            bind=request.bind,
            design=request.design or loaded.protocol.design.strategy,
            code_version=code_version(),
            status="created",  # "running" only once the engine runs it
            meta={"request": asdict(request)},
        )
        return session_id, seed
    finally:
        store.close()


def request_for_resume(db_url: str, session: str, **overrides: object) -> tuple[SessionRequest, str, int]:
    """Rebuild the SessionRequest a session was started with (same bind, seed, design); apply overrides."""
    store = TrialStore(db_url)
    try:
        row = store.session(session)
    finally:
        store.close()
    stored = dict((row.meta or {}).get("request") or {})
    stored.update(db_url=db_url, seed=row.seed)
    stored.update({k: v for k, v in overrides.items() if v is not None})
    known = set(SessionRequest.__dataclass_fields__)
    request = SessionRequest(**{k: v for k, v in stored.items() if k in known})
    return request, row.id, int(row.seed)


def execute_session(
    request: SessionRequest,
    session_id: str,
    seed: int,
    *,
    loaded: LoadedProtocol | None = None,
    on_waiting: Callable[[str], None] | None = None,
    on_trial: Callable[[TrialReport], None] | None = None,
    control: SessionControl | None = None,
) -> SessionResult:
    """Open the rig server, wait for the rigs the protocol needs, and run the loop to its end."""
    import torch

    # One intra-op thread: decisions are small tensor ops, and the rig socket's I/O thread must not
    # starve behind torch's worker pool on a 2-core orchestrator PC (3-10x slower decisions measured).
    torch.set_num_threads(1)
    from orchestrator.transport import NoRigError as TransportNoRig
    from orchestrator.transport import RigServer

    store = TrialStore(request.db_url)
    # The session runs the protocol text stored when it was registered, never a file edited since.
    # It was checked in full when registered, so only the schema is read here.
    loaded = loaded or parse_protocol_text(store.session(session_id).protocol_text, source=request.protocol_path,
                                           checks=())
    protocol = loaded.protocol
    lease = LeaseKeeper(store, session_id, ttl_s=LEASE_TTL_S)
    try:
        lease.acquire()  # LeaseHeld: another live orchestrator runs this session; nothing is written
    except BaseException:
        store.close()
        raise
    controller = control or SessionController(store).install_sigint()
    timeout = request.wait_for_rig_s if request.wait_for_rig_s is not None else protocol.rig.wait_for_rig_s
    bound = False  # until the rig address is ours, a failure says nothing about this session's state
    try:
        # A rig id stays bound to the key that first registered it; the rigs table records the binding.
        with RigServer(request.bind, keys_dir=request.keys_dir, insecure=request.insecure,
                       rig_keys=store.rig_keys(),
                       on_rig_bound=lambda info: store.upsert_rig(info.as_dict())) as rigs:
            bound = True
            rigs.set_session(session_id, loaded.text)
            message = (
                f"waiting up to {timeout:g} s for {protocol.rig.count} rig(s) with any of "
                f"capabilities {protocol.rig.capabilities} on {rigs.endpoint} "
                f"(start one with: cloop rig --connect {rigs.endpoint} --adapter ...)"
            )
            log.debug(message)
            if on_waiting is not None:
                on_waiting(message)
            for observer in list(_observers):
                observer.waiting(rigs.endpoint, message)
            # Only once the address is ours (a live orchestrator of this session would hold it): a stop
            # requested before a crash is kept for the engine to honour; a pause is dropped, since
            # starting or resuming the session means "run".
            store.transition_status(session_id, ("created", "running", "interrupted", "no_rig", "failed", "paused",
                                                 "pause_requested", "continue_requested"), "waiting_for_rig")
            try:
                # The observers print the waiting line; the rig server's own narration of it is detail.
                found = rigs.wait_for_rigs(protocol.rig.capabilities, protocol.rig.count, timeout,
                                           progress=_waiting_note)
            except TransportNoRig as exc:
                store.set_session_status(session_id, "no_rig", stopped=True)
                raise NoRigError(f"no rig ready: {exc} Session {session_id} was not started.") from exc
            for rig in found:
                store.upsert_rig(rig.as_dict())
            def notify(report: TrialReport) -> None:
                lease.check()  # a trial boundary: stop at once if another orchestrator took over
                if on_trial is not None:
                    on_trial(report)
                for observer in list(_observers):
                    observer.trial(report)

            return run_session(
                loaded,
                store=store,
                rigs=rigs,
                session_id=session_id,
                seed=seed,
                max_trials=request.max_trials,
                design_override=request.design,
                control=controller,
                on_trial=notify,
            )
    except LeaseLost:
        raise  # the session belongs to its new holder now: leave its status alone
    except BaseException:
        # Leave a truthful status behind; a resumable session stays resumable.
        status = store.session(session_id).status
        if bound and status not in ("completed", "stopped", "no_rig") and is_legal(status, "interrupted"):
            store.set_session_status(session_id, "interrupted")
        elif not bound:  # e.g. the address is in use: a new session never ran; a live one is not ours
            store.transition_status(session_id, ("created",), "interrupted")
        raise
    finally:
        lease.release()
        if isinstance(controller, SessionController):
            controller.uninstall_sigint()
        store.close()
