"""A population session end to end: `cloop run` and a simulated `cloop rig` as real processes over ZMQ.

On SQLite (images beside the database file) and on PostgreSQL (images where $CLOOP_ARTIFACTS says):
every trial's population vector is in the database (analysis.population_responses), every image the
rig was sent is retrievable by its sha256 from the artifact store (analysis.stimulus_images) and
equals, pixel for pixel, what the rig journaled as received; after a SIGKILL of the orchestrator,
`cloop resume` proposes the same next image as an uninterrupted session (the design is
deterministic given seed + history). The PostgreSQL run skips without a server, and fails under CI=true.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from conftest import free_port, postgres_database, wait_process

from orchestrator import analysis
from orchestrator.artifacts import ArtifactStore
from orchestrator.store import TrialStore
from test_neural_helpers import population_protocol

UNITS = 6
TRIALS = 4
TRUTH = "cnn_a:ev=0.5,seed=3"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@contextlib.contextmanager
def _database(backend: str, folder: Path, name: str) -> Iterator[tuple[str, str | None]]:
    """(database URL, artifact directory or None for the default beside a SQLite file)."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / name}.db", None
        return
    with postgres_database() as url:  # cloop run migrates it; images need a directory of their own
        yield url, str(folder / f"{name}.artifacts")


def _with_artifacts(env: dict[str, str], artifacts: str | None) -> dict[str, str]:
    env = {k: v for k, v in env.items() if k != "CLOOP_ARTIFACTS"}
    return {**env, "CLOOP_ARTIFACTS": artifacts} if artifacts else env


def _protocol(tmp_path: Path) -> Path:
    path = population_protocol(tmp_path, units=UNITS, size=12, settings={"steps": 3, "starts": 1})
    text = path.read_text()  # the helper's protocol has no rig section: any simulated rig serves it
    if "rig:" not in text:
        path.write_text(text + "rig:\n  capabilities: [simulated]\n")
    return path


def _run(cloop_cmd: list[str], env: dict[str, str], protocol: Path, db: str, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*cloop_cmd, "run", str(protocol), "--db", db, "--bind", f"tcp://127.0.0.1:{port}",
                             "--no-prefect", "--insecure", "--wait-for-rig", "30", "--seed", "4", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rig(cloop_cmd: list[str], env: dict[str, str], port: int, state_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*cloop_cmd, "rig", "--connect", f"tcp://127.0.0.1:{port}", "--insecure",
                             "--rig-id", "pop-rig", "--state-dir", str(state_dir), "--adapter", "simulated",
                             "--truth", TRUTH, "--seed", "4", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(rig: subprocess.Popen) -> None:
    rig.terminate()
    wait_process(rig, 20)


def _stimulus_hashes(db: str, session_id: str) -> list[str]:
    with TrialStore(db) as store:
        return [t["stimulus"]["image"] for t in store.trials(session_id)]


@dataclass(frozen=True)
class Finished:
    """An uninterrupted session: where it is, its id, what `cloop run` printed."""

    workdir: Path
    protocol: Path
    backend: str
    db: str
    artifacts: str | None
    session_id: str
    output: str


@pytest.fixture(scope="module", params=BACKENDS)
def finished(request: pytest.FixtureRequest, cloop_cmd: list[str],
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """One session of TRIALS trials run to the end (shared: the resume test replays against it)."""
    workdir = tmp_path_factory.mktemp(f"population-{request.param}")
    with _database(request.param, workdir, "pop") as (db, artifacts):
        env = _with_artifacts({**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                               "PREFECT_HOME": str(workdir / "prefect-home")}, artifacts)
        env.pop("CLOOP_DB", None)
        port = free_port()
        protocol = _protocol(workdir)
        orchestrator = _run(cloop_cmd, env, protocol, db, port, "--max-trials", str(TRIALS))
        rig = _rig(cloop_cmd, env, port, workdir / "rig-state")
        try:
            out, err = wait_process(orchestrator, 120)
        finally:
            _stop(rig)
        assert orchestrator.returncode == 0, err
        yield Finished(workdir, protocol, request.param, db, artifacts, out.splitlines()[0].strip(), out + err)


def test_population_session_over_loopback_stores_every_vector_and_image(finished: Finished, cloop_cmd, run_env,
                                                                         tmp_path) -> None:
    db, session_id = finished.db, finished.session_id
    run_env = _with_artifacts(run_env, finished.artifacts)
    assert f"response=[{UNITS} units]" in finished.output  # one short progress line per trial, not the vector

    with TrialStore(db) as store:
        trials = store.trials(session_id)
        assert store.session(session_id)["status"] == "completed"
    assert [t["status"] for t in trials] == ["completed"] * TRIALS
    meta, responses = analysis.population_responses(db, session_id)
    assert responses.shape == (TRIALS, UNITS) and np.isfinite(responses).all() and (responses >= 0).all()
    assert list(meta["index"]) == list(range(TRIALS))

    # What the rig journaled as sent is what the database holds, unit for unit.
    sent = {}
    for path in (finished.workdir / "rig-state").glob("*.journal.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["event"] == "result":
                sent[int(record["key"].rsplit(":", 1)[1])] = record["result"]["response"]["value"]
    assert sorted(sent) == list(range(TRIALS))
    np.testing.assert_array_equal(responses, np.array([sent[i] for i in range(TRIALS)], dtype=float))

    # Every image is retrievable by its hash, and the pixels hash to it: the bytes the rig verified.
    hashes = [t["stimulus"]["image"] for t in trials]
    images = analysis.stimulus_images(db, session_id, artifacts=finished.artifacts)
    assert set(hashes) <= set(images)
    store = ArtifactStore.for_database(db, finished.artifacts)
    if finished.artifacts is None:
        assert store.root == Path(db[len("sqlite:///"):] + ".artifacts")  # beside the SQLite file
    for sha in hashes:
        pixels = images[sha]
        np.testing.assert_array_equal(store.get(sha), pixels)  # get() verifies the content hash
        assert pixels.dtype == np.uint8 and pixels.shape == (12, 12)
        assert hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest() == sha
    assert len(set(hashes)) > 1  # the design moved on from its first image

    # The report shows the session's own images and its trials x units responses.
    report = subprocess.run([*cloop_cmd, "report", session_id, "--db", db, "-o", str(tmp_path / "r.html"),
                             "--png-dir", str(tmp_path / "png")], env=run_env, capture_output=True, text=True,
                            timeout=120)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "r.html").read_text()
    assert "Images shown" in page and "Population responses" in page and "Model probabilities" in page
    import matplotlib.image

    thumbnails = matplotlib.image.imread(tmp_path / "png" / "stimuli.png")
    assert thumbnails[..., :3].std() > 0.15  # pixels drawn, not a note on a blank figure


def test_resume_after_sigkill_replays_to_the_same_next_image(finished: Finished, cloop_cmd, run_env,
                                                             tmp_path) -> None:
    protocol, trials = finished.protocol, TRIALS
    reference = _stimulus_hashes(finished.db, finished.session_id)
    assert len(reference) == trials
    with _database(finished.backend, tmp_path, "kill") as (db, artifacts):
        _kill_and_resume(cloop_cmd, _with_artifacts(run_env, artifacts), protocol, db, artifacts, tmp_path, reference)


def _kill_and_resume(cloop_cmd: list[str], run_env: dict[str, str], protocol: Path, db: str, artifacts: str | None,
                     tmp_path: Path, reference: list[str]) -> None:
    """Run to two completed trials, SIGKILL the orchestrator, resume: the same images as `reference`."""
    trials = len(reference)
    port = free_port()
    orchestrator = _run(cloop_cmd, run_env, protocol, db, port, "--max-trials", str(trials))
    rig = _rig(cloop_cmd, run_env, port, tmp_path / "kill-state", "--option", "trial_seconds=0.3")
    try:
        session_id = orchestrator.stdout.readline().strip()
        deadline = time.monotonic() + 90
        with TrialStore(db) as store:  # kill once two trials are done (the third being chosen or shown)
            while store.trial_counts(session_id).get("completed", 0) < 2:
                assert orchestrator.poll() is None and time.monotonic() < deadline, "the session did not progress"
                time.sleep(0.05)
        os.kill(orchestrator.pid, signal.SIGKILL)
        orchestrator.wait(10)
        assert orchestrator.returncode == -signal.SIGKILL  # killed mid-session, not finished
        with TrialStore(db) as store:  # so the last image is chosen by the resumed process, after replay
            assert store.trial_counts(session_id).get("completed", 0) <= trials - 2
        resumed = subprocess.Popen([*cloop_cmd, "resume", session_id, "--db", db, "--no-prefect", "--insecure",
                                    "--bind", f"tcp://127.0.0.1:{port}", "--wait-for-rig", "30"],
                                   env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = wait_process(resumed, 120)
    finally:
        if orchestrator.poll() is None:
            orchestrator.kill()
        _stop(rig)
    assert resumed.returncode == 0, err
    with TrialStore(db) as store:
        statuses = [t["status"] for t in store.trials(session_id)]
    assert statuses == ["completed"] * trials
    assert _stimulus_hashes(db, session_id) == reference
    images = analysis.stimulus_images(db, session_id, artifacts=artifacts)
    assert set(reference) <= set(images)


def test_replay_fills_the_model_state_a_crash_left_out_from_the_stored_vectors(tmp_path) -> None:
    """Killed between storing a response and the posterior after it: replay reads the population vector."""
    from orchestrator.engine import replay_history
    from orchestrator.neural.comparison import PopulationComparison
    from orchestrator.protocol import load_protocol
    from orchestrator.store import upgrade

    path = _protocol(tmp_path)
    loaded = load_protocol(path)
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    upgrade(url)
    stimulus = {"image": "ab" * 32}
    vector = np.arange(UNITS, dtype=float)
    image = np.full((12, 12), 0.5)
    with TrialStore(url) as store:
        sid = store.create_session(protocol_id=store.add_protocol(loaded), subject_id=store.subject("m1"), seed=4)
        trial = store.plan_trial(sid, 0, {"stimulus": stimulus, "strategy": "population_pool", "reason": "",
                                          "score": None, "compute_ms": 1.0})
        store.mark_dispatched(trial, 1, None)
        store.complete_trial(trial, {"rig_id": "r", "response": {"value": vector.tolist()}, "timing": {},
                                     "attempt": 1}, vector)
        resumed = PopulationComparison.from_protocol(loaded.protocol, 4, images=lambda sha: image)
        replay_history(store, sid, resumed)
        states = store.model_states(sid)
    direct = PopulationComparison.from_protocol(loaded.protocol, 4, images=lambda sha: image)
    direct.update(stimulus, vector)
    assert len(states) == 1 and states[0].probabilities == direct.probabilities()
    assert resumed.probabilities() == direct.probabilities()
    # the first trial sets each model's centre (mean Anscombe count): replay must have read the vector
    assert resumed.centres == direct.centres == [float(np.mean(2 * np.sqrt(vector + 0.375)))] * len(direct.model_names)
