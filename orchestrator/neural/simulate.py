"""`cloop simulate` for population protocols: the closed loop in-process against a simulated population.

Same record format as the scalar simulator (orchestrator.simulate), one record per trial; the
response is the list of N unit responses (null = masked) and the record adds the image's sha256,
its distance from the pool and the design's compute time. Replicate r uses seed + r for models,
design and population weights (unless the truth fixes ``seed=``), and trial i answers with
numpy.random.default_rng([seed + r, i]).
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterator

import numpy as np

from orchestrator.design import make_design
from orchestrator.neural.comparison import PopulationComparison
from orchestrator.neural.numerics import flushed_denormals
from orchestrator.neural.pool import load_pool
from orchestrator.neural.truth import build_population_truth


def simulate_population(protocol: Any, config: Any) -> Iterator[dict[str, Any]]:
    """Yield one JSON-safe record per trial (all replicates, in order)."""
    with flushed_denormals():  # the consumer runs between records with the flag set too: a CLI loop
        yield from _simulate_population(protocol, config)


def _simulate_population(protocol: Any, config: Any) -> Iterator[dict[str, Any]]:
    pool = load_pool(protocol)
    base = PopulationComparison.from_protocol(protocol, int(config.seed), pool=pool)
    truth = build_population_truth(protocol, config.truth, base)  # validates the truth up front
    max_trials = int(config.max_trials if config.max_trials is not None else protocol.stopping.max_trials)
    stop_at = config.stop_at if config.stop_at is not None else protocol.stopping.model_probability
    min_trials = int(config.min_trials if config.min_trials is not None else protocol.stopping.min_trials)
    for r in range(int(config.replicates)):
        seed = int(config.seed) + r
        comparison = base.fresh(seed) if r else base
        design = make_design(protocol, seed, config.design)
        for trial in range(max_trials):
            t0 = time.perf_counter()
            decision = design.propose(comparison, trial)
            decision_ms = (time.perf_counter() - t0) * 1000.0
            raw = truth.sample(decision.stimulus, np.random.default_rng([seed, trial]), pixels=decision.pixels)
            value = protocol.response.validate({"value": raw})
            t1 = time.perf_counter()
            comparison.update(decision.stimulus, value, pixels=decision.pixels.astype(np.float64) / 255.0)
            update_ms = (time.perf_counter() - t1) * 1000.0
            probs = comparison.probabilities()
            leader, p_lead = max(probs.items(), key=lambda kv: kv[1])
            yield {
                "replicate": r, "trial": trial, "stimulus": decision.stimulus,
                "response": [None if math.isnan(v) else v for v in value.tolist()],
                "model_probabilities": probs, "decision_ms": round(decision_ms, 3), "update_ms": round(update_ms, 3),
                "strategy": decision.strategy, "score": decision.score, "truth": truth.model_name,
                "leader": leader, "p_truth": probs[truth.model_name], "image": decision.info,
            }
            if stop_at is not None and trial + 1 >= min_trials and p_lead >= stop_at:
                break
        if hasattr(design, "close"):
            design.close()
