"""Benchmark 4: parameter estimation vs ADOpy on ADOpy's psychometric docs example, in the same run.

    python benchmarks/adopy_compare.py --replicates 10 --trials 60 [--adopy-python /opt/adopy-venv/bin/python]

Logistic psychometric function, guess 0.5 and lapse 0.04 fixed, true threshold 20, slope 1.5;
stimulus range and parameter ranges as ADOpy's example grid (stimulus 20log10(.05)..20log10(400) dB,
threshold 20log10(.1)..20log10(200), slope 0..10, uniform priors). cloop characterizes the logistic
model with its parameter-information acquisition (continuous stimulus, optimize_acqf) and SMC
posterior; ADOpy uses its own 120 x 200 x 200 grid engine, run in its own virtualenv (it needs
numpy < 1.24): create it with
    python3 -m venv /opt/adopy-venv && /opt/adopy-venv/bin/pip install 'numpy<1.24' adopy
Reports posterior SD of the threshold after --trials trials and time per trial (design + update);
both sides single-threaded, same simulated subject (responses from numpy default_rng([seed, i])).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from retention_common import dump, environment, percentile  # noqa: E402

from orchestrator.design import make_design  # noqa: E402
from orchestrator.inference import ModelComparison  # noqa: E402
from orchestrator.models import build_truth  # noqa: E402
from orchestrator.protocol import parse_protocol_text  # noqa: E402

LO_X, HI_X = 20 * math.log10(0.05), 20 * math.log10(400)
LO_TH, HI_TH = 20 * math.log10(0.1), 20 * math.log10(200)
PSI_YAML = f"""
name: psychometric-adopy-example
version: "1.0"
stimulus:
  parameters:
    x: {{kind: continuous, low: {LO_X:.6f}, high: {HI_X:.6f}, units: dB}}
response: {{kind: bernoulli}}
models:
  - name: logistic
    builtin: psychometric_logistic
    settings: {{fixed: {{guess: 0.5, lapse: 0.04}}}}
    priors:
      threshold: {{dist: uniform, low: {LO_TH:.6f}, high: {HI_TH:.6f}}}
      slope: {{dist: uniform, low: 0, high: 10}}
  - name: probit
    builtin: psychometric_cumulative_normal
    settings: {{fixed: {{guess: 0.5, lapse: 0.04}}}}
    priors:
      threshold: {{dist: uniform, low: {LO_TH:.6f}, high: {HI_TH:.6f}}}
      slope: {{dist: uniform, low: 0, high: 10}}
design:
  strategy: parameter_estimation
  settings: {{model: logistic}}
stopping: {{max_trials: 60}}
"""
TRUTH = "logistic:threshold=20,slope=1.5"


def run_cloop(replicates: int, trials: int, seed: int) -> dict:
    protocol = parse_protocol_text(PSI_YAML, "<adopy benchmark>").protocol
    truth = build_truth(protocol, TRUTH)
    reps, step_ms, step_cpu, upd_ms, dec_ms = [], [], [], [], []
    for r in range(replicates):
        s = seed + r
        comparison = ModelComparison.from_protocol(protocol, s)
        design = make_design(protocol, s)
        for i in range(trials):
            t0, c0 = time.perf_counter(), time.thread_time()
            d = design.propose(comparison, i)
            t1, c1 = time.perf_counter(), time.thread_time()
            y = truth.sample(d.stimulus, np.random.default_rng([s, i]))
            t2, c2 = time.perf_counter(), time.thread_time()
            comparison.update(d.stimulus, y)
            t3, c3 = time.perf_counter(), time.thread_time()
            dec_ms.append((t1 - t0) * 1000)
            upd_ms.append((t3 - t2) * 1000)
            step_ms.append((t1 - t0 + t3 - t2) * 1000)
            step_cpu.append((c1 - c0 + c3 - c2) * 1000)
        p = comparison.summary()["logistic"]["params"]
        reps.append({"threshold_sd": p["threshold"]["sd"], "threshold_mean": p["threshold"]["mean"],
                     "slope_sd": p["slope"]["sd"], "slope_mean": p["slope"]["mean"]})
    return {"engine": "cloop", "replicates": reps,
            "threshold_sd_median": statistics.median(x["threshold_sd"] for x in reps),
            "per_trial_ms_p50": percentile(step_ms, 50), "per_trial_ms_p95": percentile(step_ms, 95),
            "per_trial_cpu_ms_p50": percentile(step_cpu, 50),
            "update_ms_p50": percentile(upd_ms, 50), "decision_ms_p50": percentile(dec_ms, 50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=10)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seed", type=int, default=4000)
    ap.add_argument("--adopy-python", default="/opt/adopy-venv/bin/python")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not Path(args.adopy_python).exists():
        sys.exit(f"error: ADOpy's interpreter {args.adopy_python} not found; create it with\n"
                 "  python3 -m venv /opt/adopy-venv && /opt/adopy-venv/bin/pip install 'numpy<1.24' adopy")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runner = Path(__file__).resolve().parent / "adopy_runner.py"
    adopy_proc = subprocess.run([args.adopy_python, str(runner), "--replicates", str(args.replicates),
                                 "--trials", str(args.trials), "--seed", str(args.seed)],
                                capture_output=True, text=True, env=env, check=True)
    adopy = json.loads(adopy_proc.stdout)
    cloop = run_cloop(args.replicates, args.trials, args.seed)
    out = {"benchmark": "parameter-estimation-vs-adopy", "truth": TRUTH, "trials": args.trials,
           "replicates": args.replicates, "adopy": adopy, "cloop": cloop,
           "time_ratio_cloop_over_adopy_wall_p50": round(cloop["per_trial_ms_p50"] / adopy["per_trial_ms_p50"], 4),
           "time_ratio_cloop_over_adopy_cpu_p50": round(cloop["per_trial_cpu_ms_p50"] / adopy["per_trial_cpu_ms_p50"], 4),
           "threshold_sd_ratio_cloop_over_adopy": round(cloop["threshold_sd_median"] / adopy["threshold_sd_median"], 4),
           "environment": environment()}
    print(dump(out))


if __name__ == "__main__":
    main()
