"""In-process closed loop against a simulated subject (`cloop simulate`): pilot a protocol offline.

Same parts as the real engine - ModelComparison, make_design, the protocol's response validation
and safety checks - without rigs or a database. Replicate r uses seed `seed + r` for models and
design and answers trial i with numpy.random.default_rng([seed + r, i]), like the simulated rig.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from orchestrator.design import make_design
from orchestrator.inference import ModelComparison
from orchestrator.models import build_truth


@dataclass
class SimulationConfig:
    truth: str
    design: str | None = None
    replicates: int = 1
    seed: int = 0
    max_trials: int | None = None
    stop_at: float | None = None  # stop when a model reaches this probability (default: protocol stopping)
    min_trials: int | None = None


def simulate(protocol: Any, config: SimulationConfig) -> Iterator[dict[str, Any]]:
    """Yield one JSON-safe record per trial (all replicates, in order)."""
    if getattr(protocol, "is_population", False):  # image stimuli and population responses
        from orchestrator.neural.simulate import simulate_population

        yield from simulate_population(protocol, config)
        return
    truth = build_truth(protocol, config.truth)  # validates the truth spec up front
    max_trials = int(config.max_trials if config.max_trials is not None else protocol.stopping.max_trials)
    stop_at = config.stop_at if config.stop_at is not None else protocol.stopping.model_probability
    min_trials = int(config.min_trials if config.min_trials is not None else protocol.stopping.min_trials)
    if max_trials < 1:
        raise ValueError("max_trials must be >= 1")
    for r in range(int(config.replicates)):
        seed = int(config.seed) + r
        comparison = ModelComparison.from_protocol(protocol, seed)
        design = make_design(protocol, seed, config.design)
        trial = 0
        while trial < max_trials:
            t0 = time.perf_counter()
            decision = design.propose(comparison, trial)
            decision_ms = (time.perf_counter() - t0) * 1000.0
            stimuli = list(decision.batch) if decision.batch else [decision.stimulus]
            for stimulus in stimuli:
                if trial >= max_trials:
                    break
                protocol.check_safe(stimulus)
                raw = truth.sample(stimulus, np.random.default_rng([seed, trial]))
                value = protocol.response.validate({"value": raw})
                t1 = time.perf_counter()
                comparison.update(stimulus, value)
                update_ms = (time.perf_counter() - t1) * 1000.0
                probs = comparison.probabilities()
                leader, p_lead = max(probs.items(), key=lambda kv: kv[1])
                yield {
                    "replicate": r,
                    "trial": trial,
                    "stimulus": stimulus,
                    "response": value,
                    "model_probabilities": probs,
                    "decision_ms": round(decision_ms, 3),
                    "update_ms": round(update_ms, 3),
                    "strategy": decision.strategy,
                    "score": decision.score,
                    "truth": truth.model_name,
                    "leader": leader,
                    "p_truth": probs[truth.model_name],
                }
                trial += 1
                decision_ms = 0.0  # the rest of a batch needed no extra decision time
                if stop_at is not None and trial >= min_trials and p_lead >= stop_at:
                    break
            else:
                continue
            break
