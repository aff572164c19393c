"""Benchmark 1/2: trials to P(true) >= 0.95 / 0.99 on the Cavagnaro et al. (2010) retention setup.

    python benchmarks/retention.py --truth power --subjects 200
    python benchmarks/retention.py --truth exponential --subjects 200

Prints one JSON object: per design (mutual information, random, fixed lags) the median trials
to each criterion over the simulated subjects and the decision-time distribution.
Reference (exact 100x100-grid ADO): median 3 / 6 trials; random 35 / 51; fixed 6 / 10.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retention_common import (  # noqa: E402
    EXPONENTIAL_TRUTH, POWER_TRUTH, censored_median, dump, environment, percentile, retention_protocol, run_subject,
)

DESIGNS = {"mutual_information": "mutual_information", "random": "random", "fixed": "sweep"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", choices=["power", "exponential"], default="power")
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--designs", default="mutual_information,random,fixed")
    ap.add_argument("--max-trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    truth = POWER_TRUTH if args.truth == "power" else EXPONENTIAL_TRUTH
    out = {"benchmark": f"retention-{args.truth}", "truth": truth, "subjects": args.subjects,
           "max_trials": args.max_trials, "criterion": "first trial at which P(true model) >= c; "
           "never reached counts as max_trials + 1", "designs": {}}
    for label in args.designs.split(","):
        protocol = retention_protocol(DESIGNS[label])
        t0 = time.time()
        runs = [run_subject(protocol, truth, args.seed + s, args.max_trials) for s in range(args.subjects)]
        dec = [d for r in runs for d in r["decision_ms"]]
        upd = [u for r in runs for u in r["update_ms"]]
        res = {}
        for c in ("0.95", "0.99"):
            vals = [r["trials_to"][c] for r in runs]
            res[f"median_trials_to_{c}"] = censored_median(vals, args.max_trials)
            res[f"never_reached_{c}"] = sum(v is None for v in vals)
        res.update({
            "decision_ms_p50": round(percentile(dec, 50), 3), "decision_ms_p95": round(percentile(dec, 95), 3),
            "decision_ms_max": round(max(dec), 3),
            "update_ms_p50": round(percentile(upd, 50), 3), "update_ms_p95": round(percentile(upd, 95), 3),
            "trials_total": len(dec), "wall_s": round(time.time() - t0, 1),
        })
        out["designs"][label] = res
        print(f"# {label}: {res}", file=sys.stderr, flush=True)
    out["environment"] = environment()
    print(dump(out))


if __name__ == "__main__":
    main()
