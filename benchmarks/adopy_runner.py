"""ADOpy side of benchmark 4 - runs in ADOpy's own virtual environment (numpy < 1.24), not cloop's.

    /opt/adopy-venv/bin/python benchmarks/adopy_runner.py --replicates 10 --trials 60 --seed 4000

ADOpy's psychometric docs example: logistic, guess 0.5 and lapse 0.04 fixed, 120 stimulus levels,
200 x 200 (threshold, slope) grid. The simulated subject (threshold 20, slope 1.5) answers trial i with
numpy.random.default_rng([seed, i]).random() < p, exactly like cloop's simulated subject.
Prints one JSON object.
"""
import argparse
import json
import time

import numpy as np
from adopy.base import Engine
from adopy.tasks.psi import EnginePsi, ModelLogistic

GR, LR, TH, SL = 0.5, 0.04, 20.0, 1.5


def p_correct(x: float) -> float:
    return GR + (1 - GR - LR) / (1 + np.exp(-SL * (x - TH)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicates", type=int, default=10)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seed", type=int, default=4000)
    args = ap.parse_args()
    designs = {"stimulus": np.linspace(20 * np.log10(.05), 20 * np.log10(400), 120)}
    params = {"guess_rate": [0.5], "lapse_rate": [0.04],
              "threshold": np.linspace(20 * np.log10(.1), 20 * np.log10(200), 200),
              "slope": np.linspace(0, 10, 200)}
    sds, update_ms, design_ms, step_ms, step_cpu_ms = [], [], [], [], []
    t_build = time.perf_counter()
    engine = EnginePsi(model=ModelLogistic(), grid_design=designs, grid_param=params)
    build_s = time.perf_counter() - t_build
    for r in range(args.replicates):
        seed = args.seed + r
        engine.reset()
        for i in range(args.trials):
            t0, c0 = time.perf_counter(), time.process_time()
            # EnginePsi.get_design in adopy 0.4.1 returns the MI vector; the base class returns the design
            design = Engine.get_design(engine, "optimal")
            t1, c1 = time.perf_counter(), time.process_time()
            y = int(np.random.default_rng([seed, i]).random() < p_correct(design["stimulus"]))
            t2, c2 = time.perf_counter(), time.process_time()
            engine.update(design, {"choice": y})
            t3, c3 = time.perf_counter(), time.process_time()
            step_cpu_ms.append((c1 - c0 + c3 - c2) * 1000)
            design_ms.append((t1 - t0) * 1000)
            update_ms.append((t3 - t2) * 1000)
            step_ms.append((t1 - t0 + t3 - t2) * 1000)
        sd = engine.post_sd
        mean = engine.post_mean
        sds.append({"threshold_sd": float(sd["threshold"]), "threshold_mean": float(mean["threshold"]),
                    "slope_sd": float(sd["slope"]), "slope_mean": float(mean["slope"])})
    print(json.dumps({
        "engine": "adopy", "version": __import__("adopy").__version__, "numpy": np.__version__,
        "grid": {"designs": 120, "threshold": 200, "slope": 200}, "engine_build_s": round(build_s, 2),
        "replicates": sds,
        "threshold_sd_median": float(np.median([s["threshold_sd"] for s in sds])),
        "per_trial_ms_p50": float(np.percentile(step_ms, 50)), "per_trial_ms_p95": float(np.percentile(step_ms, 95)),
        "per_trial_cpu_ms_p50": float(np.percentile(step_cpu_ms, 50)),
        "update_ms_p50": float(np.percentile(update_ms, 50)), "get_design_ms_p50": float(np.percentile(design_ms, 50)),
    }))


if __name__ == "__main__":
    main()
