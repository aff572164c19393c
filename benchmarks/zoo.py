"""Model discrimination on a zoo of small problems: cloop's default design vs exact grid ADO vs random.

Every problem is a protocol generated here (bernoulli / binomial / poisson / gaussian responses;
1-2 stimulus dimensions, discrete and continuous; 2-3 models with 1-3 parameters). Each simulated
subject has a truth model (cycling through the models) with parameters drawn from its prior, or -
for every second subject - drawn among the prior draws whose predictions lie closest to another
model's (the models' overlap, where discrimination is hardest). The three designs see the same
subjects and the same response seeds.

Per problem and design it reports: median trials until P(truth) >= .95 / .99 (sessions that never
get there count as cap + 1; cap 80 trials), confidently wrong sessions (P >= .95 on a wrong model at some trial),
decision times p50 / p95, and the calibration table: among sessions that would stop at .95 / .99
(the first trial some model reaches it), the fraction that picked the truth.

A fourth column, `particle`, is cloop's approximate path (SMC evidence and the BoTorch acquisition
over particle resamples, `design.settings: {exact: false, inference: smc}`), which the default
uses only when a model has more than 3 parameters or the grid tables do not fit.

`--diagnose` adds, for the particle path, the trial-by-trial gap between its log model odds and
the exact grid's on the same data, and the design regret: exact MI of the best candidate minus the
exact MI of the stimulus chosen - which of the two explains a gap to exact ADO.

    python benchmarks/zoo.py --quick          # 2 problems x 6 subjects, while developing
    python benchmarks/zoo.py --subjects 40    # the full zoo (prints one JSON document)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from orchestrator.design import make_design  # noqa: E402
from orchestrator.inference import ModelComparison  # noqa: E402
from orchestrator.models import build_candidates, build_truth  # noqa: E402
from orchestrator.models.space import StimulusEncoding  # noqa: E402
from orchestrator.protocol import parse_protocol_text  # noqa: E402

HEAD = 'name: {name}\nversion: "1"\nstimulus:\n  parameters:\n{params}\nresponse: {response}\nmodels:\n'


@dataclass(frozen=True)
class Problem:
    name: str
    params: str  # stimulus parameter lines
    response: str
    models: tuple[tuple[str, str, str], ...]  # (name, formula, priors flow mapping)
    cap: int = 80

    def protocol(self, settings: str = "{}") -> Any:
        text = HEAD.format(name=self.name, params=self.params, response=self.response)
        for name, formula, priors in self.models:
            text += f'  - name: {name}\n    formula: "{formula}"\n    priors: {priors}\n'
        text += (f"design: {{strategy: mutual_information, settings: {settings}}}\n"
                 f"stopping: {{max_trials: {self.cap}}}\n")
        return parse_protocol_text(text).protocol


SIGMA = "noise_sd: {dist: gamma, shape: 4, rate: 8}"
ZOO: tuple[Problem, ...] = (
    Problem("poisson_int_saturation", "    x: {kind: integer, low: 0, high: 99}", "{kind: poisson}", (
        ("hyperbolic", "g * x / (x + k) + 0.5", "{g: {dist: gamma, shape: 6, rate: 0.2}, "
                                               "k: {dist: lognormal, mu: 2.5, sigma: 0.7}}"),
        ("exponential", "g * (1 - exp(-x / k)) + 0.5", "{g: {dist: gamma, shape: 6, rate: 0.2}, "
                                                       "k: {dist: uniform, low: 1, high: 60}}"))),
    Problem("binomial_int_three_curves", "    lag: {kind: integer, low: 0, high: 60}", "{kind: binomial, n: 10}", (
        ("power", "a * (lag + 1) ** (-b)", "{a: {dist: beta, alpha: 2, beta: 1}, b: {dist: beta, alpha: 1, beta: 4}}"),
        ("exponential", "a * exp(-b * lag)", "{a: {dist: beta, alpha: 2, beta: 1}, "
                                             "b: {dist: beta, alpha: 1, beta: 40}}"),
        ("hyperbolic", "a / (1 + b * lag)", "{a: {dist: beta, alpha: 2, beta: 1}, "
                                            "b: {dist: beta, alpha: 1, beta: 10}}"))),
    Problem("bernoulli_int_one_param", "    x: {kind: integer, low: 0, high: 30}", "{kind: bernoulli}", (
        ("steep", "0.02 + 0.96 * sigmoid(x - m)", "{m: {dist: uniform, low: 5, high: 25}}"),
        ("shallow", "0.02 + 0.96 * sigmoid((x - m) / 4)", "{m: {dist: uniform, low: 5, high: 25}}"))),
    Problem("poisson_2d_int", "    a: {kind: integer, low: 0, high: 7}\n    b: {kind: integer, low: 0, high: 7}",
            "{kind: poisson}", (
                ("additive", "1 + u * a + v * b", "{u: {dist: gamma, shape: 2, rate: 2}, "
                                                  "v: {dist: gamma, shape: 2, rate: 2}}"),
                ("multiplicative", "1 + w * (a + 1) * (b + 1) / 8", "{w: {dist: gamma, shape: 2, rate: 1}}"))),
    Problem("gaussian_cont_three_params", "    x: {kind: continuous, low: 0, high: 1}", "{kind: gaussian}", (
        ("linear", "b0 + b1 * x", "{b0: {dist: normal, mean: 0, sd: 1}, b1: {dist: normal, mean: 2, sd: 1}, "
                                  + SIGMA + "}"),
        ("sqrt", "b0 + b1 * sqrt(x)", "{b0: {dist: normal, mean: 0, sd: 1}, b1: {dist: normal, mean: 2, sd: 1}, "
                                      + SIGMA + "}"))),
    Problem("bernoulli_cont_log_axis", "    c: {kind: continuous, low: 0.01, high: 1, log: true}", "{kind: bernoulli}", (
        ("weibull", "0.5 + 0.48 * (1 - exp(-((c / t) ** s)))", "{t: {dist: lognormal, mu: -2, sigma: 0.6}, "
                                                               "s: {dist: lognormal, mu: 1, sigma: 0.3}}"),
        ("logistic", "0.5 + 0.48 * sigmoid(s * (log(c) - log(t)))", "{t: {dist: lognormal, mu: -2, sigma: 0.6}, "
                                                                    "s: {dist: lognormal, mu: 1, sigma: 0.3}}")),
            ),
    Problem("binomial_2d_cont_int", "    d: {kind: continuous, low: 0, high: 10}\n    r: {kind: integer, low: 1, high: 5}",
            "{kind: binomial, n: 5}", (
                ("hyperbolic", "sigmoid(t * (r / (1 + k * d) - 2))",
                 "{k: {dist: lognormal, mu: -1, sigma: 0.8}, t: {dist: lognormal, mu: 0.5, sigma: 0.4}}"),
                ("exponential", "sigmoid(t * (r * exp(-k * d) - 2))",
                 "{k: {dist: lognormal, mu: -1.5, sigma: 0.8}, t: {dist: lognormal, mu: 0.5, sigma: 0.4}}"))),
)


# -------------------------------------------------------------------------------- subjects
def _prior_draws(cand: Any, n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: cand.priors[p].sample(n, gen) for p in cand.free_params}


def subjects(protocol: Any, n: int, seed: int = 0) -> list[str]:
    """Truth specs: model i % M; even subjects from the prior, odd ones from the overlap."""
    cands = build_candidates(protocol)
    space = StimulusEncoding(protocol)
    X = space.design_to_raw(space.random_design(np.random.default_rng(seed), 256))
    pools: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
    for c in cands:
        th = _prior_draws(c, 2000, seed + 17 * c.index)
        pools[c.index] = (th, c.mean(X, th))
    out = []
    for s in range(n):
        c = cands[s % len(cands)]
        th, means = pools[c.index]
        rng = np.random.default_rng([seed, s])
        if s % 2 == 0:
            j = int(rng.integers(th[c.free_params[0]].shape[0]))
        else:  # overlap: the 10% of draws predicting closest to some draw of another model
            other = cands[(c.index + 1) % len(cands)]
            om = pools[other.index][1][:500]
            dist = torch.cdist(means.float(), om.float()).min(1).values
            near = torch.argsort(dist)[: max(1, dist.shape[0] // 10)]
            j = int(near[int(rng.integers(near.shape[0]))])
        vals = ",".join(f"{p}={float(th[p][j]):.6g}" for p in c.free_params)
        out.append(f"{c.name}:{vals}")
    return out


# -------------------------------------------------------------------------------- sessions
def run_session(protocol: Any, truth_spec: str, design: str | None, seed: int, cap: int,
                diagnose: bool = False) -> dict[str, Any]:
    truth = build_truth(protocol, truth_spec)
    comparison = ModelComparison.from_protocol(protocol, seed)
    strategy = make_design(protocol, seed, design)
    ref = ModelComparison.from_protocol(protocol, seed, "grid") if diagnose and not comparison.exact else None
    oracle = make_design(protocol, seed, "exact_grid") if ref is not None else None
    rec: dict[str, Any] = {"t95": cap + 1, "t99": cap + 1, "stop95": None, "stop99": None, "wrong95": False,
                           "decision_ms": [], "decision_cpu_ms": [], "odds_gap": [], "regret": []}
    for i in range(cap):
        t0, c0 = time.perf_counter(), time.thread_time()
        d = strategy.propose(comparison, i)
        rec["decision_ms"].append((time.perf_counter() - t0) * 1000)
        rec["decision_cpu_ms"].append((time.thread_time() - c0) * 1000)
        if oracle is not None and ref is not None:
            mi, _, _ = oracle.scores(ref)
            z = strategy.space.stimulus_to_design(d.stimulus)
            near = int(torch.argmin(((oracle._Z - z) ** 2).sum(-1)))
            rec["regret"].append(float(mi.max() - mi[near]))
        y = truth.sample(d.stimulus, np.random.default_rng([seed, i]))
        comparison.update(d.stimulus, y)
        probs = comparison.probabilities()
        if ref is not None:
            ref.update(d.stimulus, y)
            a, b = comparison.log_probabilities(), ref.log_probabilities()
            rec["odds_gap"].append(float((a - b).abs().max()))
        pt = probs[truth.model_name]
        lead, pl = max(probs.items(), key=lambda kv: kv[1])
        if pt >= 0.95 and rec["t95"] > cap:
            rec["t95"] = i + 1
        if pt >= 0.99 and rec["t99"] > cap:
            rec["t99"] = i + 1
        if pl >= 0.95 and rec["stop95"] is None:
            rec["stop95"] = lead == truth.model_name
        if pl >= 0.99 and rec["stop99"] is None:
            rec["stop99"] = lead == truth.model_name
        if any(p >= 0.95 for m, p in probs.items() if m != truth.model_name):
            rec["wrong95"] = True
        if rec["t99"] <= cap and rec["stop99"] is not None and not diagnose:
            break
    return rec


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summarise(recs: list[dict[str, Any]]) -> dict[str, Any]:
    ms = [m for r in recs for m in r["decision_ms"]]
    cpu = [m for r in recs for m in r["decision_cpu_ms"]]
    out: dict[str, Any] = {
        "median_trials_95": statistics.median(r["t95"] for r in recs),
        "median_trials_99": statistics.median(r["t99"] for r in recs),
        "mean_trials_95": statistics.mean(r["t95"] for r in recs),
        "mean_trials_99": statistics.mean(r["t99"] for r in recs),
        "reached_95": sum(r["t95"] <= len(r["decision_ms"]) for r in recs),
        "confidently_wrong": sum(r["wrong95"] for r in recs),
        "decision_ms_p50": _pct(ms, 50), "decision_ms_p95": _pct(ms, 95),
        "decision_cpu_ms_p50": _pct(cpu, 50), "decision_cpu_ms_p95": _pct(cpu, 95),
    }
    for lvl in ("95", "99"):
        cal: dict[str, Any] = {}
        for label, group in (("all", recs), ("prior_truths", recs[0::2]), ("overlap_truths", recs[1::2])):
            stopped = [r[f"stop{lvl}"] for r in group if r[f"stop{lvl}"] is not None]
            cal[label] = {"stopped": len(stopped), "fraction_correct": (sum(stopped) / len(stopped)) if stopped else None}
        out[f"calibration_{lvl}"] = {**cal["all"], "prior_truths": cal["prior_truths"],
                                     "overlap_truths": cal["overlap_truths"]}
    gaps = [g for r in recs for g in r["odds_gap"]]
    if gaps:
        out["diagnosis"] = {"log_prob_gap_vs_grid_median": _pct(gaps, 50), "log_prob_gap_vs_grid_p95": _pct(gaps, 95),
                            "design_regret_nats_median": _pct([g for r in recs for g in r["regret"]], 50),
                            "design_regret_nats_p95": _pct([g for r in recs for g in r["regret"]], 95)}
    return out


def run_problem(problem: Problem, n_subjects: int, designs: list[str], diagnose: bool,
                particle_subjects: int | None = None) -> dict[str, Any]:
    protocol = problem.protocol()
    #: the particle path (SMC evidence, BoTorch MI over particle resamples), which the default
    #: replaces by the exact grid on problems like these
    particle = problem.protocol("{exact: false, inference: smc}")
    truths = subjects(protocol, n_subjects)
    default = type(make_design(protocol, 0)).__name__
    out: dict[str, Any] = {"default_design_class": default, "exact_by_default": default == "ExactGridDesign",
                           "cap": problem.cap, "subjects": n_subjects}
    for design in designs:
        if design == "exact_grid" and out["exact_by_default"] and "default" in out:
            # the default is this very design (same class, settings and seeds): identical sessions
            out[design] = {**out["default"], "same_sessions_as_default": True}
            continue
        proto = particle if design == "particle" else protocol
        name = None if design in ("default", "particle") else design
        subset = truths[: particle_subjects] if design == "particle" and particle_subjects else truths
        recs = [run_session(proto, t, name, 1000 + s, problem.cap, diagnose and design == "particle")
                for s, t in enumerate(subset)]
        out[design] = {**summarise(recs), "subjects": len(recs)}
        print(f"{problem.name} {design}: {json.dumps(out[design])}", file=sys.stderr, flush=True)
    d, g = out.get("default"), out.get("exact_grid")
    if d and g:
        out["targets"] = {
            "within_one_trial_95": d["median_trials_95"] <= g["median_trials_95"] + 1,
            "within_one_trial_99": d["median_trials_99"] <= g["median_trials_99"] + 1,
            "confidently_wrong_ok": d["confidently_wrong"] <= g["confidently_wrong"] + math.ceil(n_subjects / 40),
            "decision_p95_ok": d["decision_ms_p95"] <= max(0.5 * g["decision_ms_p50"], 20.0),
            "decision_cpu_p95_ok": d["decision_cpu_ms_p95"] <= max(0.5 * g["decision_cpu_ms_p50"], 20.0),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="2 problems x 6 subjects")
    ap.add_argument("--problems", default="", help="comma-separated problem names (default: all)")
    ap.add_argument("--designs", default="default,exact_grid,random,particle")
    ap.add_argument("--diagnose", action="store_true", help="evidence gap and design regret vs the grid")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--particle-subjects", type=int, default=None,
                    help="subjects for the (slow) particle column; default: all")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    chosen = [p for p in ZOO if not args.problems or p.name in args.problems.split(",")]
    n = args.subjects
    if args.quick:
        chosen = [p for p in chosen if p.name in ("poisson_int_saturation", "gaussian_cont_three_params")] or chosen[:2]
        n = 6
    t0 = time.time()
    results = {p.name: run_problem(p, n, args.designs.split(","), args.diagnose, args.particle_subjects)
               for p in chosen}
    print(json.dumps({"benchmark": "zoo", "subjects": n, "threads": args.threads,
                      "machine": {"cpus": os.cpu_count(), "load_1min": os.getloadavg()[0],
                                  "python": platform.python_version(), "torch": torch.__version__},
                      "wall_s": round(time.time() - t0, 1), "problems": results}, indent=1))


if __name__ == "__main__":
    main()
