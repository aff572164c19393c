"""Rig workers as real processes: crashes, freezes, orchestrator restarts, Curve, 16 rigs at once."""

from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from orchestrator import keys as keyfiles
from orchestrator.transport import AttemptFailed, RigLost, RigServer, TrialOutcome
from orchestrator.protocol_checks import parse_checked
from rig_adapters.base import AdapterError, SessionInfo, available_adapters, build_adapter, load_adapter_class
from rig_adapters.simulated import NullAdapter, SimulatedAdapter
from test_transport_helpers import Workers, cmd, free_port, wait_until

REPO = Path(__file__).resolve().parents[1]
RETENTION = (REPO / "protocols" / "retention.yaml").read_text()


def journal(state_dir: Path, rig_id: str) -> list[dict[str, Any]]:
    path = state_dir / f"{rig_id}.journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_with_retries(srv: RigServer, i: int, attempts: list[tuple[int, int, str]], *, max_attempts: int = 10,
                     session: str = "s1") -> TrialOutcome:
    """What the engine does: same trial id, attempt + 1 after each failed attempt, every attempt noted."""
    for attempt in range(1, max_attempts + 1):
        try:
            out = srv.run_trial(cmd(i, attempt=attempt, session=session), timeout_s=10, rig_wait_s=20)
            attempts.append((i, attempt, "ok"))
            return out
        except AttemptFailed as exc:
            attempts.append((i, attempt, type(exc).__name__))
    raise AssertionError(f"trial {i} failed {max_attempts} times")


# ----------------------------------------------------------------------------- adapters
def test_entry_point_discovery() -> None:
    assert available_adapters()["simulated"] == "rig_adapters.simulated:SimulatedAdapter"
    assert load_adapter_class("simulated") is SimulatedAdapter
    assert load_adapter_class("rig_adapters.simulated:NullAdapter") is NullAdapter
    with pytest.raises(AdapterError, match="not an Adapter subclass"):
        load_adapter_class("os:path")
    with pytest.raises(AdapterError, match="needs --truth"):
        build_adapter("simulated", {})
    with pytest.raises(AdapterError, match="no option"):
        build_adapter("simulated", {"truth": "power", "colour": "red"})


def test_simulated_adapter_draws_from_the_truth_with_per_trial_seeds() -> None:
    from orchestrator.models import build_truth
    from orchestrator.protocol import parse_protocol_text
    from orchestrator.messages import Trial

    adapter = build_adapter("simulated", {"truth": "power:a=0.9,b=0.5", "seed": "11", "trial_seconds": "0"})
    with pytest.raises(AdapterError, match="no session"):
        adapter.present(Trial(trial_id=1, attempt=1, index=1, session_id="s", stimulus={"lag": 1},
                              stimulus_type="abstract", response_kind="binomial", timeout_s=1.0))
    adapter.start(SessionInfo("s", RETENTION, "r"))
    truth = build_truth(parse_checked(RETENTION).protocol, "power:a=0.9,b=0.5")
    for index, lag in [(0, 0), (1, 5), (2, 50), (3, 5)]:
        trial = Trial(trial_id=index, attempt=1, index=index, session_id="s", stimulus={"lag": lag},
                      stimulus_type="abstract", response_kind="binomial", timeout_s=1.0)
        got = adapter.present(trial)
        assert got.response["value"] == truth.sample({"lag": lag}, np.random.default_rng([11, index]))
        assert isinstance(got.response["value"], int) and 0 <= got.response["value"] <= 10
        assert got.timing["presented_at"] <= got.timing["responded_at"]
        assert adapter.present(trial).response == got.response  # same index, same answer
    with pytest.raises(AdapterError, match="unknown model"):
        SimulatedAdapter("nosuch:a=1").start(SessionInfo("s", RETENTION, "r"))


def test_simulated_worker_process_serves_a_session(tmp_path: Path) -> None:
    from orchestrator.models import build_truth
    from orchestrator.protocol import parse_protocol_text

    truth = build_truth(parse_checked(RETENTION).protocol, "exponential:a=0.95,b=0.02")
    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv, Workers(tmp_path) as workers:
        srv.set_session("sess", RETENTION)
        workers.start(srv.endpoint, "sim", adapter="simulated",
                      options={"truth": "exponential:a=0.95,b=0.02", "seed": 5})
        [info] = srv.wait_for_rigs(["simulated"], 1, 60)
        assert info.adapters == ("simulated",)
        for i, lag in enumerate([0, 10, 60]):
            c = cmd(i, session="sess", stimulus={"lag": lag})
            out = srv.run_trial(type(c)(**{**c.__dict__, "response_kind": "binomial"}), timeout_s=60)
            assert out.response["value"] == truth.sample({"lag": lag}, np.random.default_rng([5, i]))


# ----------------------------------------------------------------------------- crash and restart
def test_sigkill_mid_trial_repeatedly_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    attempts: list[tuple[int, int, str]] = []
    outcomes: dict[int, TrialOutcome] = {}
    kills = 0
    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv, Workers(tmp_path) as workers:
        srv.set_session("s1", "x")
        procs = {rig: workers.start(srv.endpoint, rig, state_dir=state, options={"trial_seconds": 0.15})
                 for rig in ("rig-a", "rig-b")}
        srv.wait_for_rigs(["null"], 2, 30)
        done = threading.Event()

        def engine(indices: range) -> None:
            for i in indices:
                outcomes[i] = run_with_retries(srv, i, attempts)

        threads = [threading.Thread(target=engine, args=(r,)) for r in (range(0, 20), range(20, 40))]
        for t in threads:
            t.start()
        rng = random.Random(1)
        try:
            while kills < 5 and any(t.is_alive() for t in threads):
                rig = rng.choice(["rig-a", "rig-b"])
                if not wait_until(lambda: bool(srv.in_flight().get(rig)), 5):
                    continue
                time.sleep(rng.uniform(0.0, 0.1))  # somewhere inside the 150 ms presentation
                procs[rig].send_signal(signal.SIGKILL)
                procs[rig].wait()
                kills += 1
                time.sleep(0.1)
                procs[rig] = workers.start(srv.endpoint, rig, state_dir=state, options={"trial_seconds": 0.15})
                time.sleep(0.6)
        finally:
            for t in threads:
                t.join(timeout=120)
            done.set()
        assert kills == 5
        assert sorted(outcomes) == list(range(40)), "every trial completed"
        failed = [a for a in attempts if a[2] != "ok"]
        assert len(failed) >= 1 and all(a[2] == "RigLost" for a in failed)
        assert len([a for a in attempts if a[2] == "ok"]) == 40
        # Each trial id answered by its final attempt, and attempts were numbered 1, 2, ... per trial.
        per_trial = collections.defaultdict(list)
        for i, attempt, _ in attempts:
            per_trial[i].append(attempt)
        assert all(v == list(range(1, len(v) + 1)) for v in per_trial.values())
        assert all(outcomes[i].attempt == per_trial[i][-1] for i in outcomes)
    # No worker (same rig id, any incarnation) presented a trial to completion twice.
    for rig in ("rig-a", "rig-b"):
        results = collections.Counter(r["key"] for r in journal(state, rig) if r["event"] == "result")
        assert results and max(results.values()) == 1, results
        pids = {r["pid"] for r in journal(state, rig)}
        assert len(pids) >= 1
    presented = {r["key"] for rig in ("rig-a", "rig-b") for r in journal(state, rig) if r["event"] == "result"}
    assert presented >= {f"str:s1:{i}" for i in range(40)} - {f"str:s1:{i}" for i in outcomes if outcomes[i].cached}


def test_restarted_worker_replays_stored_result_instead_of_presenting_again(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv, Workers(tmp_path) as workers:
        srv.set_session("s1", "x")
        p = workers.start(srv.endpoint, "r", state_dir=state)
        srv.wait_for_rigs(["null"], 1, 30)
        first = srv.run_trial(cmd(1))
        assert not first.cached and first.meta["presented_attempt"] == 1
        p.send_signal(signal.SIGKILL)
        p.wait()
        p2 = workers.start(srv.endpoint, "r", state_dir=state)
        assert wait_until(lambda: [r.pid for r in srv.rigs()] == [p2.pid], 30)
        again = srv.run_trial(cmd(1, attempt=2))
        assert again.cached and again.attempt == 2 and again.meta["presented_attempt"] == 1
        assert again.response == first.response and again.timing == first.timing
        fresh = srv.run_trial(cmd(2))
        assert not fresh.cached
    results = [r for r in journal(state, "r") if r["event"] == "result"]
    assert [r["key"] for r in results] == ["str:s1:1", "str:s1:2"]
    assert {r["pid"] for r in results} == {p.pid, p2.pid}


def test_frozen_worker_is_noticed_within_a_second_and_rejoins(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv, Workers(tmp_path) as workers:
        srv.set_session("s1", "x")
        p = workers.start(srv.endpoint, "r", state_dir=state, options={"trial_seconds": 1.0})
        srv.wait_for_rigs(["null"], 1, 30)
        fut = srv.submit(cmd(1))
        # Freeze it in the middle of presenting (the journal notes the start before the adapter runs).
        assert wait_until(lambda: any(r["event"] == "start" for r in journal(state, "r")), 10)
        p.send_signal(signal.SIGSTOP)  # frozen: the TCP connection stays open, only heartbeats stop
        stopped = time.monotonic()
        with pytest.raises(RigLost, match="silent for"):
            fut.result(timeout=5)
        noticed = time.monotonic() - stopped
        assert noticed <= 1.0, noticed
        p.send_signal(signal.SIGCONT)
        assert wait_until(lambda: [r.pid for r in srv.rigs()] == [p.pid], 10), workers.logs()
        retry = srv.run_trial(cmd(1, attempt=2))
        assert retry.attempt == 2 and retry.meta["presented_attempt"] == 1  # finished once, not re-presented
    results = [r for r in journal(state, "r") if r["event"] == "result"]
    assert len(results) == 1


ORCH_SCRIPT = """
import sys, time
from orchestrator.transport import RigServer
srv = RigServer(sys.argv[1], insecure=True)
srv.set_session("s1", "x")
srv.wait_for_rigs(["null"], 1, 30)
print("ready", flush=True)
time.sleep(600)
"""


def test_workers_reconnect_after_the_orchestrator_is_killed_or_restarted(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Workers(tmp_path) as workers:
        p = workers.start(endpoint, "r")  # starts before any orchestrator exists: keeps retrying
        orch = subprocess.Popen([sys.executable, "-c", ORCH_SCRIPT, endpoint], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = orch.stdout.readline().strip()
        finally:
            orch.send_signal(signal.SIGKILL)  # the orchestrator dies without a word
            orch.wait()
        assert line == "ready", orch.stderr.read()[-2000:] + workers.logs()[-2000:]
        with RigServer(endpoint, insecure=True) as srv:
            srv.set_session("s1", "x")
            [info] = srv.wait_for_rigs(["null"], 1, 30)
            assert info.pid == p.pid and srv.run_trial(cmd(1)).rig_id == "r"
        assert p.poll() is None, "the worker was never restarted"


def test_workers_reconnect_after_a_clean_shutdown_and_immediate_rebind(tmp_path: Path) -> None:
    """A clean bye, then a new orchestrator on the same address at once, many times over: the worker
    registers with every one of them. (Closing the socket monitor before its socket once left libzmq's
    I/O thread blocked on a monitor event, so the worker never connected again.)"""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Workers(tmp_path) as workers:
        p = workers.start(endpoint, "r")
        for i in range(25):
            with RigServer(endpoint, insecure=True) as srv:
                srv.set_session(f"s{i}", "x")
                [info] = srv.wait_for_rigs(["null"], 1, 15)
                assert info.pid == p.pid, workers.logs()[-3000:]
                assert srv.run_trial(cmd(1, session=f"s{i}")).rig_id == "r"
        assert p.poll() is None, "the worker was never restarted"


def test_a_rig_without_orchestrator_says_so_once_and_then_once_when_it_registers(tmp_path: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Workers(tmp_path) as workers:
        workers.start(endpoint, "r")
        time.sleep(6)  # several reconnect rounds with nothing listening
        quiet = workers.logs()
        with RigServer(endpoint, insecure=True) as srv:
            srv.set_session("s1", "x")
            srv.wait_for_rigs(["null"], 1, 15)
            assert wait_until(lambda: "registered with" in workers.logs(), 5)
        text = workers.logs()
    assert quiet.count("WARNING") == 1 and "no word from the orchestrator" in quiet, quiet
    assert quiet.count("connecting to") == 1, quiet
    assert "reconnect attempt(s)" in text.split("registered with", 1)[1].splitlines()[0], text


def test_curve_between_processes(tmp_path: Path) -> None:
    k = tmp_path / "keys"
    keyfiles.generate(k, "orchestrator")
    (k / "rigs").mkdir()
    for name in ("lab1", "rogue"):
        keyfiles.generate(k, name)
    (k / "rigs" / "lab1.key").write_bytes((k / "lab1.key").read_bytes())
    with RigServer("tcp://127.0.0.1:0", keys_dir=k) as srv, Workers(tmp_path) as workers:
        srv.set_session("s1", "x")
        workers.start(srv.endpoint, "lab1", insecure=False, keys=k, name="lab1")
        workers.start(srv.endpoint, "rogue", insecure=False, keys=k, name="rogue")
        workers.start(srv.endpoint, "keyless", insecure=True)
        [info] = srv.wait_for_rigs(["null"], 1, 30)
        assert info.key_name == "lab1"
        out = srv.run_trial(cmd(1))
        assert out.rig_id == "lab1"
        assert wait_until(lambda: srv.stats["auth_failed"] >= 2, 10)
        time.sleep(1.0)
        assert [r.rig_id for r in srv.rigs()] == ["lab1"] and srv.stats["registrations"] == 1
        assert srv.stats["results"] == 1 and srv.stats["rejected"] == 0
    logs = workers.logs()
    assert "refused this rig's key" in logs and "security handshake" in logs


def test_sixteen_workers_in_one_session(tmp_path: Path) -> None:
    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv, Workers(tmp_path) as workers:
        srv.set_session("s1", "x")
        for n in range(16):
            workers.start(srv.endpoint, f"rig-{n:02d}", options={"trial_seconds": 0.01})
        rigs = srv.wait_for_rigs(["null"], 16, 60)
        assert len({r.rig_id for r in rigs}) == 16 and len({r.pid for r in rigs}) == 16
        futures = [srv.submit(cmd(i)) for i in range(320)]
        outs = [f.result(timeout=60) for f in futures]
        assert sorted(o.trial_id for o in outs) == sorted(f"s1:{i}" for i in range(320))
        used = collections.Counter(o.rig_id for o in outs)
        assert len(used) == 16 and min(used.values()) >= 5, used
        assert all(o.clock_rtt_s is not None and o.clock_rtt_s < 0.1 for o in outs[-16:])


# ----------------------------------------------------------------------------- adapter failures
class _Flaky(NullAdapter):
    """Fails in the ways real hardware does, depending on the stimulus."""

    name = "flaky"
    inline = False
    idled = 0

    def idle(self) -> None:
        self.idled += 1

    def start(self, session: SessionInfo) -> None:
        if "refuse" in session.protocol_text:
            raise RuntimeError("projector not found")

    def present(self, cmd: Any) -> Any:
        if cmd.stimulus.get("fail") == "abort":
            class Aborted(AdapterError):
                code = "aborted"
            raise Aborted("operator pressed Escape")
        if cmd.stimulus.get("fail") == "crash":
            raise ZeroDivisionError("bug in the adapter")
        if cmd.stimulus.get("fail") == "bad":
            return type(super().present(cmd))(response={"no_value": 1}, timing={})
        return super().present(cmd)


def test_adapter_failures_reach_the_engine_with_their_code() -> None:
    from orchestrator.transport import TrialRejected
    from rig_adapters.worker import RigWorker

    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv:
        srv.set_session("s1", "ok")
        adapter = _Flaky()
        worker = RigWorker(srv.endpoint, adapter, rig_id="flaky", insecure=True)
        th = threading.Thread(target=worker.run, daemon=True)
        th.start()
        try:
            srv.wait_for_rigs(["flaky"], 1, 10)
            for i, (fail, code, text) in enumerate([("abort", "aborted", "operator pressed Escape"),
                                                    ("crash", "adapter_failed", "ZeroDivisionError: bug"),
                                                    ("bad", "bad_result", "'value'")]):
                with pytest.raises(TrialRejected) as err:
                    srv.run_trial(cmd(i, stimulus={"fail": fail}))
                assert err.value.code == code and err.value.attempt == 1 and text in str(err.value)
            assert srv.run_trial(cmd(9, stimulus={})).response == {"value": 0.0}  # still serving
            srv.set_session("s2", "refuse")
            with pytest.raises(TrialRejected) as err:
                srv.run_trial(cmd(1, session="s2"))
            assert err.value.code == "session_failed" and "projector not found" in str(err.value)
            assert wait_until(lambda: adapter.idled > 0, 2)  # the main thread lets the adapter pump events
        finally:
            worker.stop()
            th.join(timeout=5)


# ----------------------------------------------------------------------------- journal
def test_journal_survives_a_torn_line_and_refuses_a_second_owner(tmp_path: Path) -> None:
    from rig_adapters.worker import ResultJournal

    path = tmp_path / "r.journal.jsonl"
    first = ResultJournal(path)
    key = ResultJournal.key("s", "s:1")
    first.store(key, 1, {"response": {"value": 1}, "timing": {}, "meta": {}, "presented_attempt": 1})
    with pytest.raises(RuntimeError, match="already using the journal"):
        ResultJournal(path)
    first.close()
    with open(path, "a") as fh:
        fh.write('{"event": "start", "session_id": "s", "ke')  # the process died mid-write
    second = ResultJournal(path)
    key2 = ResultJournal.key("s", "s:2")
    second.store(key2, 1, {"response": {"value": 2}, "timing": {}, "meta": {}, "presented_attempt": 1})
    second.close()
    third = ResultJournal(path)
    assert third.get(key)["response"] == {"value": 1} and third.get(key2)["response"] == {"value": 2}
    third.close()


def test_a_result_in_nanoseconds_fails_its_attempt_at_once_and_the_rig_serves_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.transport import TrialRejected

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    with Workers(tmp_path) as workers, RigServer(endpoint, insecure=True) as srv:
        srv.set_session("s1", "x")
        workers.start(endpoint, "r", adapter="adapters_for_tests:NanosecondClock", state_dir=state)
        srv.wait_for_rigs(["ns_clock"], 1, 30)
        assert srv.run_trial(cmd(0)).timing["presented_at"] < 4e9
        started = time.monotonic()
        with pytest.raises(TrialRejected) as err:
            srv.run_trial(cmd(1, timeout_s=30))
        assert time.monotonic() - started < 10  # failed by the rig's answer, not by the 30 s timeout
        assert err.value.code == "bad_result"
        text = str(err.value)
        assert "timing.presented_at" in text and "nanoseconds" in text and "e+18" in text, text
        assert srv.run_trial(cmd(2)).rig_id == "r"  # the rig and the server both carry on
    assert not [r for r in journal(state, "r") if r["event"] == "result" and r["key"] == "str:s1:1"]
    assert [r for r in journal(state, "r") if r["event"] == "result" and r["key"] == "str:s1:2"]


def test_an_image_whose_pixels_do_not_match_their_hash_is_refused(tmp_path: Path) -> None:
    from orchestrator.transport import TrialRejected
    from orchestrator.wire_images import image_payload

    payload = image_payload(np.arange(64, dtype=np.uint8).reshape(8, 8))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Workers(tmp_path) as workers, RigServer(endpoint, insecure=True) as srv:
        srv.set_session("s1", "x")
        workers.start(endpoint, "r")
        srv.wait_for_rigs(["null"], 1, 30)
        assert srv.run_trial(cmd(0, stimulus={"image": payload})).rig_id == "r"
        tampered = {**payload, "data": bytes(reversed(payload["data"]))}
        with pytest.raises(TrialRejected) as err:
            srv.run_trial(cmd(1, stimulus={"image": tampered}, timeout_s=30))
        assert err.value.code == "refused" and "hash to" in str(err.value)


def test_an_oversized_frame_to_the_worker_is_refused_by_libzmq_and_the_rig_reconnects(tmp_path: Path) -> None:
    """ZMQ_MAXMSGSIZE on the worker's DEALER: a frame larger than any legal message (the largest is a
    trial with an image) drops that connection inside libzmq instead of being buffered; the worker
    says hello again on a fresh connection."""
    import zmq

    from orchestrator import messages as m

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    try:
        with Workers(tmp_path) as workers:
            workers.start(endpoint, "r")
            assert router.poll(30_000), workers.logs()
            first, data = router.recv_multipart()
            assert m.decode(data, sender="worker").type == "hello"
            router.send_multipart([first, m.encode(m.Welcome(rig_id="r", heartbeat_s=0.25, liveness=8,
                                                             server_time=time.time()))])
            assert wait_until(lambda: "registered with" in workers.logs(), 20), workers.logs()
            router.send_multipart([first, b"\x00" * (m.MAX_TRIAL_BYTES + 8192)])
            # libzmq ends that connection for good (a protocol error is not reconnected); the worker
            # hears nothing more, so after heartbeat_s * liveness it says hello on a new socket. Had the
            # frame been delivered, these heartbeats would keep the first connection alive.
            end = time.monotonic() + 20
            others: set[bytes] = set()
            while time.monotonic() < end and not others:
                router.send_multipart([first, m.encode(m.Heartbeat(sent_at=time.time()))])
                if router.poll(200):
                    ident, data = router.recv_multipart()
                    if ident != first and m.decode(data, sender="worker").type == "hello":
                        others.add(ident)
            assert others, "the connection survived an oversized frame: " + workers.logs()[-2000:]
    finally:
        router.close(0)
        ctx.term()


def test_a_worker_busy_starting_its_session_keeps_its_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The network thread cannot run while the adapter holds the GIL: on waking, the silence it could
    not hear must not count against the orchestrator (it once reconnected mid-start, losing a trial)."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Workers(tmp_path) as workers, RigServer(endpoint, insecure=True) as srv:
        srv.set_session("s1", "x")
        workers.start(endpoint, "r", adapter="adapters_for_tests:GilHoggingStart")
        srv.wait_for_rigs(["gil_hog"], 1, 30)
        assert wait_until(lambda: srv.rigs() and srv.rigs()[0].session_ready == "s1", 60), workers.logs()
        assert srv.run_trial(cmd(1)).rig_id == "r"
        logs = workers.logs()
    assert "no word from the orchestrator" not in logs and logs.count("registered with") == 1, logs


def test_hostile_clocks_are_refused_at_the_wire_and_the_server_serves_on(tmp_path: Path) -> None:
    """A hello clock of 1e300 and a result in nanoseconds from a raw peer: refused, named, nothing
    registered or recorded, and a real rig is served as before."""
    import msgpack

    from orchestrator import messages as m
    from test_transport_helpers import RawRig

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Workers(tmp_path) as workers, RigServer(endpoint, insecure=True) as srv:
        srv.set_session("s1", "x")
        raw = RawRig(endpoint)
        try:
            hello = msgpack.unpackb(m.encode(m.Hello(
                rig_id="raw", adapters=["null"], software_version="t", clock=m.ClockInfo(time=time.time()),
                capabilities=m.Capabilities(stimulus_types=["*"], response_kinds=["gaussian"]))))
            raw.send(msgpack.packb({**hello, "clock": {"time": 1e300, "source": "time.time"}}))
            err = raw.expect("error", timeout=5)
            assert err.code == "bad_message" and "hello.clock.time: 1e+300 is not a plausible time" in err.message
            result = msgpack.unpackb(m.encode(m.Result(trial_id="s1:1", attempt=1, session_id="s1",
                                                       response={"value": 1}, timing={})))
            raw.send(msgpack.packb({**result, "timing": {"presented_at": time.time_ns()}}))
            err = raw.expect("error", timeout=5)
            assert "result.timing.presented_at" in err.message and "nanoseconds" in err.message
        finally:
            raw.close()
        assert srv.stats["rejected"] >= 2 and srv.stats["registrations"] == 0
        workers.start(endpoint, "r")
        [info] = srv.wait_for_rigs(["null"], 1, 30)
        assert info.clock_offset_s is None or abs(info.clock_offset_s) < 60
        assert srv.run_trial(cmd(1)).rig_id == "r"
