"""Population benchmark: trials to P(true model) >= .99 and wrong decisions per design.

Simulated populations (orchestrator.neural.truth) answer 32 x 32 grey images with Poisson counts;
the truth rotates over the candidates, seeds are fixed. Cells:

- ``standard``: Gabor energy vs two seeded CNNs, explainable variance ``ev``;
- ``near_miss``: a CNN vs the same CNN with its weights mixed 0.95 with fresh ones (and Gabor);
- ``saturating`` / ``sparse`` / ``softplus_link``: misspecified truths (tanh-saturating units;
  8-feature readouts; counts linear on the rate scale instead of the square-root scale).

Designs: population_synthesis (trust region), population_pool (best of the 1,000-image pool),
population_random_pool, population_random_noise. A session declares the leader at P >= .99 only
when its held-out predictive check passes and its trial-by-trial lead over every rival exceeds
stopping.rival_lead standard errors, and P(leader) still reaches .99 with each rival's evidence gap
cut by stopping.evidence_margin standard errors (PopulationComparison.declaration_blocker;
``--rival-lead 0 --evidence-margin 0`` measures the check alone). The design costs are
benchmarks/population_costs.py.

    python benchmarks/population.py [--sessions 4] [--max-trials 80] [--quick] [--cells near_miss,standard:100]
                                    [--jobs 2] [--rival-lead 1] [--evidence-margin 0] > population.json

Per design, ``median_trials_to_99`` is over the sessions that decided correctly;
``median_trials_censored`` counts an undecided or wrong session as ``--max-trials`` (a lower bound
on the median trials to a correct decision, comparable across designs when some never decide);
``own_check_only`` gives the same figures for the same sessions had the predictive check alone
gated the declaration.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from orchestrator.design import make_design
from orchestrator.neural.comparison import PopulationComparison
from orchestrator.neural.truth import build_population_truth
from population_common import CNN_A, CNN_B, GABOR, NEAR, SYNTH, protocol_for

DESIGNS = ["population_synthesis", "population_pool", "population_random_pool", "population_random_noise"]


def run_session(protocol: Any, base: PopulationComparison, truth_spec: str, design_name: str, seed: int,
                max_trials: int) -> dict[str, Any]:
    comparison = base.fresh(seed)
    truth = build_population_truth(protocol, truth_spec, base)
    design = make_design(protocol, seed, design_name)
    trace, decision_ms, distance = [], [], []
    # per trial: leader, P, check passes, least rival lead, P discounted by one standard error
    steps: list[tuple[str, float, bool, float | None, float | None]] = []
    own_check_only: tuple[int, str] | None = None  # where the predictive check alone would have declared
    for i in range(max_trials):
        t0 = time.perf_counter()
        d = design.propose(comparison, i)
        decision_ms.append((time.perf_counter() - t0) * 1000)
        distance.append(d.info.get("pool_distance", 0.0))
        y = protocol.response.validate({"value": truth.sample(d.stimulus, np.random.default_rng([seed, i]), pixels=d.pixels)})
        comparison.update(d.stimulus, y, pixels=d.pixels / 255.0)
        probs = comparison.probabilities()
        leader, p = max(probs.items(), key=lambda kv: kv[1])
        trace.append((leader, p))
        check_passes = comparison.checks[comparison.model_names.index(leader)].blocker() is None
        least_lead = min((comparison.rivals.advantage(leader, r) for r in comparison.model_names if r != leader),
                         default=float("nan"))
        discounted = comparison.rivals.discounted_probability(leader, comparison.log_probabilities().tolist(), 1.0)
        steps.append((leader, round(p, 6), check_passes, None if np.isnan(least_lead) else round(least_lead, 4),
                      None if np.isnan(discounted) else float(discounted)))
        if p >= 0.99 and i + 1 >= 3:
            if own_check_only is None and check_passes:
                own_check_only = (i + 1, leader)
            if comparison.declaration_blocker(leader) is None:
                break
    leader, p = trace[-1]
    decided = p >= 0.99 and comparison.declaration_blocker(leader) is None
    return {"truth": truth.model_name, "trials": len(trace), "decided": decided,
            "wrong": decided and leader != truth.model_name, "trace": trace,
            "own_check_only": None if own_check_only is None else
            {"trials": own_check_only[0], "wrong": own_check_only[1] != truth.model_name},
            "decision_ms_median": float(np.median(decision_ms)), "pool_distance_mean": float(np.mean(distance)),
            "steps": steps}


def _own_check_only(sessions: list[dict[str, Any]], max_trials: int) -> dict[str, Any]:
    """The same sessions' figures had the leader been declared once its predictive check passed,
    without the trial-level gate (the sessions are identical up to that trial, so one run measures both)."""
    rows = [x["own_check_only"] for x in sessions]
    right = [r["trials"] for r in rows if r is not None and not r["wrong"]]
    censored = [r["trials"] if r is not None and not r["wrong"] else max_trials for r in rows]
    return {"median_trials_to_99": float(np.median(right)) if right else None,
            "median_trials_censored": float(np.median(censored)),
            "undecided": sum(r is None for r in rows), "wrong": sum(r is not None and r["wrong"] for r in rows)}


def _cell_key(cell: dict[str, Any]) -> str:
    return f"{cell['cell']}:{cell['units']}"


def cells(quick: bool, only: str = "") -> list[dict[str, Any]]:
    out = [{"cell": "standard", "units": 20, "ev": 0.3, "models": [GABOR, CNN_A, CNN_B], "truth_extra": ""},
           {"cell": "near_miss", "units": 20, "ev": 0.1, "models": [CNN_A, NEAR], "truth_extra": ""},
           {"cell": "standard", "units": 100, "ev": 0.1, "models": [GABOR, CNN_A, CNN_B], "truth_extra": ""},
           {"cell": "saturating", "units": 20, "ev": 0.3, "models": [GABOR, CNN_A, CNN_B], "truth_extra": ",saturation=1"},
           {"cell": "sparse", "units": 20, "ev": 0.3, "models": [GABOR, CNN_A, CNN_B], "truth_extra": ",sparse=8"},
           {"cell": "softplus_link", "units": 20, "ev": 0.3, "models": [GABOR, CNN_A, CNN_B], "truth_extra": ",softplus=1"}]
    if only:
        wanted = only.split(",")
        unknown = [w for w in wanted if not any(w in (c["cell"], _cell_key(c)) for c in out)]
        if unknown:
            raise SystemExit(f"--cells: unknown cell {unknown[0]!r}; cells: {', '.join(_cell_key(c) for c in out)}")
        return [c for c in out if c["cell"] in wanted or _cell_key(c) in wanted]
    return out[:2] if quick else out


_CELL_CACHE: dict[str, tuple[Any, PopulationComparison]] = {}


def _cell_session(job: tuple[dict[str, Any], str, int, int, dict[str, float]]) -> dict[str, Any]:
    """One session of one cell and design (a process-pool job: builds its own protocol and comparison);
    `stopping` overrides the protocol's stopping fields it names."""
    cell, design, s, max_trials, stopping = job
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    key = f"{_cell_key(cell)}:{sorted(stopping.items())}"
    if key not in _CELL_CACHE:  # the pool's features are computed once per cell and process
        protocol = protocol_for(cell["models"], cell["units"])
        if stopping:
            protocol = protocol.model_copy(update={"stopping": protocol.stopping.model_copy(update=stopping)})
        _CELL_CACHE[key] = (protocol, PopulationComparison.from_protocol(protocol, 0))
    protocol, base = _CELL_CACHE[key]
    names = [m["name"] for m in cell["models"]]
    truth = f"{names[s % len(names)]}:ev={cell['ev']},seed={100 + s}{cell['truth_extra']}"
    return run_session(protocol, base, truth, design, s, max_trials)


def calibration(sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leader probability after every trial vs how often the leader was the truth."""
    edges = [0.5, 0.7, 0.9, 0.99, 1.0001]
    rows = []
    pairs = [(p, leader == s["truth"]) for s in sessions for leader, p in s["trace"]]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [ok for p, ok in pairs if lo <= p < hi]
        if sel:
            rows.append({"p_leader": f"[{lo}, {min(hi, 1.0)})", "n": len(sel), "leader_is_truth": round(float(np.mean(sel)), 3)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4, help="sessions per cell and design")
    parser.add_argument("--first-session", type=int, default=0,
                        help="index of the first session (its seeds and truth); later indices give sessions not yet seen")
    parser.add_argument("--max-trials", type=int, default=80)
    parser.add_argument("--sessions-out", default="",
                        help="write every session here as JSON lines (truth; per trial the leader, P, check, least "
                             "rival lead, P discounted by one standard error): a run with strict gates lets any "
                             "laxer rule be evaluated from it")
    parser.add_argument("--quick", action="store_true", help="two cells only")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--cells", default="", help="comma-separated cells (name or name:units); default all")
    parser.add_argument("--jobs", type=int, default=1, help="sessions run in this many processes")
    parser.add_argument("--rival-lead", type=float, default=None,
                        help="stopping.rival_lead for every session (default: the protocol's, 1.5; 0 = no lead gate)")
    parser.add_argument("--evidence-margin", type=float, default=None,
                        help="stopping.evidence_margin for every session (default: the protocol's, 1; 0 = none)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0]},
                              "settings": {"sessions_per_cell": args.sessions, "first_session": args.first_session,
                                           "max_trials": args.max_trials,
                                           "jobs": args.jobs, "rival_lead": args.rival_lead,
                                           "evidence_margin": args.evidence_margin,
                                           "synthesis": SYNTH, "pool_images": 1000, "image": [32, 32]},
                              "cells": []}
    all_sessions = []
    selected = cells(args.quick, args.cells)
    designs = args.designs.split(",")
    indices = range(args.first_session, args.first_session + args.sessions)
    stopping = {k: v for k, v in (("rival_lead", args.rival_lead), ("evidence_margin", args.evidence_margin))
                if v is not None}
    jobs = [(cell, design, s, args.max_trials, stopping)
            for cell in selected for design in designs for s in indices]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            done = list(pool.map(_cell_session, jobs))
    else:
        done = [_cell_session(job) for job in jobs]
    by_job = {(_cell_key(cell), design, s): out for (cell, design, s, *_), out in zip(jobs, done)}
    for cell in selected:
        row: dict[str, Any] = {k: cell[k] for k in ("cell", "units", "ev")}
        row["models"] = [m["name"] for m in cell["models"]]
        for design in designs:
            sessions = [by_job[(_cell_key(cell), design, s)] for s in indices]
            all_sessions.extend(sessions)
            decided = [x["trials"] for x in sessions if x["decided"] and not x["wrong"]]
            censored = [x["trials"] if x["decided"] and not x["wrong"] else args.max_trials for x in sessions]
            row[design] = {"sessions": len(sessions), "median_trials_to_99": float(np.median(decided)) if decided else None,
                           "median_trials_censored": float(np.median(censored)),
                           "undecided": sum(not x["decided"] for x in sessions),
                           "wrong": sum(x["wrong"] for x in sessions),
                           "decision_ms_median": round(float(np.median([x["decision_ms_median"] for x in sessions])), 1),
                           "pool_distance_mean": round(float(np.mean([x["pool_distance_mean"] for x in sessions])), 4),
                           "own_check_only": _own_check_only(sessions, args.max_trials)}
            print(json.dumps({"progress": row["cell"], "units": row["units"], "design": design, **row[design]}), file=sys.stderr)
        result["cells"].append(row)
    if args.sessions_out:
        with open(args.sessions_out, "w") as fh:
            for (cell, design, s, *_), out in zip(jobs, done):
                fh.write(json.dumps({"cell": _cell_key(cell), "design": design, "session": s,
                                     **{k: out[k] for k in ("truth", "trials", "decided", "wrong", "steps")}}) + "\n")
    result["calibration"] = calibration(all_sessions)
    result["machine"]["load_avg_end"] = os.getloadavg()[0]
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
