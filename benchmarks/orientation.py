"""Benchmark 3: orientation x contrast tuning, Poisson counts, 2-D continuous space, 3 models incl. the GP.

    python benchmarks/orientation.py --subjects 20 --timing-trials 500

Part 1: trials until P(true) >= 0.95 for the mutual-information design and random, per simulated
neuron (truth drawn from the von Mises model's prior, seeded). Part 2: decision time (perf_counter
around `propose`) p50/p95 at trials 10, 100 and 500 of a long session, from repeated proposals
at that exact posterior state. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retention_common import censored_median, dump, environment, percentile  # noqa: E402

from orchestrator.design import make_design  # noqa: E402
from orchestrator.inference import ModelComparison  # noqa: E402
from orchestrator.models import build_truth  # noqa: E402
from orchestrator.protocol import parse_protocol_text  # noqa: E402

ORIENTATION_YAML = """
name: orientation-contrast-benchmark
version: "1.0"
stimulus:
  type: grating
  parameters:
    orientation: {kind: continuous, low: 0, high: 180, units: deg}
    contrast: {kind: continuous, low: 0.02, high: 1.0, units: fraction, log: true}
response: {kind: poisson}
models:
  - name: von_mises
    builtin: orientation_contrast
    inputs: {theta: orientation, c: contrast}
    priors:
      baseline: {dist: gamma, shape: 2, rate: 1}
      rmax: {dist: gamma, shape: 4, rate: 0.2}
      kappa: {dist: lognormal, mu: 0.5, sigma: 0.5}
      pref: {dist: uniform, low: 0, high: 180}
      c50: {dist: lognormal, mu: -1.6, sigma: 0.5}
      n: {dist: lognormal, mu: 0.7, sigma: 0.3}
  - name: gaussian
    formula: "b + g * max(c - c0, 0) * exp(-0.5 * (min(abs(theta - pref), 180 - abs(theta - pref)) / w)**2)"
    inputs: {theta: orientation, c: contrast}
    priors:
      b: {dist: gamma, shape: 2, rate: 1}
      g: {dist: gamma, shape: 4, rate: 0.2}
      w: {dist: lognormal, mu: 3.0, sigma: 0.4}
      pref: {dist: uniform, low: 0, high: 180}
      c0: {dist: uniform, low: 0.0, high: 0.3}
  - name: gp
    builtin: gaussian_process
    prior_probability: 0.2
    settings: {link: exp}
design:
  strategy: mutual_information
  characterize_threshold: 0.99
stopping: {max_trials: 500}
safety:
  contrast: {min: 0.02, max: 1.0}
"""


def truth_for(protocol, seed: int) -> str:
    """A von Mises x Naka-Rushton neuron drawn from the model's prior (seeded), responsive enough to
    be a neuron one would record (peak rate >= 5 spikes per trial)."""
    rng = np.random.default_rng([seed, 77])
    while True:
        th = {"baseline": rng.gamma(2, 1), "rmax": rng.gamma(4, 5), "kappa": rng.lognormal(0.5, 0.5),
              "pref": rng.uniform(0, 180), "c50": rng.lognormal(-1.6, 0.5), "n": rng.lognormal(0.7, 0.3)}
        if th["rmax"] >= 5:
            return "von_mises:" + ",".join(f"{k}={v:.6g}" for k, v in th.items())


def trials_to(protocol, truth_spec: str, design: str, seed: int, crit: float, cap: int) -> tuple[int | None, list[float]]:
    truth = build_truth(protocol, truth_spec)
    comparison = ModelComparison.from_protocol(protocol, seed)
    strategy = make_design(protocol, seed, design)
    times = []
    for i in range(cap):
        t0 = time.perf_counter()
        d = strategy.propose(comparison, i)
        times.append((time.perf_counter() - t0) * 1000)
        comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([seed, i])))
        if comparison.probabilities()[truth.model_name] >= crit:
            return i + 1, times
    return None, times


def timing_session(protocol, truth_spec: str, seed: int, checkpoints: list[int], repeats: int) -> dict[str, dict]:
    """Run one long MI session; at each checkpoint time `repeats` proposals at that posterior state."""
    truth = build_truth(protocol, truth_spec)
    comparison = ModelComparison.from_protocol(protocol, seed)
    strategy = make_design(protocol, seed)
    out: dict[str, dict] = {}
    update_ms: list[float] = []
    for i in range(max(checkpoints)):
        d = strategy.propose(comparison, i)
        y = truth.sample(d.stimulus, np.random.default_rng([seed, i]))
        t1 = time.perf_counter()
        comparison.update(d.stimulus, y)
        update_ms.append((time.perf_counter() - t1) * 1000)
        n = i + 1
        if n in checkpoints:
            ts, cs = [], []
            for r in range(repeats):
                t0, c0 = time.perf_counter(), time.thread_time()
                dd = strategy.propose(comparison, n + r * 7919)
                ts.append((time.perf_counter() - t0) * 1000)
                cs.append((time.thread_time() - c0) * 1000)
            out[str(n)] = {"decision_ms_p50": round(percentile(ts, 50), 2), "decision_ms_p95": round(percentile(ts, 95), 2),
                           "decision_cpu_ms_p50": round(percentile(cs, 50), 2),
                           "decision_cpu_ms_p95": round(percentile(cs, 95), 2),
                           "strategy": dd.strategy, "update_ms_last10_p50": round(percentile(update_ms[-10:], 50), 2),
                           "probabilities": {k: round(v, 4) for k, v in comparison.probabilities().items()}}
            print(f"# timing at {n}: {out[str(n)]}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--cap-mi", type=int, default=100)
    ap.add_argument("--cap-random", type=int, default=300)
    ap.add_argument("--timing-trials", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: trials,timing")
    ap.add_argument("--design-settings", default="", help="YAML flow mapping merged into design.settings")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = ORIENTATION_YAML
    if args.design_settings:
        text = text.replace("  characterize_threshold: 0.99", f"  characterize_threshold: 0.99\n  settings: {args.design_settings}")
    protocol = parse_protocol_text(text, "<orientation benchmark>").protocol
    print(f"# design settings: {protocol.design.settings}", file=sys.stderr)
    out: dict = {"benchmark": "orientation-contrast", "models": [m.name for m in protocol.models],
                 "design_settings": dict(protocol.design.settings),
                 "criterion": "first trial with P(true) >= 0.95; never reached counts as cap + 1"}
    skip = set(filter(None, args.skip.split(",")))
    if "trials" not in skip:
        res: dict = {}
        per_subject = []
        for label, cap in (("mutual_information", args.cap_mi), ("random", args.cap_random)):
            vals, dec = [], []
            t0 = time.time()
            for s in range(args.subjects):
                spec = truth_for(protocol, args.seed + s)
                n, times = trials_to(protocol, spec, label, args.seed + s, 0.95, cap)
                vals.append(n)
                dec += times
                print(f"# {label} subject {s}: {n}  ({spec})", file=sys.stderr, flush=True)
            per_subject.append(vals)
            res[label] = {"median_trials_to_0.95": censored_median(vals, cap), "cap": cap,
                          "never_reached": sum(v is None for v in vals), "trials": vals,
                          "decision_ms_p50": round(percentile(dec, 50), 2), "decision_ms_p95": round(percentile(dec, 95), 2),
                          "wall_s": round(time.time() - t0, 1)}
        ratio = res["random"]["median_trials_to_0.95"] / res["mutual_information"]["median_trials_to_0.95"]
        paired = [((r if r is not None else args.cap_random + 1) / (m if m is not None else args.cap_mi + 1))
                  for m, r in zip(*per_subject)]
        res["random_over_mi_median_ratio"] = round(ratio, 2)
        res["random_over_mi_paired_median_ratio"] = round(statistics.median(paired), 2)
        out["trials_to_0.95"] = res
    if "timing" not in skip:
        cps = [c for c in (10, 100, 500) if c <= args.timing_trials]
        out["decision_time"] = timing_session(protocol, truth_for(protocol, args.seed), args.seed, cps, args.repeats)
    out["environment"] = environment()
    print(dump(out))


if __name__ == "__main__":
    main()
