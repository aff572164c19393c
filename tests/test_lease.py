"""The session lease on real SQLite and PostgreSQL: exclusive, renewable, recoverable after a kill.

Races are between real processes; the CLI test runs a real `cloop run` against a simulated rig and
a second `cloop resume` of the same session.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from conftest import free_port, wait_process
from orchestrator import store as st
from store_factory import loaded_protocol

TRUTH = "power:a=0.9025,b=0.4861"


def _session(store: st.TrialStore, status: str = "interrupted") -> str:
    pid = store.add_protocol(loaded_protocol())
    return store.create_session(protocol_id=pid, subject_id=store.subject("s1"), seed=3, status=status)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lease_is_exclusive_renewable_and_expires(url: str) -> None:
    with st.TrialStore(url) as store:
        sid = _session(store)
        a = st.Holder(socket.gethostname(), os.getpid(), "aaaa")
        b = st.Holder("other-host", 4242, "bbbb")
        assert store.acquire_lease(sid, a, ttl_s=0.5) == a
        assert store.acquire_lease(sid, a, ttl_s=0.5) == a  # re-entrant for its holder
        with pytest.raises(st.LeaseHeld, match=f"another orchestrator \\({a.id}\\)") as err:
            store.acquire_lease(sid, b, ttl_s=5)
        assert err.value.holder == a.id and 0 < err.value.expires_in_s <= 0.5
        assert store.live_holder(sid) == a.id
        store.renew_lease(sid, a, ttl_s=0.5)
        time.sleep(0.7)  # a's holder stalled past its TTL: the lease is free for b
        assert store.live_holder(sid) is None
        assert store.acquire_lease(sid, b, ttl_s=5) == b
        with pytest.raises(st.LeaseLost):
            store.renew_lease(sid, a)
        assert not store.release_lease(sid, a)  # not a's any more: releasing it does nothing
        assert store.lease(sid).holder == b.id
        assert store.release_lease(sid, b)
        assert store.lease(sid).holder is None and store.live_holder(sid) is None


def test_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(url: str) -> None:
    with st.TrialStore(url) as store:
        sid = _session(store)
        dead = st.Holder(socket.gethostname(), _dead_pid(), "dead")
        store.acquire_lease(sid, dead, ttl_s=3600)
        assert store.live_holder(sid) is None  # its process is gone, whatever the TTL says
        me = store.acquire_lease(sid, ttl_s=5)
        assert store.lease(sid).holder == me.id and me.pid == os.getpid()
        # A live process elsewhere is never presumed dead: only its TTL frees it.
        store.release_lease(sid, me)
        remote = st.Holder("elsewhere", _dead_pid(), "r")
        store.acquire_lease(sid, remote, ttl_s=3600)
        with pytest.raises(st.LeaseHeld, match="elsewhere"):
            store.acquire_lease(sid, ttl_s=5)


def test_lease_needs_an_existing_session(url: str) -> None:
    with st.TrialStore(url) as store, pytest.raises(st.SessionNotFound):
        store.acquire_lease("f" * 32)


def test_keeper_renews_in_a_thread_and_releases(url: str) -> None:
    with st.TrialStore(url) as store:
        sid = _session(store)
        with st.LeaseKeeper(store, sid, ttl_s=0.6, interval_s=0.1) as keeper:
            first = store.lease(sid).expires_at
            time.sleep(1.0)  # longer than the TTL: only the renewals keep it
            assert store.live_holder(sid) == keeper.holder.id
            assert store.lease(sid).expires_at > first
            keeper.check()
        assert store.lease(sid).holder is None


RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from orchestrator.store import LeaseHeld, TrialStore
    url, sid, go = sys.argv[1:4]
    store = TrialStore(url)
    while not Path(go).exists():
        time.sleep(0.001)
    try:
        holder = store.acquire_lease(sid, ttl_s=30)
        print("won", holder.id, flush=True)
        time.sleep(float(sys.argv[4]))
    except LeaseHeld as exc:
        print("held", exc.holder, flush=True)
""")


def test_processes_racing_for_a_lease_have_exactly_one_winner(url: str, tmp_path: Path) -> None:
    with st.TrialStore(url) as store:
        sid = _session(store)
    go = tmp_path / "go"
    for round_ in range(3):
        go.unlink(missing_ok=True)
        procs = [subprocess.Popen([sys.executable, "-c", RACER, url, sid, str(go), "3"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        time.sleep(2.0)  # all four are connected and spinning on the start signal
        go.touch()
        outs = [wait_process(p, 60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
        lines = [o.strip() for o, _ in outs]
        winners = [line.split()[1] for line in lines if line.startswith("won")]
        assert len(winners) == 1, lines
        assert all(line == f"held {winners[0]}" for line in lines if not line.startswith("won")), lines
        # The winner has exited: same host, dead pid, so the next round starts from a recoverable lease.
        with st.TrialStore(url) as store:
            assert store.lease(sid).holder == winners[0] and store.live_holder(sid) is None


def _table_dump(url: str) -> dict[str, list[tuple]]:
    engine = st.make_engine(url)
    try:
        with engine.connect() as conn:
            return {t: sorted(map(tuple, conn.execute(text(f"SELECT * FROM {t}")).all()), key=repr)
                    for t in ("sessions", "trials", "trial_attempts", "model_states", "session_leases", "rigs")}
    finally:
        engine.dispose()


HOLD = textwrap.dedent("""
    import sys, time
    from orchestrator.store import TrialStore
    store = TrialStore(sys.argv[1])
    print(store.acquire_lease(sys.argv[2], ttl_s=3600).id, flush=True)
    time.sleep(600)
""")


def test_resume_of_a_leased_session_exits_2_and_writes_nothing(
        url: str, cloop_cmd: list[str], run_env: dict[str, str]) -> None:
    from store_factory import build_session

    with st.TrialStore(url) as store:
        built = build_session(store, n=6, problems=False)
        sid = built.session_id
    engine = st.make_engine(url)
    with engine.begin() as conn:  # as a crashed orchestrator leaves it: resumable
        conn.execute(text("UPDATE sessions SET status = 'interrupted' WHERE id = :id"), {"id": sid})
    engine.dispose()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, url, sid], stdout=subprocess.PIPE, text=True)
    try:
        holder_id = holder.stdout.readline().strip()
        assert holder_id.split(":")[1] == str(holder.pid)
        before = _table_dump(url)
        second = subprocess.run([*cloop_cmd, "resume", sid[:8], "--db", url, "--no-prefect", "--insecure"],
                                env=run_env, capture_output=True, text=True, timeout=120)
        assert _table_dump(url) == before
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and holder_id in lines[0] and sid in lines[0], second.stderr
        assert second.stdout == ""
    finally:
        holder.kill()
        holder.wait()
    with st.TrialStore(url) as store:  # its holder was SIGKILLed: free again at once on this host
        assert store.live_holder(sid) is None


def test_second_resume_of_a_running_session_is_refused(
        url: str, tmp_path: Path, cloop_cmd: list[str], run_env: dict[str, str]) -> None:
    """Issue: two resumes with different --bind both ran a session. Now the second one exits 2."""
    from test_concurrency import PROTOCOL

    protocol = tmp_path / "p.yaml"
    protocol.write_text(PROTOCOL)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    rig = subprocess.Popen(
        [*cloop_cmd, "rig", "--connect", endpoint, "--adapter", "simulated", "--truth", TRUTH, "--seed", "5",
         "--trial-seconds", "0.3", "--insecure", "--rig-id", "rig-live", "--state-dir", str(tmp_path / "rig")],
        env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    orch = subprocess.Popen(
        [*cloop_cmd, "run", str(protocol), "--db", url, "--bind", endpoint, "--seed", "5", "--subject", "m",
         "--max-trials", "500", "--no-prefect", "--insecure"],
        env=run_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        sid = orch.stdout.readline().strip()
        deadline = time.monotonic() + 90
        with st.TrialStore(url) as store:
            while time.monotonic() < deadline and store.session(sid).counts["completed"] < 2:
                time.sleep(0.2)
            holder = store.live_holder(sid)
        assert holder is not None and holder.split(":")[1] == str(orch.pid)
        second = subprocess.run(
            [*cloop_cmd, "resume", sid[:8], "--db", url, "--bind", f"tcp://127.0.0.1:{free_port()}",
             "--no-prefect", "--insecure"], env=run_env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and holder in lines[0], second.stderr
        with st.TrialStore(url) as store:
            assert store.live_holder(sid) == holder and store.session(sid).status == "running"
            assert {t.rig_id for t in store.trials(sid) if t.rig_id} == {"rig-live"}
        # SIGKILL the live one: its lease is recoverable at once from this host.
        orch.kill()
        orch.wait()
        with st.TrialStore(url) as store:
            assert store.live_holder(sid) is None
            mine = store.acquire_lease(sid, ttl_s=5)
            assert store.lease(sid).holder == mine.id
    finally:
        for p in (orch, rig):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_keeper_notices_a_takeover_and_leaves_the_lease_to_the_new_holder(url: str) -> None:
    with st.TrialStore(url) as store:
        sid = _session(store)
        keeper = st.LeaseKeeper(store, sid, ttl_s=0.3, interval_s=0.05).acquire()
        keeper._stop.set()  # this holder stalls: no renewals
        keeper._thread.join()
        time.sleep(0.4)
        thief = store.acquire_lease(sid, st.Holder("other-host", 1, "t"), ttl_s=30)
        with pytest.raises(st.LeaseLost):
            keeper.renew()
        assert keeper.lost.is_set()
        with pytest.raises(st.LeaseLost, match="lost its lease"):
            keeper.check()
        keeper.release()
        assert store.lease(sid).holder == thief.id  # never released on the new holder's behalf
