"""Batch designs (`design.batch_size`) in the real engine: a pilot (`cloop simulate`) and a live session agree.

The engine plans every trial of a batch before it sends the first (write-ahead), so a crash in the
middle of a batch resumes with the same stimuli an uninterrupted session would have shown.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.engine import run_session
from orchestrator.protocol import parse_protocol_text
from orchestrator.simulate import SimulatedRigPool, SimulationConfig, simulate
from orchestrator.models import build_truth
from orchestrator.store import TrialStore, upgrade
from orchestrator.protocol_checks import parse_checked

ROOT = Path(__file__).resolve().parent.parent
TRUTH = "power:a=0.9025,b=0.4861"
BATCHED = (ROOT / "protocols" / "retention.yaml").read_text().replace(
    "  strategy: mutual_information\n", "  strategy: random\n  batch_size: 3\n").replace(
    "model_probability: 0.99", "model_probability: null")


@pytest.fixture
def loaded():  # noqa: ANN201
    return parse_checked(BATCHED)


@pytest.fixture
def store(tmp_path: Path):  # noqa: ANN201
    url = f"sqlite:///{tmp_path / 'batch.db'}"
    upgrade(url)
    with TrialStore(url) as opened:
        yield opened


def _session(store: TrialStore, loaded, seed: int) -> str:  # noqa: ANN001
    return store.create_session(protocol_id=store.add_protocol(loaded), subject_id=None, seed=seed, design="random")


class _CrashAt(SimulatedRigPool):
    """Answers like the simulated rig, but the orchestrator 'dies' when trial `index` is sent."""

    def __init__(self, truth, seed: int, index: int) -> None:  # noqa: ANN001
        super().__init__(truth, seed)
        self.crash_index = index

    def run_trial(self, cmd):  # noqa: ANN001, ANN201
        if cmd.index == self.crash_index:
            self.crash_index = -1
            raise KeyboardInterrupt
        return super().run_trial(cmd)


def test_a_batch_is_planned_before_its_first_trial_is_sent(store: TrialStore, loaded) -> None:  # noqa: ANN001
    session_id = _session(store, loaded, 5)
    seen: list[list[str]] = []

    class Watching(SimulatedRigPool):
        def run_trial(self, cmd):  # noqa: ANN001, ANN201
            seen.append([t["status"] for t in store.trials(session_id)])
            return super().run_trial(cmd)

    run_session(loaded, store=store, rigs=Watching(build_truth(loaded.protocol, TRUTH), 5), session_id=session_id,
                seed=5, max_trials=7)
    assert seen[0] == ["dispatched", "planned", "planned"]
    assert seen[3] == ["completed"] * 3 + ["dispatched", "planned", "planned"]
    assert len(seen[6]) == 7, "the last batch is cut at max_trials"
    assert [t["status"] for t in store.trials(session_id)] == ["completed"] * 7


def test_pilot_and_engine_run_the_same_batches_and_a_resume_mid_batch_changes_nothing(
        store: TrialStore, loaded) -> None:  # noqa: ANN001
    pilot = [(r["trial"], r["stimulus"], r["response"]) for r in
             simulate(loaded, SimulationConfig(truth=TRUTH, seed=11, max_trials=9))]
    assert [t for t, _, _ in pilot] == list(range(9))

    truth = build_truth(loaded.protocol, TRUTH)
    session_id = _session(store, loaded, 11)
    with pytest.raises(KeyboardInterrupt):
        run_session(loaded, store=store, rigs=_CrashAt(truth, 11, 4), session_id=session_id, seed=11, max_trials=9)
    statuses = [t["status"] for t in store.trials(session_id)]
    assert statuses == ["completed"] * 4 + ["dispatched", "planned"], "mid-batch: the rest of the batch waits"
    result = run_session(loaded, store=store, rigs=SimulatedRigPool(truth, 11), session_id=session_id, seed=11,
                         max_trials=9)
    live = [(t["index"], t["stimulus"], t["value"]) for t in store.trials(session_id)]
    assert result.trials_completed == 9
    assert live == pilot


def test_a_stop_in_the_middle_of_a_batch_leaves_no_open_trial(store: TrialStore, loaded) -> None:  # noqa: ANN001
    session_id = _session(store, loaded, 2)

    class StopAfter:
        def __init__(self) -> None:
            self.calls = 0

        def checkpoint(self, session: str) -> str:
            self.calls += 1
            return "stop" if self.calls > 2 else "run"

    result = run_session(loaded, store=store, rigs=SimulatedRigPool(build_truth(loaded.protocol, TRUTH), 2),
                         session_id=session_id, seed=2, control=StopAfter())
    assert result.status == "stopped" and result.trials_completed == 2
    statuses = [t["status"] for t in store.trials(session_id)]
    assert statuses == ["completed", "completed", "abandoned"] and not store.open_trials(session_id)


def test_an_implausible_response_is_stored_invalid_and_never_reaches_the_models(store: TrialStore) -> None:
    from orchestrator.simulate import SimulatedOutcome

    poisson = parse_checked((ROOT / "protocols" / "retention.yaml").read_text().replace(
        "  kind: binomial\n  n: 10\n", "  kind: poisson\n").replace(
        "builtin: retention_power", "formula: \"exp(a - b * t)\"").replace(
        "builtin: retention_exponential", "formula: \"exp(a) / (1 + b * t)\""))

    class Overflowing:
        def run_trial(self, cmd):  # noqa: ANN001, ANN201
            value = 2**64 - 1 if cmd.index == 1 else 3
            return SimulatedOutcome(rig_id="sim", attempt=cmd.attempt, response={"value": value})

    session_id = _session(store, poisson, 1)
    result = run_session(poisson, store=store, rigs=Overflowing(), session_id=session_id, seed=1, max_trials=3)
    trials = store.trials(session_id)
    assert [t["status"] for t in trials] == ["completed", "invalid", "completed"]
    assert "above the plausible high" in trials[1]["error"]
    assert result.trials_invalid == 1 and [v for _, v in store.observations(session_id)] == [3.0, 3.0]
