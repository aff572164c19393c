"""The closed loop. One short function a reader can follow:

    propose stimuli (a batch of one or more) -> record them planned -> for each: safety check
    -> dispatch (with retries) -> record response -> update models -> record model state -> check stopping

Every named part lives in its own module (design, inference, transport, store); this file only
orders them. The database is written ahead: a trial is planned before it is dispatched and its
response is committed before the models see it, so a crash at any point loses nothing and
``resume`` can rebuild the exact state by replaying the completed trials.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol as TypingProtocol

from orchestrator.design import Decision, make_design
from orchestrator.inference import ModelComparison
from orchestrator.protocol import InvalidResponse, LoadedProtocol
from orchestrator.rig_api import AttemptFailed, FailureReason, TrialCommand
from orchestrator.store import TrialStore

log = logging.getLogger("cloop.engine")


class RigPool(TypingProtocol):
    """What the engine needs from the transport (orchestrator.transport.RigServer provides it)."""

    def run_trial(self, cmd: Any) -> Any: ...


class SessionControl(TypingProtocol):
    """Asked at every trial boundary whether to go on (pause/stop from another terminal, Ctrl-C)."""

    def checkpoint(self, session_id: str) -> str:
        """Return "run" to continue or "stop" to end the session now; may block while paused."""
        ...


@dataclass(frozen=True)
class TrialReport:
    """What the engine tells its observer after each trial (progress display, logs)."""

    index: int
    status: str
    stimulus: dict[str, Any]
    response: float | Any | None  # a population trial's response is its vector (numpy array)
    probabilities: dict[str, float]
    decision: Decision
    attempts: int
    error: str | None = None
    update_ms: float = 0.0  # time the models took to assimilate the response

    @property
    def response_text(self) -> str:
        """The response for a log line: the number, or ``[N units]`` for a population vector."""
        if self.response is None or isinstance(self.response, (int, float)):
            return str(self.response)
        return f"[{len(self.response)} units]"


@dataclass
class SessionResult:
    session_id: str
    status: str
    trials_completed: int
    trials_failed: int
    trials_invalid: int
    probabilities: dict[str, float]
    stop_reason: str


STOPPED_BY_EXPERIMENTER = "stopped by the experimenter"
ABORTED = "aborted at the rig"


class _AlwaysRun:
    def checkpoint(self, session_id: str) -> str:
        return "run"


def replay_history(store: TrialStore, session_id: str, comparison: ModelComparison) -> None:
    """Feed every valid completed trial back into fresh models, in order.

    This is how a resumed session rebuilds its state: the models are a deterministic function of the
    protocol, the seed and the ordered observations, all of which are in the database.
    A crash between recording a response and recording the posterior after it leaves that trial
    without model state; replay fills it in, so every finished trial has one.
    """
    missing = {m.trial_id for m in store.model_states(session_id)
               if m.probabilities is None and m.status in ("completed", "invalid", "failed")}
    if not missing:
        for stimulus, value in store.observations(session_id):
            comparison.update(stimulus, value)
        return
    observations = iter(store.observations(session_id))  # completed trials in order, population vectors included
    for trial in store.trials(session_id):
        if trial.status == "completed":
            comparison.update(*next(observations))
        if trial.id in missing:
            store.record_model_state(trial.id, comparison.probabilities(), comparison.summary())


def run_session(
    loaded: LoadedProtocol,
    *,
    store: TrialStore,
    rigs: RigPool,
    session_id: str,
    seed: int,
    max_trials: int | None = None,
    design_override: str | None = None,
    control: SessionControl | None = None,
    on_trial: Callable[[TrialReport], None] | None = None,
    artifacts_dir: str | None = None,
) -> SessionResult:
    """Run (or continue after a crash) a session until a stopping rule fires; return its summary.

    `artifacts_dir` is where a population session's images go (default: $CLOOP_ARTIFACTS, else beside
    a SQLite database).
    """
    protocol = loaded.protocol
    control = control or _AlwaysRun()
    limit = max_trials if max_trials is not None else protocol.stopping.max_trials
    artifacts = None
    if protocol.is_population:  # image stimuli: pixels beside the database, feature models with readouts
        from orchestrator.neural.session import keep_image, open_population, wire_stimulus

        comparison, artifacts = open_population(protocol, seed, store, session_id, artifacts_dir)
    else:
        comparison = ModelComparison.from_protocol(protocol, seed)
    design = make_design(protocol, seed, design_override)
    replay_history(store, session_id, comparison)
    # Trials already planned: the rest of a batch, and the trial in flight when the orchestrator died.
    queue = [(trial, _resumed(trial)) for trial in store.open_trials(session_id)]
    index = store.next_index(session_id) - len(queue)
    counts = store.trial_counts(session_id)
    # Not a blind set: a pause/stop requested while waiting for rigs (or before a crash) must survive.
    store.transition_status(session_id, ("created", "waiting_for_rig", "interrupted", "no_rig", "failed"), "running")
    result = SessionResult(session_id, "running", counts.get("completed", 0), counts.get("failed", 0),
                           counts.get("invalid", 0), comparison.probabilities(), "")
    stopping = _StoppingRule(protocol, limit)

    while True:
        reason = stopping.reason(comparison, result.trials_completed, index)
        # A trial dispatched before a crash is reconciled first: the rig may have presented it.
        reconcile = bool(queue) and queue[0][0].status != "planned"
        if reason is None and not reconcile and control.checkpoint(session_id) == "stop":
            reason = STOPPED_BY_EXPERIMENTER
        if reason is not None:
            result.stop_reason = reason
            break

        if not queue:  # a new decision: every trial of its batch is planned (written ahead) before the first is sent
            decision = design.propose(comparison, index)
            if artifacts is not None:  # an image's pixels are stored before the trial that shows it
                keep_image(artifacts, decision)
            queue = _plan_batch(store, session_id, index, decision, limit)
        trial, decision = queue.pop(0)
        trial_id, index = trial.id, trial.index
        protocol.check_safe(decision.stimulus)  # defence in depth: an unsafe stimulus is never sent
        sent = decision if artifacts is None else replace(decision, stimulus=wire_stimulus(protocol, artifacts, decision.stimulus))
        outcome, attempts, error, failure = _dispatch(loaded, store, rigs, session_id, trial_id, index, sent)

        value: float | None = None
        update_ms = 0.0
        if outcome is None and failure is FailureReason.ABORTED:
            # The operator pressed Escape at the rig: keep the trial as abandoned and pause the session.
            store.abandon_open_trials(session_id, error)
            queue = []
            store.transition_status(session_id, ("running",), "pause_requested")
            status = "abandoned"
        elif outcome is None:
            status = "failed"
            result.trials_failed += 1
        else:
            try:
                value = protocol.response.validate(outcome.response)
                status, error = "completed", None
            except InvalidResponse as exc:
                status, error = "invalid", str(exc)
            store.complete_trial(trial_id, outcome, value, error)  # committed before the models see it
            if status == "completed":
                started = time.perf_counter()
                comparison.update(decision.stimulus, value)
                update_ms = 1000 * (time.perf_counter() - started)
                result.trials_completed += 1
            else:
                log.warning("trial %d: invalid response stored, models not updated: %s", index, error)
                result.trials_invalid += 1
        probabilities = comparison.probabilities()
        store.record_model_state(trial_id, probabilities, comparison.summary(),
                                 None if decision.strategy == "resumed" else decision)
        report = TrialReport(index, status, decision.stimulus, value, probabilities, decision, attempts, error,
                             update_ms)
        if on_trial is not None:
            on_trial(report)
        index += 1

    if queue:  # planned trials of a batch the session no longer needs: never sent, so nothing is lost
        store.abandon_open_trials(session_id, f"not presented: the session ended ({result.stop_reason})")
    getattr(design, "close", lambda: None)()  # e.g. a background synthesis of an image never to be shown
    result.probabilities = comparison.probabilities()
    result.status = "stopped" if result.stop_reason == STOPPED_BY_EXPERIMENTER else "completed"
    store.set_session_status(session_id, result.status, stopped=True)
    return result


def _resumed(trial: Any) -> Decision:
    """The decision of a trial planned before this process started (it is re-sent under the same id)."""
    return Decision(trial.stimulus, "resumed", "re-dispatched after an orchestrator restart", None, 0.0)


@dataclass(frozen=True)
class _PlannedTrial:
    """The fields of a just-planned trial the loop reads (the same names as the store's TrialRecord)."""

    id: int
    index: int
    stimulus: dict[str, Any]
    status: str = "planned"


def _plan_batch(store: TrialStore, session_id: str, index: int, decision: Decision,
                limit: int) -> list[tuple[Any, Decision]]:
    """Plan every trial of a decision's batch (at most up to `limit`); the first keeps the decision's cost."""
    stimuli = list(decision.batch or (decision.stimulus,))[: max(limit - index, 1)]
    planned = []
    for offset, stimulus in enumerate(stimuli):
        part = decision if offset == 0 else replace(decision, stimulus=stimulus, compute_ms=0.0, batch=())
        trial_id = store.plan_trial(session_id, index + offset, part)
        planned.append((_PlannedTrial(trial_id, index + offset, stimulus), part))
    return planned


class _StoppingRule:
    """The protocol's stopping rules; a leader at P >= threshold is declared only when its comparison allows it.

    A comparison may hold a declaration back (``declaration_blocker(name)`` gives the reason, e.g. a
    held-out predictive check the leader fails); the session then goes on, the reason is logged once
    per change, and it is named in the stop reason if the session then ends at max_trials.
    """

    def __init__(self, protocol: Any, limit: int) -> None:
        self.stopping, self.limit = protocol.stopping, limit
        self.blocked: str | None = None  # why the current leader at the threshold is not declared
        self._logged: tuple[str, str] | None = None

    def reason(self, comparison: Any, completed: int, index: int) -> str | None:
        """The first stopping rule that fires, in words, or None to go on."""
        if index >= self.limit:
            return f"reached max_trials={self.limit}" + (f"; {self.blocked}" if self.blocked else "")
        threshold = self.stopping.model_probability
        if threshold is None or completed < self.stopping.min_trials:
            return None
        name, p = max(comparison.probabilities().items(), key=lambda kv: kv[1])
        why = comparison.declaration_blocker(name) if p >= threshold else None
        if p >= threshold and why is None:
            return f"model {name!r} reached P={p:.4f} >= {threshold}"
        self.blocked = None if why is None else f"model {name!r} reached P={p:.4f} >= {threshold}, not declared: {why}"
        if why is not None and self._logged != (name, why):
            log.info("trial %d: %s; the session goes on", index, self.blocked)
            self._logged = (name, why)
        return None


def _dispatch(
    loaded: LoadedProtocol,
    store: TrialStore,
    rigs: RigPool,
    session_id: str,
    trial_id: int,
    index: int,
    decision: Decision,
) -> tuple[Any | None, int, str | None, FailureReason | None]:
    """Send the trial to a rig, retrying on rig loss/timeout up to the protocol's limit.

    The wire trial id is derived from (session, index), so after a crash or a retry the worker
    recognises a trial it already presented and returns its stored result instead of presenting again.
    Returns (outcome or None if every attempt failed, the last attempt number, the failure in words,
    the last attempt's :class:`FailureReason`); ``reason is FailureReason.ABORTED`` means the operator
    aborted the trial at the rig.
    """
    protocol = loaded.protocol
    first_attempt = store.attempts(trial_id) + 1
    last_error: str | None = None
    reason: FailureReason | None = None
    for attempt in range(first_attempt, first_attempt + protocol.rig.max_attempts):
        cmd = TrialCommand(
            trial_id=f"{session_id}:{index}",
            attempt=attempt,
            index=index,
            session_id=session_id,
            stimulus=decision.stimulus,
            stimulus_type=protocol.stimulus.type,
            response_kind=protocol.response.kind,
            timeout_s=protocol.response.timeout_s,
        )
        store.mark_dispatched(trial_id, attempt, None)
        started = time.perf_counter()
        try:
            outcome = rigs.run_trial(cmd)  # the server allows the response timeout plus presentation time
        except AttemptFailed as exc:  # rig lost, timed out or rejected: retry with the same trial id
            reason = exc.reason
            last_error = f"attempt {attempt} on rig {exc.rig_id}: {type(exc).__name__}: {exc}"
            log.warning("trial %d %s (%.0f ms)", index, last_error, 1000 * (time.perf_counter() - started))
            store.record_attempt_failure(trial_id, attempt, last_error)
            if reason is FailureReason.ABORTED:
                return None, attempt, f"{ABORTED}: {last_error}", reason
            if not reason.retryable:  # e.g. the rig's own hard limits refused it
                break
            continue
        # NoRigError (no rig came back in time) propagates: the trial stays open and the session
        # is left resumable instead of failing every remaining trial.
        return outcome, attempt, None, None
    failure = f"no response after {attempt - first_attempt + 1} attempt(s); last: {last_error}"
    store.fail_trial(trial_id, failure)
    return None, attempt, failure, reason
