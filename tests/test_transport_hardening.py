"""RigServer under hostile conditions: file-handle exhaustion, revocation, oversized input, id theft."""

from __future__ import annotations

import errno
import re
import resource
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import zmq

from orchestrator import keys as keyfiles
from orchestrator import messages as m
from orchestrator.rig_api import AttemptFailed, FailureReason, NoRigError, RigLost, TrialRejected
from orchestrator.transport import MAX_INBOUND_FRAME_BYTES, PEER_BUFFER_BYTES, RigServer, guard
from orchestrator.protocol_checks import load_checked
from rig_adapters.simulated import NullAdapter
from rig_adapters.worker import RigWorker
from test_transport_helpers import RawRig, cmd, wait_until

LOOP = "tcp://127.0.0.1:0"


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    k = tmp_path / "keys"
    keyfiles.generate(k, "orchestrator")
    (k / "rigs").mkdir()
    for name in ("good", "other", "spare"):
        keyfiles.generate(k, name)
    for name in ("good", "other"):
        (k / "rigs" / f"{name}.key").write_bytes((k / f"{name}.key").read_bytes())
    return k


def curve_of(keydir: Path, name: str) -> tuple[bytes, bytes, bytes]:
    server_pub, _ = zmq.auth.load_certificate(str(keydir / "orchestrator.key"))
    pub, sec = zmq.auth.load_certificate(str(keydir / f"{name}.key_secret"))
    return pub, sec, server_pub


def worker(endpoint: str, rig_id: str, **kw: Any) -> tuple[RigWorker, threading.Thread]:
    w = RigWorker(endpoint, NullAdapter(), rig_id=rig_id, heartbeat_s=0.1, **kw)
    th = threading.Thread(target=w.run, daemon=True)
    th.start()
    return w, th


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.fixture
def low_fd_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"hard open-file limit {hard} is too low to show the raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ----------------------------------------------------------------------------- file handles
def test_many_idle_connections_neither_exhaust_handles_nor_stop_trials(keydir: Path, low_fd_limit: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "HANDSHAKE_TIMEOUT_MS", 1000)
    with RigServer(LOOP, keys_dir=keydir) as srv:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert soft == hard == low_fd_limit == srv.open_file_limit  # 256 would be exhausted below
        srv.set_session("s1", "x")
        port = int(srv.endpoint.rsplit(":", 1)[1])
        idle = []
        for _ in range(400):  # connect and never say anything: more than the old soft limit
            s = socket.create_connection(("127.0.0.1", port))
            idle.append(s)
        w, th = worker(srv.endpoint, "good", keys_dir=keydir, key_name="good")
        try:
            srv.wait_for_rigs(["null"], 1, 10)
            for i in range(5):
                assert srv.run_trial(cmd(i)).rig_id == "good"
            # Idle peers that never finish the handshake are closed by libzmq after the handshake interval.
            for s in idle[:20]:
                s.settimeout(5)
                while s.recv(4096):  # the server's greeting, then the end of the connection
                    pass
            srv.reload_keys()  # the allow-list re-check, which died of EMFILE before, still works
            assert srv.run_trial(cmd(9)).rig_id == "good" and srv._thread.is_alive()
        finally:
            for s in idle:
                s.close()
            w.stop()
            th.join(timeout=5)


def test_idle_connections_beyond_the_cap_are_closed_before_the_handshake_timeout(keydir: Path) -> None:
    with RigServer(LOOP, keys_dir=keydir) as srv:
        srv.set_session("s1", "x")
        port = int(srv.endpoint.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(guard.MAX_IDLE_CONNECTIONS + 100)]
        w, th = worker(srv.endpoint, "good", keys_dir=keydir, key_name="good")
        try:
            srv.wait_for_rigs(["null"], 1, 10)
            assert wait_until(lambda: srv._budget.idle_closed >= 100, 3)  # well inside the 5 s handshake limit
            closed = 0
            for s in idle[:100]:  # the oldest went first
                s.settimeout(2)
                try:
                    while s.recv(4096):
                        pass
                except ConnectionResetError:
                    pass
                closed += 1  # end of stream or reset; a timeout would have failed the test
            assert closed == 100
            assert srv.run_trial(cmd(1)).rig_id == "good"  # the rig, which delivered messages, stays
        finally:
            for s in idle:
                s.close()
            w.stop()
            th.join(timeout=5)


def test_an_oserror_in_the_allow_list_recheck_does_not_kill_the_network_thread(keydir: Path) -> None:
    with RigServer(LOOP, keys_dir=keydir) as srv:
        srv.set_session("s1", "x")
        w, th = worker(srv.endpoint, "good", keys_dir=keydir, key_name="good")
        try:
            srv.wait_for_rigs(["null"], 1, 10)
            calls = []

            def exhausted() -> Any:
                calls.append(1)
                raise OSError(errno.EMFILE, "Too many open files")

            srv._allow.signature = exhausted  # fault injection: every look at the directory fails
            srv._allow._next_check = 0.0
            assert wait_until(lambda: len(calls) >= 1, 5)
            assert srv._thread.is_alive() and srv.stats["internal_errors"] >= 1
            for i in range(3):
                assert srv.run_trial(cmd(i)).rig_id == "good"
            assert [r.rig_id for r in srv.rigs()] == ["good"]  # the current list was kept
        finally:
            w.stop()
            th.join(timeout=5)


def test_a_directory_that_cannot_be_read_for_lack_of_handles_keeps_the_list(keydir: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with RigServer(LOOP, keys_dir=keydir) as srv:
        before = dict(srv._allow.keys)

        def glob(self: Path, pattern: str) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(Path, "glob", glob)
        srv._allow._next_check = 0.0
        srv._check_allow_list(time.monotonic())
        assert srv._allow.keys == before and srv.stats["allow_list_unavailable"] == 1


# ----------------------------------------------------------------------------- revocation
def test_overwriting_a_key_file_with_another_key_drops_the_old_key_at_once(keydir: Path) -> None:
    with RigServer(LOOP, keys_dir=keydir) as srv:
        srv.set_session("s1", "x")
        old = RawRig(srv.endpoint, curve=curve_of(keydir, "good"))
        try:
            old.hello("lab-1")
            old.expect("welcome")
            # Same file name, different key: the rig behind the old key must not keep its connection.
            (keydir / "rigs" / "good.key").write_bytes((keydir / "spare.key").read_bytes())
            assert old.expect("bye", timeout=5).reason.startswith("this rig's key was removed")
            assert srv.rigs() == []
        finally:
            old.close()
        refused = srv.stats["auth_failed"]
        again = RawRig(srv.endpoint, curve=curve_of(keydir, "good"))  # new connection, revoked key
        new = RawRig(srv.endpoint, curve=curve_of(keydir, "spare"))   # the replacement key, same name
        try:
            assert wait_until(lambda: srv.stats["auth_failed"] > refused, 5)  # refused in the handshake
            new.hello("lab-1")
            assert new.expect("welcome").rig_id == "lab-1"
            assert [(r.rig_id, r.key_name) for r in srv.rigs()] == [("lab-1", "good")]
        finally:
            again.close()
            new.close()


@pytest.mark.parametrize("content", [b"", b"not a certificate\n", b"metadata\ncurve\n    public-key = \"short\"\n"])
def test_a_bad_file_in_the_allow_list_is_reported_and_skipped_and_revocation_still_works(keydir: Path,
                                                                                          content: bytes) -> None:
    with RigServer(LOOP, keys_dir=keydir) as srv:
        srv.set_session("s1", "x")
        good = RawRig(srv.endpoint, curve=curve_of(keydir, "good"))
        other = RawRig(srv.endpoint, curve=curve_of(keydir, "other"))
        try:
            for rig, rig_id in ((good, "lab-1"), (other, "lab-2")):
                rig.hello(rig_id)
                rig.expect("welcome")
            (keydir / "rigs" / "broken.key").write_bytes(content)
            (keydir / "rigs" / "good.key").unlink()  # revoked in the same change as the broken file
            assert good.expect("bye", timeout=5).reason.startswith("this rig's key was removed")
            assert wait_until(lambda: "broken.key" in srv._allow.problems, 2)
            assert "allow-list files skipped: broken.key" in srv.seen()
            assert [r.rig_id for r in srv.rigs()] == ["lab-2"]  # the good files still count
            other.hello("lab-2")
            assert other.expect("welcome").rig_id == "lab-2"
        finally:
            good.close()
            other.close()
        refused = srv.stats["auth_failed"]
        revoked = RawRig(srv.endpoint, curve=curve_of(keydir, "good"))
        try:
            assert wait_until(lambda: srv.stats["auth_failed"] > refused, 5) and srv.rigs() == []
        finally:
            revoked.close()


# ----------------------------------------------------------------------------- memory
def test_max_inbound_frame_is_set_on_the_router_and_fits_the_protocol() -> None:
    assert MAX_INBOUND_FRAME_BYTES >= m.MAX_MESSAGE_BYTES and PEER_BUFFER_BYTES >= MAX_INBOUND_FRAME_BYTES
    with RigServer(LOOP, insecure=True) as srv:
        assert srv._sock.getsockopt(zmq.MAXMSGSIZE) == MAX_INBOUND_FRAME_BYTES
        raw = RawRig(srv.endpoint)
        try:  # a frame over the hard limit: libzmq drops the peer instead of buffering it
            raw.send(b"\x00" * (MAX_INBOUND_FRAME_BYTES + 1))
            assert raw.recv(0.5) is None
            assert wait_until(lambda: srv.stats["disconnects"] >= 1, 3)
        finally:
            raw.close()


def raw_zmtp_peer(port: int) -> socket.socket:
    """A hand-written ZMTP 3.0 peer (NULL mechanism): it can send frames libzmq itself would hold back."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" * 32)
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", 6) + b"DEALER"
    s.sendall(bytes([0x04, len(body)]) + body)
    return s


def test_an_unfinished_huge_multipart_does_not_grow_memory() -> None:
    with RigServer(LOOP, insecure=True) as srv:
        srv.set_session("s1", "x")
        w, th = worker(srv.endpoint, "good", insecure=True)
        attacker = raw_zmtp_peer(int(srv.endpoint.rsplit(":", 1)[1]))
        try:
            srv.wait_for_rigs(["null"], 1, 10)
            frame = bytes([0x03]) + struct.pack(">Q", 1 << 20) + b"\x00" * (1 << 20)  # MORE, long, 1 MiB
            base = rss_bytes()
            sent = 0
            end = time.monotonic() + 10.0
            with pytest.raises(OSError):  # the server ends the connection long before the 10 s are over
                while time.monotonic() < end:  # frame after frame, never the last one
                    attacker.sendall(frame)
                    sent += len(frame)
            grown = rss_bytes() - base
            assert wait_until(lambda: srv.stats["over_budget"] == 1, 2) and sent > PEER_BUFFER_BYTES
            # Unbounded, the same attacker grows the process ~165 MB/s (1.6 GB in these 10 s). Bounded means
            # the budget plus what arrives between two budget checks, which on a loaded 2-core box is tens of MB.
            assert grown < 2 * PEER_BUFFER_BYTES + 128e6, f"memory grew {grown / 1e6:.0f} MB for {sent / 1e6:.0f} MB sent"
            assert srv.run_trial(cmd(1)).rig_id == "good"  # the real rig was never disturbed
            assert [r.rig_id for r in srv.rigs()] == ["good"]
        finally:
            attacker.close()
            w.stop()
            th.join(timeout=5)


def test_a_rig_sending_many_complete_messages_stays_within_its_budget() -> None:
    with RigServer(LOOP, insecure=True) as srv:
        srv.set_session("s1", "x")
        raw = RawRig(srv.endpoint)
        try:
            raw.hello("busy")
            raw.expect("welcome")
            note = m.ErrorMessage(code="x", message="y" * 4000)
            for _ in range(3):  # 3 x 700 messages of 4 kB: twice the budget in bytes, all delivered
                for _ in range(700):
                    raw.send(note)
                time.sleep(0.3)
            assert 2100 * 4000 > 2 * PEER_BUFFER_BYTES
            assert wait_until(lambda: srv.stats["worker_errors"] == 2100, 30)
            assert srv.stats["over_budget"] == 0 and [r.rig_id for r in srv.rigs()] == ["busy"]
        finally:
            raw.close()


# ----------------------------------------------------------------------------- rig id bindings
def test_a_rig_id_stays_bound_to_its_first_key_after_the_rig_left(keydir: Path) -> None:
    bound: list[tuple[str, str]] = []
    with RigServer(LOOP, keys_dir=keydir, on_rig_bound=lambda info: bound.append((info.rig_id, info.key_name))) as srv:
        srv.set_session("s1", "x")
        first = RawRig(srv.endpoint, curve=curve_of(keydir, "good"))
        try:
            first.hello("lab-1")
            first.expect("welcome")
            first.send(m.Bye(reason="done for today"))
            assert wait_until(lambda: srv.rigs() == [], 2)
        finally:
            first.close()
        thief = RawRig(srv.endpoint, curve=curve_of(keydir, "other"))
        try:
            thief.hello("lab-1")  # allowed key, but the id belongs to another key
            err = thief.expect("error")
            assert err.code == "rig_id_taken" and "(good)" in err.message and srv.rigs() == []
            thief.hello("lab-2")  # its own id is fine
            thief.expect("welcome")
        finally:
            thief.close()
        back = RawRig(srv.endpoint, curve=curve_of(keydir, "good"))
        try:
            back.hello("lab-1")
            assert back.expect("welcome").rig_id == "lab-1"
        finally:
            back.close()
        assert srv.rig_keys() == {"lab-1": "good", "lab-2": "other"}
    assert bound == [("lab-1", "good"), ("lab-2", "other")]


def test_preloaded_bindings_are_honoured_and_a_failing_callback_does_not_lose_the_rig(keydir: Path) -> None:
    def broken(info: Any) -> None:
        raise RuntimeError("database is down")

    with RigServer(LOOP, keys_dir=keydir, rig_keys={"lab-1": "good"}, on_rig_bound=broken) as srv:
        thief = RawRig(srv.endpoint, curve=curve_of(keydir, "other"))
        try:
            thief.hello("lab-1")
            assert thief.expect("error").code == "rig_id_taken"
            thief.hello("lab-2")
            assert thief.expect("welcome").rig_id == "lab-2"
            assert [(r.rig_id, r.key_name) for r in srv.rigs()] == [("lab-2", "other")]
        finally:
            thief.close()


# ----------------------------------------------------------------------------- what was seen
def test_a_failed_wait_says_what_was_seen(keydir: Path) -> None:
    with RigServer(LOOP, keys_dir=keydir) as srv:
        srv.set_session("s1", "x")
        left = RawRig(srv.endpoint, curve=curve_of(keydir, "good"))
        stranger = RawRig(srv.endpoint, curve=curve_of(keydir, "spare"))  # not in the allow-list
        bad = RawRig(srv.endpoint, curve=curve_of(keydir, "other"))
        try:
            left.hello("lab-1")
            left.expect("welcome")
            left.send(m.ErrorMessage(code="session_failed", message="unknown truth 'powr'"))
            left.send(m.Bye(reason="adapter failed"))
            assert wait_until(lambda: srv.stats["auth_failed"] >= 1, 5)  # the handshake runs at connect
            bad.send(b"\x81\xa1v\x01")  # a broken hello
            assert bad.expect("error").code == "bad_message"
            with pytest.raises(NoRigError) as err:
                srv.wait_for_rigs(["null"], 1, 1.0)
        finally:
            for r in (left, stranger, bad):
                r.close()
        text = str(err.value)
        assert "registered rigs: none" in text
        assert "rig lab-1 left: rig said bye (adapter failed) (could not start the session: unknown truth 'powr')" in text
        assert "refused unregistered peer" in text
        assert re.search(r"rejected handshakes: (\d+) \(\1 key not in the allow-list\)", text)
        assert srv.seen() in text


def test_failure_reasons_are_set_when_raised() -> None:
    assert RigLost("gone").reason is FailureReason.RIG_LOST
    assert TrialRejected("x", code="aborted").reason is FailureReason.ABORTED
    assert TrialRejected("x", code="refused").reason is FailureReason.REFUSED
    assert TrialRejected("x", code="lamp_broke").reason is FailureReason.ADAPTER_FAILED
    assert not FailureReason.REFUSED.retryable and FailureReason.TIMEOUT.retryable
    assert isinstance(TrialRejected("x"), AttemptFailed)


def test_a_session_that_finds_no_rig_says_what_it_saw(tmp_path: Path) -> None:
    from conftest import ROOT

    from orchestrator.engine import SessionControl
    from orchestrator.protocol import load_protocol
    from orchestrator.session import NoRigError as SessionNoRig
    from orchestrator.session import SessionRequest, execute_session, register_session
    from orchestrator.store import TrialStore
    from test_transport_helpers import free_port

    class Run(SessionControl):
        def checkpoint(self, session_id: str) -> str:
            return "run"

    path = ROOT / "protocols" / "retention.yaml"
    request = SessionRequest(protocol_path=str(path), db_url=f"sqlite:///{tmp_path / 's.db'}",
                             bind=f"tcp://127.0.0.1:{free_port()}", insecure=True, wait_for_rig_s=2.0, seed=1)
    session_id, seed = register_session(request, load_checked(path))

    def rig_with_a_typo() -> None:  # registers, fails to start the session, leaves
        raw = RawRig(request.bind)
        try:
            raw.hello("lab-1", adapters=("simulated",))
            raw.expect("welcome", timeout=10)
            raw.send(m.ErrorMessage(code="session_failed", message="unknown truth model 'powr'"))
            raw.send(m.Bye(reason="adapter failed"))
            time.sleep(0.2)
        finally:
            raw.close()

    th = threading.Thread(target=rig_with_a_typo, daemon=True)
    th.start()
    with pytest.raises(SessionNoRig) as err:
        execute_session(request, session_id, seed, control=Run())
    th.join(timeout=10)
    text = str(err.value)
    assert "registered rigs: none" in text and "rig lab-1 left" in text
    assert "could not start the session: unknown truth model 'powr'" in text
    with TrialStore(request.db_url) as store:
        assert store.session(session_id)["status"] == "no_rig"


def test_the_rig_vocabulary_imports_without_zmq() -> None:
    import subprocess
    import sys

    code = "import sys, orchestrator.rig_api; print('zmq' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
