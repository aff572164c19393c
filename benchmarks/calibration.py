"""Benchmark 5: are the posterior model probabilities calibrated?

    python benchmarks/calibration.py --sessions 200

Each session draws its truth from the priors of the retention protocol (model from the prior model
probabilities 0.5/0.5, then its parameters from their priors), runs the mutual-information design
until some model reaches P >= --stop (0.95) or --max-trials, and records the winner. Among sessions
that stopped, the fraction whose winner is the true model should be >= 0.95 if probabilities are
calibrated (target >= 0.95). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retention_common import dump, environment, percentile, retention_protocol  # noqa: E402

from orchestrator.design import make_design  # noqa: E402
from orchestrator.inference import ModelComparison  # noqa: E402
from orchestrator.models import build_candidates, build_truth  # noqa: E402


def draw_truth(protocol, seed: int) -> str:
    """Model from the prior model probabilities, parameters from their priors (seeded)."""
    cands = build_candidates(protocol)
    rng = np.random.default_rng([seed, 55])
    probs = np.array([c.prior_probability for c in cands])
    cand = cands[int(rng.choice(len(cands), p=probs / probs.sum()))]
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    vals = {p: float(prior.sample(1, g)[0]) for p, prior in cand.priors.items()}
    return f"{cand.name}:" + ",".join(f"{k}={v:.10g}" for k, v in vals.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--stop", type=float, default=0.95)
    ap.add_argument("--max-trials", type=int, default=60)
    ap.add_argument("--design", default="mutual_information")
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    protocol = retention_protocol(args.design if args.design != "fixed" else "sweep")
    rows = []
    t0 = time.time()
    for s in range(args.sessions):
        seed = args.seed + s
        spec = draw_truth(protocol, seed)
        truth = build_truth(protocol, spec)
        comparison = ModelComparison.from_protocol(protocol, seed)
        design = make_design(protocol, seed)
        stopped, winner, p_win, n = False, None, None, 0
        for i in range(args.max_trials):
            d = design.propose(comparison, i)
            comparison.update(d.stimulus, truth.sample(d.stimulus, np.random.default_rng([seed, i])))
            n = i + 1
            name, p = comparison.leader()
            if p >= args.stop:
                stopped, winner, p_win = True, name, p
                break
        rows.append({"truth": spec, "stopped": stopped, "winner": winner, "p_winner": p_win, "trials": n,
                     "correct": stopped and winner == truth.model_name})
        print(f"# session {s}: {rows[-1]}", file=sys.stderr, flush=True)
    stopped = [r for r in rows if r["stopped"]]
    frac = sum(r["correct"] for r in stopped) / len(stopped) if stopped else math.nan
    # binomial standard error, to judge the 0.95 target
    se = math.sqrt(frac * (1 - frac) / len(stopped)) if stopped else math.nan
    out = {"benchmark": "calibration-retention", "sessions": args.sessions, "stop_at": args.stop,
           "max_trials": args.max_trials, "design": args.design,
           "stopped": len(stopped), "correct_among_stopped": sum(r["correct"] for r in stopped),
           "fraction_correct_among_stopped": round(frac, 4), "standard_error": round(se, 4),
           "mean_p_winner_at_stop": round(float(np.mean([r["p_winner"] for r in stopped])), 4) if stopped else None,
           "trials_to_stop_median": float(np.median([r["trials"] for r in stopped])) if stopped else None,
           "by_truth": {m: {"sessions": sum(r["truth"].startswith(m + ":") for r in rows),
                            "stopped": sum(r["truth"].startswith(m + ":") for r in stopped),
                            "correct": sum(r["correct"] for r in stopped if r["truth"].startswith(m + ":"))}
                        for m in ("power", "exponential")},
           "wall_s": round(time.time() - t0, 1), "environment": environment()}
    print(dump(out))


if __name__ == "__main__":
    main()
