"""Round trip of an empty trial, orchestrator -> worker process -> orchestrator, on loopback.

Measures what the engine sees: from `RigServer.run_trial` being called to the outcome returned,
through both I/O threads, the worker's adapter thread and the NullAdapter. Prints JSON.

    python benchmarks/transport_latency.py [--trials 5000] [--warmup 500]
"""

from __future__ import annotations

import argparse
import json
import time

from orchestrator.transport import RigServer
from transport_common import empty_trial, environment, make_keys, percentile, start_worker, stop_all


def measure(curve: bool, trials: int, warmup: int, inline: bool = True) -> dict[str, float | int | bool]:
    keys = make_keys(1) if curve else None
    kw = {"keys_dir": keys} if curve else {"insecure": True}
    with RigServer("tcp://127.0.0.1:0", **kw) as srv:
        srv.set_session("bench", "x")
        proc = start_worker(srv.endpoint, "rig0", keys=keys, options={"inline": "true" if inline else "false"})
        try:
            srv.wait_for_rigs(["null"], 1, 60)
            for i in range(warmup):
                srv.run_trial(empty_trial(i))
            lat = []
            for i in range(warmup, warmup + trials):
                t0 = time.perf_counter()
                srv.run_trial(empty_trial(i))
                lat.append(time.perf_counter() - t0)
        finally:
            stop_all([proc])
    ms = [x * 1000 for x in lat]
    what = "cloop empty trial" + ("" if inline else " (adapter on the worker's main thread)")
    return {"what": what, "curve": curve, "trials": trials, "p50_ms": round(percentile(ms, 50), 4),
            "p90_ms": round(percentile(ms, 90), 4), "p99_ms": round(percentile(ms, 99), 4),
            "max_ms": round(max(ms), 4), "mean_ms": round(sum(ms) / len(ms), 4)}


RAW_PEER = """
import sys, zmq
d = zmq.Context().socket(zmq.DEALER)
d.connect(sys.argv[1])
d.send(b"hi")
while (m := d.recv()) != b"stop":
    d.send(m)
"""


def raw_floor(trials: int) -> dict[str, float | int | str]:
    """Same machine, same moment: bare pyzmq ROUTER/DEALER ping-pong, no threads, no validation."""
    import subprocess
    import sys

    import zmq

    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    peer = subprocess.Popen([sys.executable, "-c", RAW_PEER, f"tcp://127.0.0.1:{port}"])
    ident, _ = r.recv_multipart()
    lat = []
    for i in range(trials + 500):
        t0 = time.perf_counter()
        r.send_multipart([ident, b"x" * 120])
        r.recv_multipart()
        if i >= 500:
            lat.append((time.perf_counter() - t0) * 1000)
    r.send_multipart([ident, b"stop"])
    peer.wait()
    r.close(0)
    ctx.term()
    return {"what": "raw pyzmq ping-pong floor", "trials": trials, "p50_ms": round(percentile(lat, 50), 4),
            "p99_ms": round(percentile(lat, 99), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    args = ap.parse_args()
    results = [measure(False, args.trials, args.warmup), measure(True, args.trials, args.warmup),
               measure(False, args.trials, args.warmup, inline=False), raw_floor(args.trials)]
    print(json.dumps({"benchmark": "transport_round_trip", "target": {"p50_ms": 0.3, "p99_ms": 2.0},
                      "autopilot_reference": {"median_ms": 0.975, "note": "Pi-to-Pi, published"},
                      "results": results, "environment": environment()}, indent=2))


if __name__ == "__main__":
    main()
