"""Re-runs the hostile-peer probe against the real code and prints one JSON object of figures.

Sections (each bounded in count and time, loopback only):
  frames   random and mutated msgpack frames from a raw DEALER at a live RigServer
  forged   results for trials not in flight, the wrong attempt or session, and impossible timestamps
  fds      more idle TCP connections than a low soft open-file limit, then a real rig worker's trials
  values   huge Poisson responses: update time of ModelComparison and what validation says
  bombs    YAML alias bomb, 124,000 unknown keys, an unfinished huge multipart, oversize protocols
  races    two processes taking one session lease at once (SQLite, and PostgreSQL if reachable)

The six sections live in one file (over 500 lines) on purpose: the probe is re-run as one script
and writes one JSON object; each section is a self-contained function.

Usage: python benchmarks/hardening_probe.py [--frames N] [--forged N] [--idle K] [--rounds R] ...
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import msgpack

ROOT = Path(__file__).resolve().parent.parent
LOOP = "tcp://127.0.0.1:0"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def timed(fn: Callable[[], Any]) -> tuple[float, str]:
    """Seconds until `fn` returns or raises, and the first line of what it raised (or 'accepted')."""
    t0 = time.perf_counter()
    try:
        fn()
        said = "accepted"
    except Exception as exc:  # the point is to see what is raised
        said = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return round(time.perf_counter() - t0, 4), said


class Dealer:
    """A hand-driven DEALER that sends exactly the bytes it is given."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, data: bytes) -> None:
        self.sock.send(data)

    def recv(self, timeout_s: float) -> Any | None:
        """The next message that is not a heartbeat, decoded, or None after `timeout_s`."""
        from orchestrator import messages as m

        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0 or not self.sock.poll(left * 1000):
                return None
            msg = m.decode(self.sock.recv(), sender="orchestrator")
            if msg.type != "heartbeat":
                return msg

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _samples() -> list[bytes]:
    from orchestrator import messages as m

    now = time.time()
    return [m.encode(x) for x in (
        m.Hello(rig_id="rig-1", adapters=["null"], software_version="x", clock=m.ClockInfo(time=now),
                capabilities=m.Capabilities(stimulus_types=["*"], response_kinds=["gaussian"])),
        m.Result(trial_id="s1:3", attempt=1, session_id="s1", response={"value": 1.0},
                 timing={"presented_at": now, "responded_at": now + 0.2}),
        m.Heartbeat(sent_at=now), m.ErrorMessage(code="x", message="y"), m.Bye(reason="z"))]


def _hostile_frame(rng: random.Random, samples: list[bytes]) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 1:  # a real message with bytes flipped
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 2:  # a real message cut short
        data = rng.choice(samples)
        return data[:rng.randrange(1, len(data))]
    obj = {"v": rng.choice([1, 2, -1, "1", None]), "type": rng.choice(["hello", "result", "trial", "nope", 7]),
           rng.choice(["trial_id", "x", ""]): rng.choice([1e308, -0.0, [1] * 50, {"a": {"b": {}}}, b"\x00"])}
    return msgpack.packb(obj, use_bin_type=True)


# ----------------------------------------------------------------------------- frames
def probe_frames(n: int, budget_s: float, seed: int) -> dict[str, Any]:
    from orchestrator.transport import RigServer

    rng = random.Random(seed)
    samples = _samples()
    latencies: list[float] = []
    replies = sent = 0
    kinds: dict[str, int] = {}
    with RigServer(LOOP, insecure=True) as srv:
        srv.set_session("s1", "x")
        peer = Dealer(srv.endpoint)
        end = time.monotonic() + budget_s
        try:
            while sent < n and time.monotonic() < end:
                frame = _hostile_frame(rng, samples)
                t0 = time.perf_counter()
                peer.send(frame)
                sent += 1
                reply = peer.recv(0.25)
                if reply is not None:
                    latencies.append(time.perf_counter() - t0)
                    replies += 1
                    key = f"{reply.type}:{getattr(reply, 'code', '')}"
                    kinds[key] = kinds.get(key, 0) + 1
        finally:
            peer.close()
        alive = srv._thread.is_alive()
        stats = dict(srv.stats)
    return {"sent": sent, "replies": replies, "reply_kinds": kinds, "thread_alive": alive,
            "internal_errors": stats.get("internal_errors", 0), "rejected": stats.get("rejected", 0),
            "results_accepted": stats.get("results", 0), "reject_ms_p50": percentile(latencies, 0.5),
            "reject_ms_p99": percentile(latencies, 0.99)}


# ----------------------------------------------------------------------------- forged results
def _register(srv: Any, peer: Dealer, rig_id: str) -> None:
    from orchestrator import messages as m

    peer.send(m.encode(m.Hello(rig_id=rig_id, adapters=["null"], software_version="probe",
                               capabilities=m.Capabilities(stimulus_types=["*"], response_kinds=["gaussian"]),
                               clock=m.ClockInfo(time=time.time()))))
    assert peer.recv(2.0).type == "welcome"
    peer.send(m.encode(m.Heartbeat(sent_at=time.time(), session_ready="s1")))
    srv.wait_for_rigs(["null"], 1, 5.0)


def probe_forged(rounds: int, budget_s: float) -> dict[str, Any]:
    from orchestrator import messages as m
    from orchestrator.transport import RigServer, TrialCommand

    forged: dict[str, int] = {"not_in_flight": 0, "wrong_attempt": 0, "wrong_session": 0,
                              "nanosecond_time": 0, "time_1e300": 0, "hello_clock_1e300": 0}
    accepted = refused_replies = trials = 0
    with RigServer(LOOP, insecure=True) as srv:
        srv.set_session("s1", "x")
        peer = Dealer(srv.endpoint)
        end = time.monotonic() + budget_s
        try:
            _register(srv, peer, "forger")
            for i in range(rounds):
                if time.monotonic() > end:
                    break
                cmd = TrialCommand(trial_id=f"s1:{i}", attempt=1, index=i, session_id="s1", stimulus={"lag": i},
                                   stimulus_type="abstract", response_kind="gaussian", timeout_s=5.0)
                fut = srv.submit(cmd)
                trial = peer.recv(2.0)
                if trial is None or trial.type != "trial":
                    continue
                trials += 1
                now = time.time()
                good = msgpack.unpackb(m.encode(m.Result(trial_id=trial.trial_id, attempt=1, session_id="s1",
                                                         response={"value": 0.5}, timing={"presented_at": now})))
                bad_time = ("nanosecond_time", time.time_ns()) if i % 2 == 0 else ("time_1e300", 1e300)
                for name, patch in (("not_in_flight", {"trial_id": f"s1:{i + 10_000}"}),
                                    ("wrong_attempt", {"attempt": 2}), ("wrong_session", {"session_id": "other"}),
                                    (bad_time[0], {"timing": {"presented_at": bad_time[1]}})):
                    peer.send(msgpack.packb({**good, **patch}, use_bin_type=True))
                    forged[name] += 1
                    reply = peer.recv(1.0)
                    refused_replies += reply is not None and reply.type == "error"
                try:
                    fut.result(timeout=2.0)
                    accepted += 1
                except Exception:
                    pass  # the attempt failed at the bad timestamp: nothing reached the caller
            intruder = Dealer(srv.endpoint)
            try:
                hello = msgpack.unpackb(_samples()[0])
                hello["clock"]["time"] = 1e300
                intruder.send(msgpack.packb(hello, use_bin_type=True))
                forged["hello_clock_1e300"] += 1
                reply = intruder.recv(1.0)
                refused_replies += reply is not None and reply.type == "error"
            finally:
                intruder.close()
        finally:
            peer.close()
        alive = srv._thread.is_alive()
        stats = dict(srv.stats)
    return {"trials_in_flight": trials, "forged": forged, "forged_total": sum(forged.values()),
            "error_replies": refused_replies, "accepted_outcomes": accepted,
            "server_results_counted": stats.get("results", 0), "registrations": stats.get("registrations", 0),
            "thread_alive": alive,
            "internal_errors": stats.get("internal_errors", 0)}


# ----------------------------------------------------------------------------- fd exhaustion
FD_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    soft_set = int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft_set, hard))
    from orchestrator.transport import RigServer, TrialCommand
    with RigServer("tcp://127.0.0.1:0", keys_dir=sys.argv[1]) as srv:
        srv.set_session("s1", "x")
        print(srv.endpoint, srv.open_file_limit, flush=True)
        sys.stdin.readline()  # the parent has opened its idle connections and started the worker
        out = {"soft_limit_set": soft_set, "limit_after_start": srv.open_file_limit, "trials_ok": 0, "errors": []}
        t0 = time.monotonic()
        try:
            srv.wait_for_rigs(["null"], 1, 30)
            out["rig_registered_s"] = round(time.monotonic() - t0, 2)
            for i in range(int(sys.argv[3])):
                cmd = TrialCommand(trial_id=f"s1:{i}", attempt=1, index=i, session_id="s1", stimulus={"lag": i},
                                   stimulus_type="abstract", response_kind="gaussian", timeout_s=5.0)
                if srv.run_trial(cmd).rig_id == "good":
                    out["trials_ok"] += 1
            srv.reload_keys()
        except Exception as exc:
            out["errors"].append(f"{type(exc).__name__}: {exc}"[:200])
        out["thread_alive"] = srv._thread.is_alive()
        out["internal_errors"] = srv.stats.get("internal_errors", 0)
        out["idle_closed"] = getattr(getattr(srv, "_budget", None), "idle_closed", None)
        print(json.dumps(out), flush=True)
""")


def probe_fds(idle: int, soft: int, trials: int) -> dict[str, Any]:
    from orchestrator import keys as keyfiles

    with tempfile.TemporaryDirectory() as tmp:
        keydir = Path(tmp) / "keys"
        keyfiles.generate(keydir, "orchestrator")
        (keydir / "rigs").mkdir()
        keyfiles.generate(keydir, "good")
        (keydir / "rigs" / "good.key").write_bytes((keydir / "good.key").read_bytes())
        child = subprocess.Popen([sys.executable, "-c", FD_CHILD, str(keydir), str(soft), str(trials)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        conns: list[socket.socket] = []
        worker = None
        try:
            endpoint = child.stdout.readline().split()[0]
            port = int(endpoint.rsplit(":", 1)[1])
            refused = 0
            for _ in range(idle):  # connect and never send a byte
                try:
                    conns.append(socket.create_connection(("127.0.0.1", port), timeout=2))
                except OSError:
                    refused += 1
            worker = subprocess.Popen([sys.executable, "-m", "rig_adapters.worker", "--connect", endpoint,
                                       "--adapter", "rig_adapters.simulated:NullAdapter", "--rig-id", "good",
                                       "--keys", str(keydir), "--name", "good", "--state-dir", str(Path(tmp) / "st")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            child.stdin.write("go\n")
            child.stdin.flush()
            line = child.stdout.readline()
            out = json.loads(line) if line.strip() else {"errors": ["child said nothing"]}
        finally:
            for s in conns:
                s.close()
            if worker is not None:
                worker.kill()
                worker.wait(10)
            child.kill()
            child.wait(10)
    out.update(idle_connections=idle, idle_refused_by_os=refused, trials_asked=trials)
    return out


# ----------------------------------------------------------------------------- big values
def probe_values(values: list[float]) -> dict[str, Any]:
    from orchestrator.inference import ModelComparison
    from orchestrator.protocol import InvalidResponse
    from orchestrator.protocol_checks import load_checked

    protocol = load_checked(ROOT / "protocols" / "orientation_tuning.yaml").protocol
    t0 = time.perf_counter()
    comparison = ModelComparison.from_protocol(protocol, 1)
    build_s = time.perf_counter() - t0
    for i in range(3):
        comparison.update({"orientation": 30.0 * i, "contrast": 0.5}, 4.0)
    rows = []
    for v in values:  # a session never feeds an invalid value to the models; fed here to time the worst case
        try:
            protocol.response.validate({"value": v})
            marked = "valid"
        except InvalidResponse as exc:
            marked = f"invalid: {exc}"
        t0 = time.perf_counter()
        comparison.update({"orientation": 90.0, "contrast": 0.5}, float(v))
        rows.append({"value": v if v < 2 ** 63 else "2**64-1", "validation": marked,
                     "update_s_if_fed": round(time.perf_counter() - t0, 3)})
    t0 = time.perf_counter()
    comparison.update({"orientation": 45.0, "contrast": 0.3}, 3.0)
    return {"protocol": "protocols/orientation_tuning.yaml", "build_s": round(build_s, 3), "values": rows,
            "next_normal_update_s": round(time.perf_counter() - t0, 3),
            "probabilities_sum": round(sum(comparison.probabilities().values()), 6)}


# ----------------------------------------------------------------------------- bombs
def _alias_bomb() -> str:
    rows = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(8):
        prev, cur = chr(97 + i), chr(98 + i)
        rows.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return "\n".join(rows) + "\n"


def _alias_bomb_probe() -> dict[str, Any]:
    bomb = _alias_bomb()
    code = ("import time\nfrom orchestrator.protocol import parse_protocol_text\n"
            f"text = {bomb!r}\nt0 = time.perf_counter()\n"
            "try:\n    parse_protocol_text(text, 'bomb.yaml'); said = 'accepted'\n"
            "except Exception as exc:\n    said = f'{type(exc).__name__}: {exc}'.splitlines()[0]\n"
            "took = time.perf_counter() - t0\n"
            "hwm = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print(round(took, 4)); print(hwm); print(said[:200])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if done.returncode != 0:
        return {"bytes": len(bomb), "error": done.stderr.strip().splitlines()[-1:]}
    took, hwm, said = done.stdout.strip().splitlines()[:3]
    return {"bytes": len(bomb), "refuse_s": float(took), "peak_mib": round(int(hwm) / 1024, 1), "said": said}


def _unknown_keys_probe() -> dict[str, Any]:
    from orchestrator import messages as m

    base = msgpack.unpackb(_samples()[1])
    data = msgpack.packb({**base, **{f"k{i:05x}": 0 for i in range(124_000)}}, use_bin_type=True)
    took, said = timed(lambda: m.decode(data, sender="worker"))
    return {"keys": 124_000, "bytes": len(data), "reject_s": took, "said": said}


def _raw_zmtp_peer(port: int) -> socket.socket:
    """ZMTP 3.0 greeting and READY (NULL mechanism, DEALER), written by hand so any frame can follow."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(bytes([0x04, len(body)]) + body)
    return s


def _multipart_probe(budget_s: float) -> dict[str, Any]:
    from orchestrator.transport import PEER_BUFFER_BYTES, RigServer

    with RigServer(LOOP, insecure=True) as srv:
        srv.set_session("s1", "x")
        attacker = _raw_zmtp_peer(int(srv.endpoint.rsplit(":", 1)[1]))
        frame = bytes([0x03]) + struct.pack(">Q", 1 << 20) + b"\x00" * (1 << 20)  # MORE flag, 1 MiB, never last
        base = rss_bytes()
        sent, peak, closed_after = 0, base, None
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < budget_s:
                attacker.sendall(frame)
                sent += len(frame)
                peak = max(peak, rss_bytes())
        except OSError:
            closed_after = round(time.monotonic() - t0, 3)
        finally:
            attacker.close()
        time.sleep(0.2)
        peak = max(peak, rss_bytes())
        alive = srv._thread.is_alive()
        over = srv.stats.get("over_budget", 0)
    # RSS of this process, which hosts the server; the attacker's kernel socket buffers are not counted.
    return {"sent_mb": round(sent / 1e6, 1), "rss_growth_mb": round((peak - base) / 1e6, 1),
            "peer_budget_mb": round(PEER_BUFFER_BYTES / 1e6, 1), "connection_closed_after_s": closed_after,
            "over_budget": over, "thread_alive": alive}


CAPACITY = """
name: c
version: "1"
stimulus:
  parameters:
PARAMS
response: {kind: bernoulli}
models:
  - name: a
    formula: "p"
    priors: {p: {dist: beta, alpha: 1, beta: 1}}
  - name: b
    formula: "q*0.5"
    priors: {q: {dist: beta, alpha: 1, beta: 1}}
design:
  strategy: STRATEGY
  batch_size: BATCH
"""


def _oversize_probe(choices: int) -> dict[str, Any]:
    from orchestrator.protocol_checks import parse_checked

    cases = {
        "sweep_6d": ("\n".join(f"    x{i}: {{kind: continuous, low: 0, high: 1}}" for i in range(6)), "sweep", 1),
        "batch_size_1e6": ("    x: {kind: continuous, low: 0, high: 1}", "mutual_information", 1_000_000),
    }
    for n in sorted({20_000, choices}):  # 20,000 meets the choices limit; 10^6 meets the file-size limit first
        cases[f"categorical_{n}"] = ("    c: {kind: categorical, choices: [" + ", ".join(map(str, range(n))) + "]}",
                                     "random", 1)
    out = {}
    for name, (params, strategy, batch) in cases.items():
        text = CAPACITY.replace("PARAMS", params).replace("STRATEGY", strategy).replace("BATCH", str(batch))
        took, said = timed(lambda: parse_checked(text, f"{name}.yaml"))
        out[name] = {"refuse_s": took, "refused": said != "accepted", "said": said}
    return out


def probe_bombs(multipart_s: float, choices: int) -> dict[str, Any]:
    return {"yaml_alias_bomb": _alias_bomb_probe(), "unknown_keys": _unknown_keys_probe(),
            "unfinished_multipart": _multipart_probe(multipart_s), "oversize_protocols": _oversize_probe(choices)}


# ----------------------------------------------------------------------------- races
RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from orchestrator.store import LeaseHeld, TrialStore
    url, sid, go = sys.argv[1:4]
    store = TrialStore(url)
    store.live_holder(sid)  # connected before the start signal
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.0005)
    try:
        print("won", store.acquire_lease(sid, ttl_s=30).id, flush=True)
        time.sleep(0.3)
    except LeaseHeld as exc:
        print("held", exc.holder, flush=True)
""")


def _race(url: str, rounds: int, racers: int, tmp: Path) -> dict[str, Any]:
    from orchestrator import store as st
    from orchestrator.protocol_checks import load_checked

    st.upgrade(url)
    with st.TrialStore(url) as store:
        pid = store.add_protocol(load_checked(ROOT / "protocols" / "retention.yaml"))
        sid = store.create_session(protocol_id=pid, subject_id=store.subject("probe"), seed=3, status="interrupted")
    winners_per_round: list[int] = []
    other: list[str] = []
    t0 = time.monotonic()
    for r in range(rounds):
        go = tmp / f"go-{uuid.uuid4().hex[:6]}"
        procs = [subprocess.Popen([sys.executable, "-c", RACER, url, sid, str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(racers)]
        for p in procs:
            p.stdout.readline()  # "ready"
        go.touch()
        lines = []
        for p in procs:
            out, err = p.communicate(timeout=60)
            lines.append(out.strip())
            if p.returncode != 0:
                other.append(err.strip().splitlines()[-1][:200] if err.strip() else f"exit {p.returncode}")
        winners_per_round.append(sum(line.startswith("won") for line in lines))
    return {"rounds": rounds, "racers": racers, "winners_per_round": winners_per_round,
            "exactly_one_winner_every_round": all(w == 1 for w in winners_per_round), "errors": other,
            "seconds": round(time.monotonic() - t0, 2)}


def probe_races(rounds: int, racers: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = _race(f"sqlite:///{Path(tmp) / 'lease.db'}", rounds, racers, Path(tmp))
        try:
            import psycopg

            name = f"cloop_probe_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=3) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        except Exception as exc:
            out["postgres"] = {"skipped": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
            return out
        try:
            out["postgres"] = _race(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", rounds, racers, Path(tmp))
        finally:
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                             "AND pid <> pg_backend_pid()", (name,))
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=2000, help="malformed frames to send")
    ap.add_argument("--frames-seconds", type=float, default=25.0, help="time budget of the frames section")
    ap.add_argument("--forged-rounds", type=int, default=60, help="trials in flight, 4 forged results each")
    ap.add_argument("--idle", type=int, default=400, help="idle TCP connections (above --soft-limit)")
    ap.add_argument("--soft-limit", type=int, default=256, help="soft RLIMIT_NOFILE set in the server's process")
    ap.add_argument("--fd-trials", type=int, default=5, help="trials the real worker must complete")
    ap.add_argument("--values", type=float, nargs="*", default=[1e5, 1e7, float(2 ** 64 - 1)])
    ap.add_argument("--multipart-seconds", type=float, default=5.0, help="how long the multipart attacker sends")
    ap.add_argument("--choices", type=int, default=1_000_000, help="categorical choices of the oversize protocol")
    ap.add_argument("--rounds", type=int, default=5, help="lease race rounds per backend")
    ap.add_argument("--racers", type=int, default=2, help="processes per race round")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--only", nargs="*", default=None, help="run only these sections")
    args = ap.parse_args()

    sections: dict[str, Callable[[], dict[str, Any]]] = {
        "frames": lambda: probe_frames(args.frames, args.frames_seconds, args.seed),
        "forged": lambda: probe_forged(args.forged_rounds, 30.0),
        "fds": lambda: probe_fds(args.idle, args.soft_limit, args.fd_trials),
        "values": lambda: probe_values(args.values),
        "bombs": lambda: probe_bombs(args.multipart_seconds, args.choices),
        "races": lambda: probe_races(args.rounds, args.racers),
    }
    import logging

    logging.disable(logging.WARNING)  # the rejected-message warnings are the point, not the output
    result: dict[str, Any] = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}
    t_all = time.monotonic()
    for name, fn in sections.items():
        if args.only and name not in args.only:
            continue
        t0 = time.monotonic()
        try:
            result[name] = fn()
        except Exception as exc:
            result[name] = {"probe_failed": f"{type(exc).__name__}: {exc}"[:300]}
        result[name]["section_s"] = round(time.monotonic() - t0, 2)
    result["total_s"] = round(time.monotonic() - t_all, 2)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
