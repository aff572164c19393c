"""Shared pieces of the model-discrimination benchmarks: the Cavagnaro et al. (2010) retention
protocol and a simulated-subject loop that records trials-to-criterion and decision times."""
from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any

import numpy as np
import torch

from orchestrator.design import make_design
from orchestrator.inference import ModelComparison
from orchestrator.models import build_truth
from orchestrator.protocol import parse_protocol_text

RETENTION_YAML = """
name: retention-cavagnaro2010
version: "1.0"
description: Power vs exponential forgetting (Cavagnaro, Myung, Pitt & Kujala 2010 simulation setup).
stimulus:
  type: abstract
  parameters:
    lag: {kind: integer, low: 0, high: 100, units: s}
response: {kind: binomial, n: 10}
models:
  - name: power
    builtin: retention_power
    inputs: {t: lag}
    prior_probability: 0.5
    priors:
      a: {dist: beta, alpha: 2, beta: 1}
      b: {dist: beta, alpha: 1, beta: 4}
  - name: exponential
    builtin: retention_exponential
    inputs: {t: lag}
    prior_probability: 0.5
    priors:
      a: {dist: beta, alpha: 2, beta: 1}
      b: {dist: beta, alpha: 1, beta: 80}
design:
  strategy: mutual_information
  settings: {mode: discriminate}
stopping: {max_trials: 100}
"""

FIXED_LAGS = [0, 1, 2, 4, 7, 12, 21, 35, 59, 99]
POWER_TRUTH = "power:a=0.9025,b=0.4861"
#: exponential truth near the centre of its prior (a ~ Beta(2,1) median 0.71, b ~ Beta(1,80) mean 0.012)
EXPONENTIAL_TRUTH = "exponential:a=0.8,b=0.02"


def retention_protocol(design: str = "mutual_information") -> Any:
    text = RETENTION_YAML
    if design == "sweep":
        text = text.replace("strategy: mutual_information\n  settings: {mode: discriminate}",
                            f"strategy: sweep\n  settings: {{values: {FIXED_LAGS}}}")
    elif design == "random":
        text = text.replace("strategy: mutual_information\n  settings: {mode: discriminate}", "strategy: random")
    return parse_protocol_text(text, "<retention benchmark>").protocol


def run_subject(protocol: Any, truth_spec: str, seed: int, max_trials: int,
                criteria: tuple[float, ...] = (0.95, 0.99)) -> dict[str, Any]:
    """One simulated subject until P(true) first reaches every criterion (or max_trials)."""
    truth = build_truth(protocol, truth_spec)
    comparison = ModelComparison.from_protocol(protocol, seed)
    design = make_design(protocol, seed)
    reached: dict[float, int | None] = {c: None for c in criteria}
    decision_ms: list[float] = []
    decision_cpu_ms: list[float] = []  # this thread's CPU time: what the decision costs without co-tenants
    update_ms: list[float] = []
    winner_at: dict[float, str | None] = {c: None for c in criteria}
    for trial in range(max_trials):
        t0, c0 = time.perf_counter(), time.thread_time()
        decision = design.propose(comparison, trial)
        decision_ms.append((time.perf_counter() - t0) * 1000.0)
        decision_cpu_ms.append((time.thread_time() - c0) * 1000.0)
        y = truth.sample(decision.stimulus, np.random.default_rng([seed, trial]))
        t1 = time.perf_counter()
        comparison.update(decision.stimulus, y)
        update_ms.append((time.perf_counter() - t1) * 1000.0)
        probs = comparison.probabilities()
        p_true = probs[truth.model_name]
        for c in criteria:
            if reached[c] is None and p_true >= c:
                reached[c] = trial + 1
        if all(v is not None for v in reached.values()):
            break
    return {"seed": seed, "trials_to": {str(c): reached[c] for c in criteria},
            "decision_ms": decision_ms, "decision_cpu_ms": decision_cpu_ms, "update_ms": update_ms, "final": probs}


def censored_median(values: list[int | None], cap: int) -> float:
    """Median with never-reached subjects counted as cap + 1 (conservative)."""
    return float(statistics.median([v if v is not None else cap + 1 for v in values]))


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def environment() -> dict[str, Any]:
    import os

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()}


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
