"""Empty trials per second through one orchestrator serving 16 worker processes on loopback.

All trials are submitted up front (`RigServer.submit`); the server keeps `pipeline` trials in
flight per rig and dispatches the next one as each result arrives. Counts only completed trials
(every one goes through the full wire format, validation and result bookkeeping). Prints JSON.

    python benchmarks/transport_throughput.py [--workers 16] [--trials 30000] [--pipeline 4] [--curve]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time

from orchestrator.transport import RigServer
from transport_common import empty_trial, environment, make_keys, start_worker, stop_all


def measure(workers: int, trials: int, pipeline: int, curve: bool) -> dict[str, float | int | bool]:
    keys = make_keys(workers) if curve else None
    kw = {"keys_dir": keys} if curve else {"insecure": True}
    with RigServer("tcp://127.0.0.1:0", pipeline=pipeline, **kw) as srv:
        srv.set_session("bench", "x")
        procs = [start_worker(srv.endpoint, f"rig{n}", keys=keys) for n in range(workers)]
        try:
            srv.wait_for_rigs(["null"], workers, 120)
            concurrent.futures.wait([srv.submit(empty_trial(i)) for i in range(workers * 50)], timeout=120)
            base = workers * 50
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            futures = [srv.submit(empty_trial(base + i)) for i in range(trials)]
            concurrent.futures.wait(futures, timeout=600)  # one wake-up at the end, not one per trial
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0  # this process only: the orchestrator side
            outs = [f.result(timeout=0) for f in futures]
        finally:
            stop_all(procs)
    per_rig: dict[str, int] = {}
    for o in outs:
        per_rig[o.rig_id] = per_rig.get(o.rig_id, 0) + 1
    return {"workers": workers, "pipeline": pipeline, "curve": curve, "trials": trials,
            "seconds": round(elapsed, 3), "trials_per_s": round(trials / elapsed, 1),
            "rigs_used": len(per_rig), "min_trials_per_rig": min(per_rig.values()),
            "orchestrator_cpu_us_per_trial": round(cpu / trials * 1e6, 1),
            # what one fully available core would sustain for the orchestrator side alone
            "orchestrator_trials_per_cpu_second": round(trials / cpu, 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--trials", type=int, default=30000)
    ap.add_argument("--pipeline", type=int, nargs="*", default=[1, 2, 4])
    ap.add_argument("--curve", action="store_true", help="also measure with CurveZMQ")
    args = ap.parse_args()
    results = []
    for curve in ([False, True] if args.curve else [False]):
        for pipeline in args.pipeline:
            results.append(measure(args.workers, args.trials, pipeline, curve))
    print(json.dumps({"benchmark": "transport_throughput", "target": {"trials_per_s": 5000},
                      "autopilot_reference": {"messages_per_s": 1818}, "results": results,
                      "environment": environment()}, indent=2))


if __name__ == "__main__":
    main()
