"""Test helpers for the store/analysis/export/report tests (not a test module).

- `postgres_database()`: a throwaway PostgreSQL database on `$CLOOP_TEST_POSTGRES` (from conftest).
- `build_session(store)`: a finished session written through the real `TrialStore` API with
  realistic data (binomial retention responses, timings, model states, one retried trial, one
  invalid response, one failed trial), so analyst-side tests do not depend on the engine.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builders import retention_text
from conftest import postgres_database  # noqa: F401  (re-exported for the store tests)
from orchestrator.protocol_checks import parse_checked

REPO = Path(__file__).resolve().parent.parent

RETENTION_TEXT = retention_text()


@dataclass
class Loaded:
    """Stand-in for protocol.LoadedProtocol (text/sha256/protocol.name/version) when parsing is not wanted."""

    text: str
    sha256: str
    protocol: Any


def loaded_protocol(text: str = RETENTION_TEXT) -> Any:
    """The real LoadedProtocol if orchestrator.protocol can parse the text, else a stand-in."""
    try:
        from orchestrator.protocol import parse_protocol_text

        return parse_checked(text, source="<test>")
    except Exception:  # protocol module not importable yet: keep the store tests independent
        import hashlib
        import types

        return Loaded(text, hashlib.sha256(text.encode()).hexdigest(), types.SimpleNamespace(name="retention", version="1.0"))


@dataclass
class Built:
    session_id: str
    trial_ids: list[int]
    stimuli: list[dict[str, Any]]
    values: list[float | None]      # validated value per trial (None: invalid/failed)
    probabilities: list[dict[str, float]]


def build_session(store: Any, *, n: int = 14, seed: int = 7, subject: str = "subj-01",
                  problems: bool = True, protocol_text: str = RETENTION_TEXT) -> Built:
    """Write a complete simulated retention session through the TrialStore API.

    With ``problems``: trial 2 loses its rig once and succeeds on attempt 2, trial 5 returns NaN
    (stored ``invalid``), and the last trial fails after 3 attempts.
    """
    rng = np.random.default_rng(seed)
    pid = store.add_protocol(loaded_protocol(protocol_text))
    sid = store.create_session(protocol_id=pid, subject_id=store.subject(subject), seed=seed,
                               bind="tcp://127.0.0.1:5555", design="mutual_information", code_version="0.1.0+test")
    store.upsert_rig({"rig_id": "rig-sim-1", "adapters": ["simulated"],
                      "capabilities": {"stimulus_types": ["abstract"], "response_kinds": ["binomial"]},
                      "software_version": "0.1.0"})
    built = Built(sid, [], [], [], [])
    log_odds = 0.0
    for i in range(n):
        lag = int(rng.integers(0, 101))
        stim = {"lag": lag}
        decision = {"stimulus": stim, "strategy": "mutual_information" if i >= 3 else "random",
                    "reason": f"max expected information gain at lag={lag}" if i >= 3 else "initial random design",
                    "score": float(rng.uniform(0.05, 0.6)) if i >= 3 else None,
                    "compute_ms": float(rng.uniform(4.0, 60.0))}
        tid = store.plan_trial(sid, i, decision)
        built.trial_ids.append(tid)
        built.stimuli.append(stim)
        attempt = 1
        if problems and i == 2:
            store.mark_dispatched(tid, 1, None)
            store.record_attempt_failure(tid, 1, "attempt 1: RigLost: heartbeat lost")
            attempt = 2
        if problems and i == n - 1:
            for a in (1, 2, 3):
                store.mark_dispatched(tid, a, None)
                store.record_attempt_failure(tid, a, f"attempt {a}: TrialTimeout: no response in 30 s")
            store.fail_trial(tid, "no response after 3 attempts")
            built.values.append(None)
            built.probabilities.append(built.probabilities[-1])
            store.record_model_state(tid, built.probabilities[-1], _summaries(i), decision)
            continue
        store.mark_dispatched(tid, attempt, None)
        now = time.time()
        p = 0.9 * (lag + 1) ** -0.4
        count = int(rng.binomial(10, p))
        worker = {"presented_at": 5000.0 + i, "responded_at": 5000.25 + i}
        mapped = {"presented_at": now + 0.001, "responded_at": now + 0.001 + 0.25 + 0.01 * i}
        if problems and i == 5:
            store.complete_trial(tid, {"rig_id": "rig-sim-1", "response": {"value": float("nan"), "rt_s": 0.3},
                                       "timing": worker, "mapped_timing": mapped, "attempt": attempt}, None, "response value is NaN")
            built.values.append(None)
        else:
            store.complete_trial(tid, {"rig_id": "rig-sim-1", "response": {"value": count, "rt_s": round(0.2 + 0.01 * i, 3)},
                                       "timing": worker, "mapped_timing": mapped, "attempt": attempt}, float(count), None)
            built.values.append(float(count))
            log_odds += 0.45
        p_power = 1 / (1 + math.exp(-log_odds))
        probs = {"power": p_power, "exponential": 1 - p_power}
        built.probabilities.append(probs)
        store.record_model_state(tid, probs, _summaries(i), decision)
    store.set_session_status(sid, "completed", stopped=True)
    return built


def _summaries(i: int) -> dict[str, Any]:
    shrink = 1 / math.sqrt(i + 1)
    return {
        "power": {"log_evidence": -2.0 * (i + 1), "ess": 900.0 - 10 * i,
                  "params": {"a": {"mean": 0.9, "sd": 0.1 * shrink}, "b": {"mean": 0.4, "sd": 0.2 * shrink}}},
        "exponential": {"log_evidence": -2.3 * (i + 1), "ess": 850.0 - 12 * i,
                        "params": {"a": {"mean": 0.8, "sd": 0.1 * shrink}, "b": {"mean": 0.03, "sd": 0.01 * shrink}}},
    }
