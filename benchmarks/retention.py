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

DESIGNS = {"mutual_information": "mutual_information", "random": "random", "fixed": "sweep", "grid_ado": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--truth", choices=["power", "exponential"], default="power")
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--designs", default="mutual_information,grid_ado,random,fixed")
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
        t0 = time.time()
        if label == "grid_ado":  # the exact-grid reference, same subjects and response streams
            from orchestrator.models import build_truth
            from retention_grid_ado import GridADO, run_subject_grid

            engine, subject = GridADO(), build_truth(retention_protocol(), truth)
            runs = [run_subject_grid(engine, subject, args.seed + s, args.max_trials) for s in range(args.subjects)]
        else:
            protocol = retention_protocol(DESIGNS[label])
            runs = [run_subject(protocol, truth, args.seed + s, args.max_trials) for s in range(args.subjects)]
        dec = [d for r in runs for d in r["decision_ms"]]
        cpu = [d for r in runs for d in r["decision_cpu_ms"]]
        upd = [u for r in runs for u in r["update_ms"]] or [float("nan")]
        res = {}
        for c in ("0.95", "0.99"):
            vals = [r["trials_to"][c] for r in runs]
            res[f"median_trials_to_{c}"] = censored_median(vals, args.max_trials)
            res[f"never_reached_{c}"] = sum(v is None for v in vals)
            res[f"mean_trials_to_{c}"] = round(sum(v if v is not None else args.max_trials + 1 for v in vals) / len(vals), 2)
            res[f"trials_to_{c}_per_subject"] = "".join(f"{v if v is not None else 0}," for v in vals).rstrip(",")
        res.update({
            "decision_ms_p50": round(percentile(dec, 50), 3), "decision_ms_p95": round(percentile(dec, 95), 3),
            "decision_ms_max": round(max(dec), 3),
            "decision_cpu_ms_p50": round(percentile(cpu, 50), 3), "decision_cpu_ms_p95": round(percentile(cpu, 95), 3),
            "update_ms_p50": round(percentile(upd, 50), 3), "update_ms_p95": round(percentile(upd, 95), 3),
            "trials_total": len(dec), "wall_s": round(time.time() - t0, 1),
        })
        out["designs"][label] = res
        print(f"# {label}: {res}", file=sys.stderr, flush=True)
    out["environment"] = environment()
    print(dump(out))


if __name__ == "__main__":
    main()
