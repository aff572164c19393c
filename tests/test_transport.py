"""RigServer on real sockets: registration, dispatch, loss detection, clocks, hostile input, Curve."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import keys as keyfiles
from orchestrator import messages as m
from orchestrator.transport import (AttemptFailed, NoRigError, RigLost, RigServer, TrialRejected, TrialTimeout)
from rig_adapters.simulated import NullAdapter
from rig_adapters.worker import RigWorker
from test_transport_helpers import RawRig, cmd, wait_until

LOOP = "tcp://127.0.0.1:0"


@pytest.fixture
def server() -> Any:
    with RigServer(LOOP, insecure=True, heartbeat_s=1.0, liveness=5) as srv:
        srv.set_session("s1", "protocol text")
        yield srv


@pytest.fixture
def raw(server: RigServer) -> Any:
    rig = RawRig(server.endpoint)
    yield rig
    rig.close()


def registered(server: RigServer, raw: RawRig, rig_id: str = "raw") -> m.Welcome:
    raw.hello(rig_id)
    welcome = raw.expect("welcome")
    assert welcome.session_id == "s1" and welcome.protocol_text == "protocol text" and welcome.rig_id == rig_id
    raw.send(m.Heartbeat(sent_at=time.time(), session_ready="s1"))  # "my adapter has started the session"
    assert wait_until(lambda: any(r.session_ready == "s1" for r in server.rigs() if r.rig_id == rig_id), 2)
    return welcome


def test_ephemeral_port_is_resolved() -> None:
    with RigServer("tcp://127.0.0.1:0", insecure=True) as srv:
        assert srv.endpoint.startswith("tcp://127.0.0.1:") and not srv.endpoint.endswith((":0", ":*"))
    with RigServer("tcp://127.0.0.1:*", insecure=True) as srv:
        assert int(srv.endpoint.rsplit(":", 1)[1]) > 0


def test_plain_text_refused_off_loopback(tmp_path: Path) -> None:
    with pytest.raises(keyfiles.SecurityError, match="not a loopback address"):
        RigServer("tcp://0.0.0.0:0", insecure=True)
    with pytest.raises(keyfiles.SecurityError, match="needs Curve keys"):
        RigServer(LOOP)
    with pytest.raises(keyfiles.SecurityError, match="orchestrator.key_secret not found"):
        RigServer("tcp://0.0.0.0:0", keys_dir=tmp_path)


def test_wait_for_rigs_times_out_with_a_clear_error() -> None:
    notes: list[str] = []
    with RigServer(LOOP, insecure=True) as srv:
        start = time.monotonic()
        with pytest.raises(NoRigError) as err:
            srv.wait_for_rigs(["psychopy"], 1, 0.3, progress=notes.append)
        assert 0.3 <= time.monotonic() - start < 1.5
        assert srv.endpoint in str(err.value) and "psychopy" in str(err.value)
    assert notes and srv.endpoint in notes[0] and "psychopy" in notes[0]


def test_capability_matching(server: RigServer, raw: RawRig) -> None:
    registered(server, raw)
    with pytest.raises(NoRigError, match=r"registered rigs: raw \(adapters \['null'\]"):
        server.wait_for_rigs(["psychopy"], 1, 0.2)
    [info] = server.wait_for_rigs(["psychopy", "null"], 1, 1.0)
    assert info.rig_id == "raw" and info.adapters == ("null",) and info.software_version == "test"


def test_trial_round_trip_and_clock_mapping(server: RigServer, raw: RawRig) -> None:
    skew = 1000.0  # the rig's clock runs 1000 s ahead
    raw.hello("raw", clock=time.time() + skew)
    raw.expect("welcome")
    hb = raw.recv(2.0, skip_heartbeats=False)  # the server sends a heartbeat right after welcome
    assert hb.type == "heartbeat"
    t1 = time.time() + skew
    raw.send(m.Heartbeat(sent_at=time.time() + skew, echo_sent_at=hb.sent_at, echo_received_at=t1,
                         session_ready="s1"))
    server.wait_for_rigs(["null"], 1, 1.0)
    assert wait_until(lambda: server.rigs()[0].clock_rtt_s is not None, 2.0)
    fut = server.submit(cmd(7, stimulus={"lag": 3}))
    trial = raw.expect("trial")
    assert (trial.trial_id, trial.attempt, trial.index, trial.stimulus) == ("s1:7", 1, 7, {"lag": 3})
    presented = time.time() + skew
    raw.send(m.Result(trial_id=trial.trial_id, attempt=1, session_id="s1", response={"value": 0.5},
                      timing={"presented_at": presented, "responded_at": presented + 0.2}))
    out = fut.result(timeout=2)
    assert out.rig_id == "raw" and out.response == {"value": 0.5} and not out.cached
    assert out.timing["presented_at"] == presented
    assert abs(out.clock_offset_s - skew) < 0.05
    assert abs(out.mapped_timing["presented_at"] - (presented - out.clock_offset_s)) < 1e-6
    assert abs(out.mapped_timing["presented_at"] - time.time()) < 0.5  # back on our clock
    assert 0 <= out.round_trip_s < 2


def test_out_of_order_and_stray_messages_never_become_trial_data(server: RigServer, raw: RawRig) -> None:
    raw.send(m.Result(trial_id="s1:1", attempt=1, session_id="s1", response={"value": 1}, timing={}))
    err = raw.expect("error")
    assert err.code == "not_registered" and "before hello" in err.message
    registered(server, raw)
    fut = server.submit(cmd(1))
    raw.expect("trial")
    raw.send(m.Result(trial_id="s1:1", attempt=2, session_id="s1", response={"value": 9}, timing={}))
    assert raw.expect("error").code == "unexpected"
    raw.send(m.Result(trial_id="s1:999", attempt=1, session_id="s1", response={"value": 9}, timing={}))
    assert raw.expect("error").code == "unexpected"
    raw.send(m.Result(trial_id="s1:1", attempt=1, session_id="other", response={"value": 9}, timing={}))
    assert "session" in raw.expect("error").message
    assert not fut.done()
    raw.send(m.Result(trial_id="s1:1", attempt=1, session_id="s1", response={"value": 1}, timing={}))
    assert fut.result(timeout=2).response == {"value": 1}
    raw.send(m.Result(trial_id="s1:1", attempt=1, session_id="s1", response={"value": 1}, timing={}))
    assert raw.expect("error").code == "unexpected"  # a duplicate answer is refused too
    assert server.stats["rejected"] >= 5 and server.stats["results"] == 1


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([b"\xc1garbage"], "not a valid msgpack"),
        ([msgpack.packb({"v": 7, "type": "hello"})], "unsupported protocol version 7"),
        ([msgpack.packb({"v": 1, "type": "trial"})], "a worker may not send 'trial'"),
        ([msgpack.packb({"v": 1, "type": "hello", "rig_id": 5})], "hello.rig_id"),
        ([b"\x00" * (m.MAX_MESSAGE_BYTES + 10)], "exceeds the limit"),
        ([b"a", b"b"], "expected 1 message frame, got 2"),
        ([b""], "empty message"),
    ],
)
def test_hostile_frames_get_an_error_reply(server: RigServer, raw: RawRig, frames: list[bytes], fragment: str) -> None:
    raw.sock.send_multipart(frames)
    err = raw.expect("error")
    assert err.code == "bad_message" and fragment in err.message
    registered(server, raw)  # the server is still fine and accepts this peer afterwards
    assert server.rigs()[0].rig_id == "raw"


def test_worker_error_fails_the_attempt(server: RigServer, raw: RawRig) -> None:
    registered(server, raw)
    fut = server.submit(cmd(2))
    raw.expect("trial")
    raw.send(m.ErrorMessage(code="aborted", message="lamp broke", trial_id="s1:2", attempt=1))
    with pytest.raises(TrialRejected, match="lamp broke") as err:
        fut.result(timeout=2)
    assert isinstance(err.value, AttemptFailed) and err.value.rig_id == "raw" and err.value.attempt == 1
    assert err.value.code == "aborted"


def test_trial_timeout(server: RigServer, raw: RawRig) -> None:
    registered(server, raw)
    start = time.monotonic()
    with pytest.raises(TrialTimeout, match="within 0.3 s"):
        server.run_trial(cmd(3), timeout_s=0.3)
    assert 0.3 <= time.monotonic() - start < 1.0


def test_no_free_rig_within_rig_wait(server: RigServer) -> None:
    with pytest.raises(NoRigError, match="no free"):
        server.run_trial(cmd(4), rig_wait_s=0.2)


def test_silent_rig_is_declared_lost_within_a_second() -> None:
    with RigServer(LOOP, insecure=True) as srv:  # defaults: heartbeat 0.25 s x 3
        srv.set_session("s1", "x")
        raw = RawRig(srv.endpoint)
        try:
            raw.hello()
            raw.expect("welcome")
            raw.send(m.Heartbeat(sent_at=time.time(), session_ready="s1"))  # adapter started: no more grace
            fut = srv.submit(cmd(1))
            raw.expect("trial")
            start = time.monotonic()  # from now on the raw rig says nothing at all
            with pytest.raises(RigLost, match="silent for") as err:
                fut.result(timeout=3)
            assert time.monotonic() - start <= 1.0
            assert err.value.trial_id == "s1:1" and srv.rigs() == []
        finally:
            raw.close()


def test_closed_connection_is_noticed_in_milliseconds(server: RigServer) -> None:
    raw = RawRig(server.endpoint)
    registered(server, raw)
    fut = server.submit(cmd(1))
    raw.expect("trial")
    start = time.monotonic()
    raw.close()
    with pytest.raises(RigLost, match="connection gone"):
        fut.result(timeout=3)
    assert time.monotonic() - start < 0.5  # the heartbeat deadline here is 5 s


def test_retry_goes_to_another_rig_and_re_registration_replaces_the_old_one(server: RigServer) -> None:
    a, b = RawRig(server.endpoint), RawRig(server.endpoint)
    try:
        registered(server, a, "rig-a")
        registered(server, b, "rig-b")
        fut = server.submit(cmd(1), rig_id="rig-a")
        a.expect("trial")
        a2 = RawRig(server.endpoint)  # rig-a restarted: new connection, same rig id
        registered(server, a2, "rig-a")
        with pytest.raises(RigLost, match="registered again"):
            fut.result(timeout=2)
        fut = server.submit(cmd(1, attempt=2), rig_id="rig-b")
        t = b.expect("trial")
        assert t.attempt == 2
        b.send(m.Result(trial_id=t.trial_id, attempt=2, session_id="s1", response={"value": 3}, timing={}))
        assert fut.result(timeout=2).rig_id == "rig-b"
        assert {e["event"] for e in server.events} >= {"registered", "rig_lost", "retry_dispatched"}
        a2.close()
    finally:
        a.close()
        b.close()


def test_pending_retry_waits_for_a_rig_to_come_back(server: RigServer) -> None:
    fut = server.submit(cmd(5, attempt=2), rig_wait_s=5)
    time.sleep(0.2)
    assert not fut.done()
    raw = RawRig(server.endpoint)
    try:
        registered(server, raw)
        t = raw.expect("trial")
        raw.send(m.Result(trial_id=t.trial_id, attempt=2, session_id="s1", response={"value": 1}, timing={}))
        assert fut.result(timeout=2).attempt == 2
    finally:
        raw.close()


def test_joint_trial_on_two_rigs(server: RigServer) -> None:
    a, b = RawRig(server.endpoint), RawRig(server.endpoint)
    try:
        registered(server, a, "display")
        registered(server, b, "stimulator")
        box: dict[str, Any] = {}
        th = threading.Thread(target=lambda: box.update(server.run_joint({"display": cmd(1), "stimulator": cmd(1)})))
        th.start()
        for rig, value in ((a, 1), (b, 2)):
            t = rig.expect("trial")
            rig.send(m.Result(trial_id=t.trial_id, attempt=1, session_id="s1", response={"value": value}, timing={}))
        th.join(timeout=3)
        assert {k: v.response["value"] for k, v in box.items()} == {"display": 1, "stimulator": 2}
    finally:
        a.close()
        b.close()


def test_close_fails_pending_and_says_bye(server: RigServer, raw: RawRig) -> None:
    registered(server, raw)
    fut = server.submit(cmd(1))
    raw.expect("trial")
    server.close()
    with pytest.raises(RigLost, match="shutting down"):
        fut.result(timeout=2)
    assert raw.expect("bye").reason == "orchestrator shutting down"


# ----------------------------------------------------------------------------- live ROUTER fuzzing
_payload = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=10)
_valid = [
    {"v": 1, "type": "result", "trial_id": "s1:1", "attempt": 1, "session_id": "s1", "response": {"value": 1},
     "timing": {}},
    {"v": 1, "type": "heartbeat", "sent_at": 1.0},
    {"v": 1, "type": "hello", "rig_id": "fz", "adapters": ["null"],
     "capabilities": {"stimulus_types": ["*"], "response_kinds": ["gaussian"]}, "software_version": "x",
     "clock": {"time": 1.0}},
]


@st.composite
def hostile(draw: Any) -> bytes:
    kind = draw(st.sampled_from(["bytes", "mutated", "map"]))
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "map":
        return msgpack.packb(draw(st.dictionaries(st.text(max_size=8), _payload, max_size=6)))
    d = dict(draw(st.sampled_from(_valid)))
    d[draw(st.sampled_from(sorted(d)))] = draw(_payload)
    return msgpack.packb(d)


@pytest.fixture(scope="module")
def fuzz_target() -> Any:
    with RigServer(LOOP, insecure=True, heartbeat_s=5.0, liveness=5) as srv:
        srv.set_session("s1", "x")
        raw = RawRig(srv.endpoint)
        yield srv, raw
        raw.close()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=hostile())
def test_fuzz_live_router(fuzz_target: Any, data: bytes) -> None:
    srv, raw = fuzz_target
    try:
        decoded = m.decode(data, sender="worker")
    except m.MessageError:
        decoded = None
    before = srv.stats["rejected"]
    was_registered = bool(srv.rigs())  # only this peer talks to the fuzz server
    raw.sock.send(data)
    if decoded is None:
        err = raw.expect("error")
        assert err.code == "bad_message"
        assert srv.stats["rejected"] == before + 1
    elif decoded.type == "hello":
        assert raw.expect("welcome").rig_id == decoded.rig_id
    elif decoded.type in ("error", "bye"):
        pass  # never answered (no error ping-pong), possibly ends the registration
    elif decoded.type == "heartbeat" and was_registered:
        reply = raw.recv(0.2)
        assert reply is None  # liveness only: nothing to answer
    else:
        reply = raw.recv(2.0)
        assert reply is not None and reply.type == "error"
    assert srv._thread.is_alive()
    assert srv.stats["results"] == 0 and srv.stats["internal_errors"] == 0


def test_server_still_serves_a_real_worker_after_fuzzing(fuzz_target: Any) -> None:
    srv, _ = fuzz_target
    worker = RigWorker(srv.endpoint, NullAdapter(value=4.0), rig_id="after-fuzz", insecure=True)
    th = threading.Thread(target=worker.run, daemon=True)
    th.start()
    try:
        srv.wait_for_rigs(["null"], 1, 5)
        out = srv.run_trial(cmd(1), rig_id="after-fuzz")
        assert out.response == {"value": 4.0} and out.rig_id == "after-fuzz"
    finally:
        worker.stop()
        th.join(timeout=5)


# ----------------------------------------------------------------------------- Curve
@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    k = tmp_path / "keys"
    keyfiles.generate(k, "orchestrator")
    (k / "rigs").mkdir()
    for name in ("good", "stranger"):
        keyfiles.generate(k, name)
    (k / "rigs" / "good.key").write_bytes((k / "good.key").read_bytes())
    return k


def _run_worker(endpoint: str, rig_id: str, **kw: Any) -> tuple[RigWorker, threading.Thread]:
    w = RigWorker(endpoint, NullAdapter(), rig_id=rig_id, heartbeat_s=0.1, **kw)
    th = threading.Thread(target=w.run, daemon=True)
    th.start()
    return w, th


def test_curve_accepts_only_allow_listed_keys(keydir: Path) -> None:
    with RigServer(LOOP, keys_dir=keydir) as srv:
        srv.set_session("s1", "x")
        good = _run_worker(srv.endpoint, "good", keys_dir=keydir, key_name="good")
        stranger = _run_worker(srv.endpoint, "stranger", keys_dir=keydir, key_name="stranger")
        raw = RawRig(srv.endpoint)  # no key at all: plain-text hello to a Curve server
        raw.hello("keyless")
        try:
            [info] = srv.wait_for_rigs(["null"], 1, 5)
            assert info.rig_id == "good" and info.key_name == "good"
            assert srv.run_trial(cmd(1)).rig_id == "good"
            assert wait_until(lambda: srv.stats["auth_failed"] >= 2 and stranger[0].stats["auth_failed"] >= 1, 3)
            time.sleep(0.5)
            assert [r.rig_id for r in srv.rigs()] == ["good"]
            assert srv.stats["registrations"] == 1 and srv.stats["rejected"] == 0
            assert raw.recv(0.2) is None and not stranger[0].connected.is_set()
            # Adding the stranger's public key to the allow-list lets it in without restarting anything:
            # the server notices the changed directory by itself.
            (keydir / "rigs" / "stranger.key").write_bytes((keydir / "stranger.key").read_bytes())
            srv.wait_for_rigs(["null"], 2, 10)
            assert sorted(r.key_name for r in srv.rigs()) == ["good", "stranger"]
        finally:
            raw.close()
            for w, th in (good, stranger):
                w.stop()
                th.join(timeout=5)


def test_curve_raw_dealer_with_unknown_key_gets_nothing(keydir: Path) -> None:
    with RigServer(LOOP, keys_dir=keydir) as srv:
        pub, sec = zmq.curve_keypair()
        server_pub, _ = zmq.auth.load_certificate(str(keydir / "orchestrator.key"))
        raw = RawRig(srv.endpoint, curve=(pub, sec, server_pub))
        try:
            raw.hello("intruder")
            raw.send(b"\xc1garbage")
            assert raw.recv(0.5) is None
            assert srv.rigs() == [] and srv.stats["rejected"] == 0 and srv.stats["auth_failed"] >= 1
        finally:
            raw.close()


def test_submit_many_in_flight_with_pipeline() -> None:
    with RigServer(LOOP, insecure=True, pipeline=4) as srv:
        srv.set_session("s1", "x")
        w, th = _run_worker(srv.endpoint, "p", insecure=True)
        try:
            srv.wait_for_rigs(["null"], 1, 5)
            futs = [srv.submit(cmd(i)) for i in range(200)]
            outs = [f.result(timeout=10) for f in concurrent.futures.as_completed(futs)]
            assert sorted(o.trial_id for o in outs) == sorted(f"s1:{i}" for i in range(200))
            assert w.stats["presented"] == 200
        finally:
            w.stop()
            th.join(timeout=5)


def test_numpy_values_from_design_code_are_sent_as_plain_numbers(server: RigServer, raw: RawRig) -> None:
    import numpy as np

    registered(server, raw)
    c = cmd(1, stimulus={"lag": np.int64(5), "contrast": np.float32(0.25), "xy": np.array([1, 2])})
    server.submit(c)
    t = raw.expect("trial")
    assert t.stimulus == {"lag": 5, "contrast": 0.25, "xy": [1, 2]} and type(t.stimulus["lag"]) is int


def test_a_rig_starting_its_session_gets_a_grace_period_but_a_crash_still_shows() -> None:
    with RigServer(LOOP, insecure=True, session_start_grace_s=1.5) as srv:
        srv.set_session("s1", "x")
        raw = RawRig(srv.endpoint)
        try:
            raw.hello()
            raw.expect("welcome")
            time.sleep(1.0)  # silent, but still within the grace: loading models takes time
            assert [r.rig_id for r in srv.rigs()] == ["raw"]
            assert wait_until(lambda: srv.rigs() == [], 2.0)  # grace over, still silent: lost
            raw.hello()
            raw.expect("welcome")
            fut = srv.submit(cmd(1))
            raw.expect("trial")
        finally:
            raw.close()
        start = time.monotonic()
        with pytest.raises(RigLost, match="connection gone"):  # crash during the grace: noticed at once
            fut.result(timeout=3)
        assert time.monotonic() - start < 0.5


def test_wait_for_rigs_waits_until_the_session_is_started_and_reports_start_failures(server: RigServer,
                                                                                      raw: RawRig) -> None:
    raw.hello("slow")
    raw.expect("welcome")
    with pytest.raises(NoRigError, match="slow .*still starting the session"):
        server.wait_for_rigs(["null"], 1, 0.3)
    raw.send(m.ErrorMessage(code="session_failed", message="projector not found"))
    with pytest.raises(NoRigError, match="could not start the session: projector not found"):
        server.wait_for_rigs(["null"], 1, 0.3)
    raw.send(m.Heartbeat(sent_at=time.time(), session_ready="s1"))
    [info] = server.wait_for_rigs(["null"], 1, 2)
    assert info.session_ready == "s1" and info.start_error is None


def test_address_in_use_fails_fast_and_cleanly(server: RigServer) -> None:
    start = time.monotonic()
    with pytest.raises(zmq.ZMQError, match="in use"):
        RigServer(server.endpoint, insecure=True)
    assert time.monotonic() - start < 2


def test_curve_rig_ids_are_bound_to_keys_and_revocation_takes_effect(keydir: Path) -> None:
    (keydir / "rigs" / "stranger.key").write_bytes((keydir / "stranger.key").read_bytes())
    server_pub, _ = zmq.auth.load_certificate(str(keydir / "orchestrator.key"))
    def curve_of(name: str) -> tuple[bytes, bytes, bytes]:
        pub, sec = zmq.auth.load_certificate(str(keydir / f"{name}.key_secret"))
        return pub, sec, server_pub
    with RigServer(LOOP, keys_dir=keydir) as srv:
        srv.set_session("s1", "x")
        good, stranger = RawRig(srv.endpoint, curve=curve_of("good")), RawRig(srv.endpoint, curve=curve_of("stranger"))
        try:
            good.hello("lab-1")
            good.expect("welcome")
            stranger.hello("lab-1")  # an authenticated rig trying to take over another rig's id
            err = stranger.expect("error")
            assert err.code == "rig_id_taken" and "registered with another key (good)" in err.message
            assert [(r.rig_id, r.key_name) for r in srv.rigs()] == [("lab-1", "good")]
            (keydir / "rigs" / "good.key").unlink()  # revoke: the open connection is dropped too
            assert good.expect("bye", timeout=5).reason.startswith("this rig's key was removed")
            assert srv.rigs() == []
            good.hello("lab-1")
            assert good.expect("error").code == "not_allowed"
        finally:
            good.close()
            stranger.close()
