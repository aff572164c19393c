"""Time from a rig worker's death to the retry of its trial being dispatched to another rig.

Two worker processes; a trial (1 s presentation) goes to one of them, which is then
* ``crash``: SIGKILLed (process gone, the kernel closes its TCP connection), or
* ``freeze``: SIGSTOPped (process hung / cable pulled: the connection stays open, only heartbeats stop).
The benchmark does what the engine does — on `RigLost`, resubmit with attempt + 1 — and reads the
server's `retry_dispatched` event. Default heartbeat 0.25 s x liveness 3. Prints JSON.

    python benchmarks/transport_failover.py [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import signal
import time

from orchestrator.transport import RigLost, RigServer
from transport_common import empty_trial, environment, percentile, start_worker, stop_all


def _wait(predicate, timeout: float) -> bool:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def measure(mode: str, reps: int) -> dict[str, object]:
    detect_ms: list[float] = []
    retry_ms: list[float] = []
    opts = {"trial_seconds": 1.0}
    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv:
        srv.set_session("bench", "x")
        procs = {r: start_worker(srv.endpoint, r, options=opts) for r in ("rig-a", "rig-b")}
        try:
            srv.wait_for_rigs(["null"], 2, 60)
            for rep in range(reps):
                trial = empty_trial(rep)
                fut = srv.submit(trial)
                assert _wait(lambda: any(trial.trial_id in v for v in srv.in_flight().values()), 10)
                victim = next(r for r, v in srv.in_flight().items() if trial.trial_id in v)
                time.sleep(0.2)  # well inside the 1 s presentation
                t_death = time.time()
                procs[victim].send_signal(signal.SIGKILL if mode == "crash" else signal.SIGSTOP)
                try:
                    fut.result(timeout=10)
                    raise AssertionError("the trial finished although its rig died")
                except RigLost:
                    t_lost = time.time()
                retry = srv.submit(type(trial)(**{**trial.__dict__, "attempt": 2}))
                retry.result(timeout=10)
                [event] = [e for e in srv.events if e["event"] == "retry_dispatched" and e["trial_id"] == trial.trial_id]
                detect_ms.append((t_lost - t_death) * 1000)
                retry_ms.append((event["t"] - t_death) * 1000)
                procs[victim].kill()
                procs[victim].wait()
                procs[victim] = start_worker(srv.endpoint, victim, options=opts)
                assert _wait(lambda: len(srv.rigs()) == 2, 60)
        finally:
            stop_all(list(procs.values()))
    return {"mode": mode, "reps": reps, "heartbeat_s": 0.25, "liveness": 3,
            "death_to_riglost_ms": {"p50": round(percentile(detect_ms, 50), 2), "max": round(max(detect_ms), 2)},
            "death_to_retry_dispatched_ms": {"p50": round(percentile(retry_ms, 50), 2),
                                             "max": round(max(retry_ms), 2)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    print(json.dumps({"benchmark": "transport_failover", "autopilot_reference": {"resend_interval_s": 5},
                      "results": [measure("crash", args.reps), measure("freeze", args.reps)],
                      "environment": environment()}, indent=2))


if __name__ == "__main__":
    main()
