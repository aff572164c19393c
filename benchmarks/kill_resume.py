"""Kill the orchestrator with SIGKILL at random points of a session, resume it, and compare.

    python benchmarks/kill_resume.py --cycles 20 [--db-kind sqlite|postgres] [--trials 30] [--seed 11]

Runs real processes on loopback: one simulated rig worker (`cloop rig`, kept alive across the
orchestrator's deaths, with a result journal) and the orchestrator (`cloop run`, then `cloop resume`
after every kill). First an uninterrupted reference session with the same seed, then the killed one.
Prints one JSON object: cycles, trials_lost, trials_duplicated, sequence_equal, re-presentations on
the rig, and timings. tests/test_resume_kill.py runs the same harness with a few kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRUTH = "power:a=0.9025,b=0.4861"

def protocol_text(design: str = "mutual_information") -> str:
    """protocols/retention.yaml without the model-probability stopping rule, with `design`.

    Every run then has exactly --max-trials trials, and the adaptive design (mutual information)
    depends on the whole history.
    """
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from builders import retention_text

    changes = {"response.timeout_s": 20, "design": {"strategy": design}, "stopping": {"max_trials": 200},
               "safety": None, "models.0.prior_probability": None, "models.1.prior_probability": None}
    return retention_text(changes, name="retention_fixed", description="retention, fixed length (kill-and-resume harness)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cloop_cmd() -> list[str]:
    script = shutil.which("cloop", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "orchestrator"]


def subprocess_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_HOME=str(workdir / "prefect-home"))
    env.pop("CLOOP_DB", None)
    return env


@dataclass
class RunRecord:
    """What one session left behind."""

    session_id: str
    status: str
    trials: list[dict[str, Any]]
    missing_model_states: int
    rig_starts: Counter = field(default_factory=Counter)
    kills: list[dict[str, Any]] = field(default_factory=list)
    resume_seconds: list[float] = field(default_factory=list)


class Harness:
    """Starts rigs and orchestrators as subprocesses in `workdir` and reads their database."""

    def __init__(self, workdir: Path, seed: int, trials: int, *, design: str | None = None,
                 trial_seconds: float = 0.2, verbose: bool = False) -> None:
        self.workdir = workdir
        self.design = design
        self.trial_seconds = trial_seconds
        self.seed = seed
        self.trials = trials
        self.verbose = verbose
        self.protocol = workdir / "retention_fixed.yaml"
        self.protocol.write_text(protocol_text())
        self.cmd = cloop_cmd()
        self.env = subprocess_env(workdir)
        self._stores: dict[str, Any] = {}

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # -- processes ---------------------------------------------------------------------------

    def start_rig(self, endpoint: str, name: str) -> subprocess.Popen:
        state = self.workdir / f"rig-{name}"
        return subprocess.Popen(
            [*self.cmd, "rig", "--connect", endpoint, "--adapter", "simulated", "--truth", TRUTH,
             "--seed", str(self.seed), "--trial-seconds", str(self.trial_seconds), "--insecure", "--rig-id", f"rig-{name}",
             "--state-dir", str(state)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=open(self.workdir / f"rig-{name}.log", "ab"),
        )

    def start_orchestrator(self, args: list[str], log_name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*self.cmd, *args], env=self.env, stdout=subprocess.PIPE, text=True,
            stderr=open(self.workdir / f"{log_name}.log", "ab"),
        )

    def run_args(self, db: str, endpoint: str) -> list[str]:
        return ["run", str(self.protocol), "--db", db, "--bind", endpoint, "--seed", str(self.seed),
                "--max-trials", str(self.trials), "--no-prefect", "--insecure", "--wait-for-rig", "30",
                *(["--design", self.design] if self.design else [])]

    # -- database ----------------------------------------------------------------------------

    def store(self, db: str) -> Any:
        """One long-lived reader per database: polling must not steal the orchestrator's CPU."""
        from orchestrator.store import TrialStore

        if db not in self._stores:
            self._stores[db] = TrialStore(db)
        return self._stores[db]

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()

    def completed(self, db: str, session_id: str) -> int:
        """Trials completed so far, read while the orchestrator writes."""
        return self.store(db).trial_counts(session_id)["completed"]

    def progress(self, db: str, session_id: str) -> tuple[int, str]:
        """(trials completed, session status)."""
        row = self.store(db).session(session_id)
        return row["counts"]["completed"], row["status"]

    def record(self, db: str, session_id: str, rig_name: str) -> RunRecord:
        from orchestrator.store import TrialStore

        with TrialStore(db) as store:
            row = store.session(session_id)
            trials = store.trials(session_id)
            states = store.model_states(session_id)
        missing = sum(1 for s in states if s["status"] == "completed" and s["probabilities"] is None)
        return RunRecord(session_id, row["status"], trials, missing, self.rig_starts(rig_name))

    def rig_starts(self, rig_name: str) -> Counter:
        """How often the rig started presenting each trial (from its journal): 1 each if nothing repeated."""
        starts: Counter = Counter()
        for path in (self.workdir / f"rig-{rig_name}").glob("*.journal.jsonl"):
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("event") == "start":
                    starts[rec["key"]] += 1
        return starts

    # -- sessions ----------------------------------------------------------------------------

    def reference(self, db: str) -> RunRecord:
        """An uninterrupted session with the harness's seed."""
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        rig = self.start_rig(endpoint, "reference")
        try:
            proc = self.start_orchestrator(self.run_args(db, endpoint), "reference")
            out, _ = proc.communicate(timeout=60 + 10 * self.trials)
            if proc.returncode != 0:
                raise RuntimeError(f"reference run failed ({proc.returncode}): {out}")
            session_id = out.splitlines()[0].strip()
        finally:
            stop(rig)
        return self.record(db, session_id, "reference")

    def killed(self, db: str, cycles: int, rng: random.Random, poll_s: float = 0.02,
               in_flight_share: float = 0.5, modes: list[str] | None = None) -> RunRecord:
        """Run the session, SIGKILL the orchestrator `cycles` times at random points, resume each time.

        Each kill first waits for a random number of completed trials; then, with probability
        `in_flight_share`, it waits until a trial is dispatched to the rig and kills at once (the rig
        presents it while no orchestrator listens); otherwise it kills after a random delay, which
        lands anywhere in plan -> dispatch -> record -> model update (mostly in the design step).
        `modes` fixes the mode per cycle instead ("in_flight" / "anywhere").
        """
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        rig = self.start_rig(endpoint, "killed")
        kills: list[dict[str, Any]] = []
        resume_seconds: list[float] = []
        try:
            proc = self.start_orchestrator(self.run_args(db, endpoint), "killed")
            session_id = proc.stdout.readline().strip()  # the first line is the session id
            if not session_id:
                raise RuntimeError(f"cloop run printed no session id (exit {proc.wait()})")
            # Kill points: distinct random trial counts spread over the session, each with a random delay
            # so the kill lands anywhere in plan -> dispatch -> record -> model update.
            targets = sorted(rng.sample(range(1, self.trials - 1), min(cycles, self.trials - 2)))
            for cycle in range(cycles):
                target = targets[cycle] if cycle < len(targets) else None
                started = time.monotonic()
                while True:
                    if proc.poll() is not None:
                        break
                    done = self.completed(db, session_id)
                    if target is None or done >= target:
                        break
                    if time.monotonic() - started > 120:
                        raise RuntimeError(f"no progress past {done} trials in 120 s "
                                           f"(status {self.progress(db, session_id)[1]})")
                    time.sleep(poll_s)
                if proc.poll() is not None:
                    self.log(f"session ended before kill {cycle + 1}")
                    break
                mode = "in_flight" if rng.random() < in_flight_share else "anywhere"
                if modes is not None:
                    mode = modes[cycle % len(modes)]
                if mode == "in_flight":
                    deadline = time.monotonic() + 60
                    while proc.poll() is None and time.monotonic() < deadline:
                        if any(t["status"] == "dispatched" for t in self._open(db, session_id)):
                            break
                        time.sleep(poll_s / 2)
                else:
                    time.sleep(rng.uniform(0.0, 0.25))
                if proc.poll() is not None:
                    self.log(f"session ended before kill {cycle + 1}")
                    break
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                done, status = self.progress(db, session_id)
                with_open = [t["index"] for t in self._open(db, session_id)]
                kills.append({"cycle": cycle + 1, "mode": mode, "completed_at_kill": done,
                              "status_at_kill": status, "open_trials": with_open})
                self.log(f"kill {cycle + 1}: {done} completed, open {with_open}")
                t0 = time.monotonic()
                proc = self.start_orchestrator(["resume", session_id[:10], "--db", db, "--no-prefect"], "killed")
                if proc.stdout.readline().strip() != session_id:
                    raise RuntimeError(f"cloop resume did not print the session id (exit {proc.wait()})")
                resume_seconds.append(time.monotonic() - t0)
            out, _ = proc.communicate(timeout=60 + 10 * self.trials)
            if proc.returncode != 0:
                raise RuntimeError(f"final orchestrator failed ({proc.returncode}): {out}")
        finally:
            stop(rig)
        rec = self.record(db, session_id, "killed")
        rec.kills, rec.resume_seconds = kills, resume_seconds
        return rec

    def _open(self, db: str, session_id: str) -> list[dict[str, Any]]:
        return self.store(db).open_trials(session_id)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def compare(reference: RunRecord, killed: RunRecord, trials: int) -> dict[str, Any]:
    """The figures: lost/duplicated indices, sequence equality, re-presentations on the rig."""
    indices = Counter(t["index"] for t in killed.trials)
    lost = [i for i in range(trials) if indices[i] == 0]
    duplicated = {i: n for i, n in indices.items() if n > 1}
    not_completed = [t["index"] for t in killed.trials if t["status"] != "completed"]

    def seq(rec: RunRecord) -> list[tuple[int, Any, Any]]:
        return [(t["index"], t["stimulus"], t["value"]) for t in rec.trials]

    ref_seq, got_seq = seq(reference), seq(killed)
    first_diff = next((i for i, (a, b) in enumerate(zip(ref_seq, got_seq)) if a != b), None)
    represented = {k: n for k, n in killed.rig_starts.items() if n > 1}
    return {
        "cycles": len(killed.kills),
        "trials": trials,
        "trials_lost": len(lost),
        "trials_duplicated": sum(n - 1 for n in duplicated.values()),
        "trials_not_completed": len(not_completed),
        "sequence_equal": ref_seq == got_seq,
        "first_difference_at": first_diff,
        "session_status": killed.status,
        "reference_status": reference.status,
        "rig_represented_trials": len(represented),
        "kills_with_trial_in_flight": sum(1 for k in killed.kills if k["open_trials"]),
        "completed_trials_missing_model_state": killed.missing_model_states,
        "mean_resume_to_session_id_s": round(sum(killed.resume_seconds) / len(killed.resume_seconds), 2)
        if killed.resume_seconds else None,
        "kills": killed.kills,
    }


def make_db(kind: str, workdir: Path, name: str) -> tuple[str, Any]:
    """A fresh database URL of `kind` and a cleanup callable."""
    if kind == "sqlite":
        return f"sqlite:///{workdir / (name + '.db')}", (lambda: None)
    import psycopg

    admin = os.environ.get("CLOOP_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    plain = admin.replace("postgresql+psycopg://", "postgresql://")
    db = f"cloop_kill_{name}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(plain, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')

    def drop() -> None:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                         "AND pid <> pg_backend_pid()", (db,))
            conn.execute(f'DROP DATABASE IF EXISTS "{db}"')

    return admin.rsplit("/", 1)[0] + f"/{db}", drop


def run_on(ref_db: str, kill_db: str, cycles: int, trials: int, seed: int, workdir: Path, *,
           design: str | None = None, trial_seconds: float = 0.2, verbose: bool = False,
           modes: list[str] | None = None) -> dict[str, Any]:
    """Reference run on `ref_db`, killed-and-resumed run on `kill_db` (may be the same database)."""
    from orchestrator.store import upgrade

    harness = Harness(workdir, seed, trials, design=design, trial_seconds=trial_seconds, verbose=verbose)
    upgrade(ref_db)
    upgrade(kill_db)
    try:
        t0 = time.monotonic()
        reference = harness.reference(ref_db)
        t1 = time.monotonic()
        killed = harness.killed(kill_db, cycles, random.Random(seed * 7919 + cycles), modes=modes)
        t2 = time.monotonic()
    finally:
        harness.close()
    figures = compare(reference, killed, trials)
    figures.update(seed=seed, design=design or "mutual_information", reference_seconds=round(t1 - t0, 1),
                   killed_seconds=round(t2 - t1, 1))
    return figures


def run(cycles: int, trials: int, seed: int, db_kind: str, workdir: Path, **options: Any) -> dict[str, Any]:
    """Like `run_on`, with two fresh databases of `db_kind` (dropped afterwards)."""
    ref_db, drop_ref = make_db(db_kind, workdir, "reference")
    kill_db, drop_kill = make_db(db_kind, workdir, "killed")
    try:
        figures = run_on(ref_db, kill_db, cycles, trials, seed, workdir, **options)
    finally:
        drop_ref()
        drop_kill()
    figures["db"] = db_kind
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=20, help="SIGKILLs per session (default 20)")
    parser.add_argument("--trials", type=int, default=30, help="trials per session (must exceed cycles + 1)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--db-kind", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--design", default=None, help="override the design (default: mutual_information)")
    parser.add_argument("--trial-seconds", type=float, default=0.2, help="simulated presentation time")
    parser.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    if args.trials < args.cycles + 2:
        parser.error("--trials must be at least --cycles + 2 (each kill lands on a different trial)")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        figures = run(args.cycles, args.trials, args.seed, args.db_kind, args.keep, design=args.design,
                      trial_seconds=args.trial_seconds, verbose=args.verbose)
    else:
        with tempfile.TemporaryDirectory(prefix="cloop-kill-") as tmp:
            figures = run(args.cycles, args.trials, args.seed, args.db_kind, Path(tmp), design=args.design,
                          trial_seconds=args.trial_seconds, verbose=args.verbose)
    print(json.dumps(figures, indent=2))
    ok = (figures["trials_lost"] == 0 and figures["trials_duplicated"] == 0 and figures["sequence_equal"]
          and figures["session_status"] == "completed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
