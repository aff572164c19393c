"""Calibration of P(model) on cheap random-pool sessions: are the P >= .99 decisions right 99 % of the time?

Exact Bayesian model comparison is calibrated under any design and stopping rule when the truth is
drawn from the model's own prior, so this script moves from that case to the benchmark's simulated
populations one step at a time and reports where calibration breaks. Truths (``--truth``):

- ``prior``: every unit's weights (bias included) and noise variance drawn from the NIG prior of one
  grid component (``--weight-sd``, the first offset spread, the noise prior whose mean is nearest
  1) on the candidate's own standardised features;
- ``simulated``: orchestrator.neural.truth's population (weights N(0, 1) per standardised feature,
  each unit scaled to explain ``ev`` of its variance over the pool, offsets, unit noise), with
  ``--noise gaussian`` or ``poisson`` (Anscombe-transformed counts); ``--extra`` adds truth options
  (``saturation=1``, ``sparse=8``, ``softplus=1``: misspecified truths).

Images are drawn uniformly from the pool; the candidates' features of the pool are the ones the
comparison computes. A session stops at P(leader) >= .99 (and, with ``--gate``, no declaration
blocker; ``--rival-test`` adds the trial-level rival test) after at least 3 trials, or after ``--max-trials``.

    python benchmarks/population_calibration.py --truth prior --units 100 --sessions 40 > calib.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from orchestrator.neural.comparison import PopulationComparison
from orchestrator.neural.truth import build_population_truth
from population_common import CNN_A, CNN_B, GABOR
from population_common import protocol_for as common_protocol

def protocol_for(units: int, noise: str, readout: dict[str, Any] | None = None) -> Any:
    """The three candidates under the random-pool design (no synthesis needed to test calibration)."""
    return common_protocol([GABOR, CNN_A, CNN_B], units, noise=noise, strategy="population_random_pool",
                           readout=readout)


class PriorTruth:
    """Units drawn from candidate `index`'s NIG prior (grid component `component`) on its pool features."""

    def __init__(self, base: PopulationComparison, index: int, component: int, seed: int,
                 steps: tuple[str, ...] = ()) -> None:
        cand = base.candidates[index]
        prior = cand.readout.prior(component)
        rng = np.random.default_rng([seed, 0xCA1])
        n = base.protocol.response.n_units
        self.model_name = cand.name
        self.noise_var = prior.b0 / rng.gamma(prior.a0, 1.0, n)  # InvGamma(a0, b0)
        self.W = rng.standard_normal((n, prior.precision.shape[0])) / np.sqrt(prior.precision)[None, :]
        self.W *= np.sqrt(self.noise_var)[:, None]
        self.X = cand.features.pool_features.numpy()
        if "unit_noise" in steps:  # every unit's noise variance 1 instead of inverse-gamma draws
            self.W /= np.sqrt(self.noise_var)[:, None]
            self.noise_var = np.ones(n)
        if "pool_scaled" in steps:  # every unit's signal scaled to the same SD over the pool
            sd = (self.X[:, :-1] @ self.W[:, :-1].T).std(0)
            self.W[:, :-1] *= (np.sqrt(self.noise_var) * 2 * prior.precision[0] ** -0.5
                               * np.sqrt(prior.precision.shape[0] - 1) / sd)[:, None] / 2
        if "normal_offset" in steps:  # offsets N(0, 1) instead of the bias prior
            self.W[:, -1] = rng.standard_normal(n)

    def sample(self, image: int, rng: np.random.Generator) -> np.ndarray:
        return self.X[image] @ self.W.T + rng.standard_normal(self.W.shape[0]) * np.sqrt(self.noise_var)


def run_session(base: PopulationComparison, truth: Any, seed: int, max_trials: int, gate: bool,
                pixels: bool) -> dict[str, Any]:
    comparison = base.fresh(seed)
    rng = np.random.default_rng([seed, 0x5E1])
    trace: list[tuple[str, float]] = []
    blocked = 0
    for i in range(max_trials):
        image = int(rng.integers(len(base.pool)))
        if isinstance(truth, PriorTruth):
            y = truth.sample(image, np.random.default_rng([seed, i]))
        else:
            f = None if pixels else truth.features.pool_features[image].numpy()
            y = np.asarray(truth.sample({}, np.random.default_rng([seed, i]), pixels=base.pool[image], features=f), float)
        if pixels:
            comparison.update({"image": f"{image:064x}"}, y, pixels=base.pool[image])
        else:
            _update_from_pool(comparison, image, y)
        leader, p = comparison.leader()
        trace.append((leader, p))
        if p >= 0.99 and i + 1 >= 3:
            if gate and comparison.declaration_blocker(leader) is not None:
                blocked += 1
                continue
            break
    leader, p = trace[-1]
    decided = p >= 0.99 and (not gate or comparison.declaration_blocker(leader) is None)
    return {"truth": truth.model_name, "trials": len(trace), "decided": decided,
            "wrong": decided and leader != truth.model_name, "trace": trace, "blocked_trials": blocked}


def _update_from_pool(comparison: PopulationComparison, image: int, y: np.ndarray) -> None:
    """comparison.update with the pool image's features taken from the pool (no network pass)."""
    ref = f"{image:064x}"
    comparison._cache.setdefault(ref, [c.features.pool_features[image].numpy() for c in comparison.candidates])
    comparison.update({"image": ref}, y)


def calibration(sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    edges = [0.5, 0.7, 0.9, 0.99, 1.0001]
    pairs = [(p, leader == s["truth"]) for s in sessions for leader, p in s["trace"]]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [ok for p, ok in pairs if lo <= p < hi]
        if sel:
            rows.append({"p_leader": f"[{lo}, {min(hi, 1.0)})", "n": len(sel),
                         "leader_is_truth": round(float(np.mean(sel)), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--truth", choices=["prior", "simulated"], default="prior")
    parser.add_argument("--noise", choices=["gaussian", "poisson"], default="gaussian")
    parser.add_argument("--units", type=int, default=100)
    parser.add_argument("--ev", type=float, default=0.1)
    parser.add_argument("--extra", default="", help="truth options, e.g. saturation=1")
    parser.add_argument("--weight-sd", type=float, default=0.5, help="prior truth: the grid value drawn from")
    parser.add_argument("--steps", default="", help="prior truth: comma-separated steps towards the simulator")
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--max-trials", type=int, default=60)
    parser.add_argument("--gate", action="store_true", help="declare only when declaration_blocker is None")
    parser.add_argument("--rival-test", action="store_true",
                        help="with --gate: also the trial-level rival test (stopping.rival_test)")
    parser.add_argument("--rival-lead", type=float, default=None,
                        help="with --gate: stopping.rival_lead (default: the protocol's, 1.5; 0 = no lead gate)")
    parser.add_argument("--evidence-margin", type=float, default=None,
                        help="with --gate: stopping.evidence_margin (default: the protocol's, 1; 0 = none)")
    parser.add_argument("--pixels", action="store_true", help="features through the network per image")
    parser.add_argument("--readout", default="", help="JSON readout entry for every model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    protocol = protocol_for(args.units, args.noise, json.loads(args.readout) if args.readout else None)
    stopping = {"rival_test": True} if args.rival_test else {}
    if args.rival_lead is not None:
        stopping["rival_lead"] = args.rival_lead
    if args.evidence_margin is not None:
        stopping["evidence_margin"] = args.evidence_margin
    if stopping:
        protocol = protocol.model_copy(update={"stopping": protocol.stopping.model_copy(update=stopping)})
    base = PopulationComparison.from_protocol(protocol, 0)
    names = base.model_names
    sessions = []
    for s in range(args.sessions):
        index = s % len(names)
        if args.truth == "prior":
            grid = base.candidates[index].readout
            priors = [grid.prior(i) for i in range(grid.K)]  # noise levels at scale 1
            d_raw = priors[0].precision.shape[0] - 1
            component = int(np.argmin([abs(pr.precision[0] - d_raw / args.weight_sd ** 2)
                                       + abs(np.log(pr.b0 / (pr.a0 - 1 if pr.a0 > 1 else 1))) for pr in priors]))
            truth: Any = PriorTruth(base, index, component, 100 + s,
                                     tuple(x for x in args.steps.split(",") if x))
        else:
            extra = f",{args.extra}" if args.extra else ""
            truth = build_population_truth(protocol, f"{names[index]}:ev={args.ev},seed={100 + s}{extra}", base)
        sessions.append(run_session(base, truth, s, args.max_trials, args.gate, args.pixels))
    decided = [x for x in sessions if x["decided"]]
    out = {"settings": vars(args), "load_avg": os.getloadavg()[0], "seconds": round(time.perf_counter() - t0, 1),
           "sessions": len(sessions), "decided": len(decided), "wrong": sum(x["wrong"] for x in sessions),
           "median_trials_decided": float(np.median([x["trials"] for x in decided])) if decided else None,
           "blocked_trials": sum(x["blocked_trials"] for x in sessions),
           "wrong_by_truth": {n: sum(x["wrong"] for x in sessions if x["truth"] == n) for n in names},
           "wrong_leaders": [x["trace"][-1][0] + "<-" + x["truth"] for x in sessions if x["wrong"]],
           "wrong_sessions": [i for i, x in enumerate(sessions) if x["wrong"]],
           "calibration": calibration(sessions)}
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
