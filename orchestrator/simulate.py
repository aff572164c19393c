"""`cloop simulate`: the real closed loop (orchestrator.engine) against an in-process simulated subject.

A pilot must behave as the live session will, batches (`design.batch_size`) included, so this runs
`engine.run_session` itself, for scalar and population protocols alike: a throw-away database (and,
for image stimuli, artifact store) in memory-backed storage, and an in-process rig pool that answers
like the simulated rig worker. Replicate r uses seed `seed + r` for models and design and answers
trial i with numpy.random.default_rng([seed + r, i]), like `cloop rig --adapter simulated --seed`.
A population record's response is the list of N unit responses (null = masked) and it adds the
design's `image` information (e.g. the image's distance from the pool).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import queue
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from orchestrator.engine import TrialReport, run_session
from orchestrator.models import build_truth
from orchestrator.protocol import LoadedProtocol, Protocol
from orchestrator.store import TrialStore, upgrade


@dataclass
class SimulationConfig:
    truth: str
    design: str | None = None
    replicates: int = 1
    seed: int = 0
    max_trials: int | None = None
    stop_at: float | None = None  # stop when a model reaches this probability (default: protocol stopping)
    min_trials: int | None = None


class SimulatedRigPool:
    """The engine's RigPool, in this process: the truth answers each trial at once."""

    def __init__(self, truth: Any, seed: int) -> None:
        self.truth, self.seed = truth, seed

    def run_trial(self, cmd: Any) -> "SimulatedOutcome":
        raw = self.truth.sample(cmd.stimulus, np.random.default_rng([self.seed, int(cmd.index)]))
        return SimulatedOutcome(rig_id="simulated", attempt=cmd.attempt, response={"value": raw})


class SimulatedOutcome(dict):
    """A rig's answer as the store reads it (a mapping), with `.response` as the engine reads it."""

    @property
    def response(self) -> dict[str, Any]:
        return self["response"]


def _memory_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() else None


def simulate(protocol: Protocol | LoadedProtocol, config: SimulationConfig) -> Iterator[dict[str, Any]]:
    """Yield one JSON-safe record per trial (all replicates, in order), as the engine runs them."""
    loaded = protocol if isinstance(protocol, LoadedProtocol) else _as_loaded(protocol)
    truth = _subject(loaded.protocol, config.truth)  # validates the truth spec up front
    max_trials = int(config.max_trials if config.max_trials is not None else loaded.protocol.stopping.max_trials)
    if max_trials < 1:
        raise ValueError("max_trials must be >= 1")
    loaded = _with_stopping(loaded, config)
    with tempfile.TemporaryDirectory(prefix="cloop-simulate-", dir=_memory_dir()) as folder:
        url = f"sqlite:///{folder}/simulation.db"
        upgrade(url)
        with TrialStore(url) as store:
            protocol_id = store.add_protocol(loaded)
            for r in range(int(config.replicates)):
                seed = int(config.seed) + r
                session_id = store.create_session(protocol_id=protocol_id, subject_id=None, seed=seed,
                                                  design=config.design or loaded.protocol.design.strategy)
                for report in _run(loaded, store, session_id, seed, max_trials, config.design, truth, folder):
                    yield _record(r, report, truth.model_name, loaded.protocol.is_population)


def _subject(protocol: Protocol, spec: str) -> Any:
    """The simulated subject: a scalar model's truth, or a population answering wire images."""
    if protocol.is_population:
        from orchestrator.neural.simulate import SimulatedPopulation

        return SimulatedPopulation(protocol, spec)
    return build_truth(protocol, spec)


def _run(loaded: LoadedProtocol, store: TrialStore, session_id: str, seed: int, max_trials: int,
         design: str | None, truth: Any, folder: str) -> Iterator[TrialReport]:
    """Run one session in a thread and hand its trial reports out as they happen."""
    reports: queue.Queue = queue.Queue(maxsize=64)
    done = object()
    failure: list[BaseException] = []
    pool = SimulatedRigPool(truth, seed)

    def work() -> None:
        try:
            with _numerics(loaded.protocol):
                run_session(loaded, store=store, rigs=pool, session_id=session_id, seed=seed, max_trials=max_trials,
                            design_override=design, on_trial=reports.put, artifacts_dir=f"{folder}/artifacts")
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)
        finally:
            reports.put(done)

    thread = threading.Thread(target=work, name=f"simulate-{session_id[:8]}", daemon=True)
    thread.start()
    while (item := reports.get()) is not done:
        yield item
    thread.join()
    if failure:
        raise failure[0]


def _numerics(protocol: Protocol) -> contextlib.AbstractContextManager:
    """Population models run with denormals flushed (on the session's thread: the flag is per thread)."""
    if not protocol.is_population:
        return contextlib.nullcontext()
    from orchestrator.neural.numerics import flushed_denormals

    return flushed_denormals()


def _record(replicate: int, report: TrialReport, truth_model: str, population: bool) -> dict[str, Any]:
    probabilities = report.probabilities
    leader, _ = max(probabilities.items(), key=lambda kv: kv[1])
    response = report.response
    if response is not None and not isinstance(response, (int, float)):  # a population vector, NaN = masked
        response = [None if math.isnan(v) else v for v in response.tolist()]
    record = {
        "replicate": replicate,
        "trial": report.index,
        "stimulus": report.stimulus,
        "response": response,
        "model_probabilities": probabilities,
        "decision_ms": round(report.decision.compute_ms, 3),
        "update_ms": round(report.update_ms, 3),
        "strategy": report.decision.strategy,
        "score": report.decision.score,
        "truth": truth_model,
        "leader": leader,
        "p_truth": probabilities[truth_model],
    }
    if population:  # what the design says of its image (source, pool distance...)
        record["image"] = getattr(report.decision, "info", None)
    return record


def _as_loaded(protocol: Protocol) -> LoadedProtocol:
    """A protocol built in code gets a text (its JSON, which is YAML) so the store can keep it."""
    text = json.dumps(protocol.model_dump(mode="json"), sort_keys=True)
    return LoadedProtocol(protocol, text, hashlib.sha256(text.encode()).hexdigest(), "<simulation>")


def _with_stopping(loaded: LoadedProtocol, config: SimulationConfig) -> LoadedProtocol:
    """Apply the simulation's own stopping overrides (--stop-at / --min-trials) to the protocol."""
    updates = {k: v for k, v in (("model_probability", config.stop_at), ("min_trials", config.min_trials))
               if v is not None}
    if not updates:
        return loaded
    stopping = loaded.protocol.stopping.model_copy(update=updates)
    return LoadedProtocol(loaded.protocol.model_copy(update={"stopping": stopping}), loaded.text, loaded.sha256,
                          loaded.source)
