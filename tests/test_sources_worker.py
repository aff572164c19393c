"""An acquisition source driven through a real ``cloop rig`` worker process and the rig network.

The orchestrator side is the real :class:`RigServer`; the rig is ``cloop rig --adapter
rig_adapters.sources.emulate:FlipPresenter -o response=openephys``; the recording PC is an
Open Ephys ZMQ Interface emulator in this process. Population vectors and their alignment
arrive at the orchestrator; a trial whose window lost messages comes back as a rejected attempt
with the source's reason code, and the retry succeeds.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.transport import RigServer, TrialCommand, TrialRejected
from rig_adapters.sources.emulate import OpenEphysEmulator, poisson_trains

FS = 30000.0
WINDOW_S, LATENCY_S = 0.2, 0.05


def test_population_vectors_reach_the_orchestrator_through_a_rig_worker(tmp_path: Path, cloop_cmd: list[str],
                                                                         run_env: dict[str, str]) -> None:
    acq_start = time.time() - 777.0
    trains = poisson_trains(20, 30.0, 900.0, FS, seed=11, electrodes=5)
    emu = OpenEphysEmulator(trains, sample_rate=FS, acq_start_epoch=acq_start, block_samples=150).start()
    keys = [f"{e}#{s}" for e, s in trains.keys]
    rig_yaml = tmp_path / "rig.yaml"
    rig_yaml.write_text(yaml.safe_dump({"rig_id": "acq-rig", "sources": {"openephys": {
        "endpoints": [emu.endpoint], "unit_map": {f"u{i}": keys[i] for i in range(20)}, "max_delay_s": 0.5}}}))
    protocol_text = ("name: pop\nresponse: {kind: population, units: [" + ", ".join(f"u{i}" for i in range(20))
                     + f"], window_s: {WINDOW_S}, latency_s: {LATENCY_S}, timeout_s: 5}}\n")
    server = RigServer("tcp://127.0.0.1:*", insecure=True)
    log = open(tmp_path / "rig.log", "w")
    rig = subprocess.Popen([*cloop_cmd, "rig", "--connect", server.endpoint, "--insecure", "--rig-id", "acq-rig",
                            "--adapter", "rig_adapters.sources.emulate:FlipPresenter",
                            "-o", f"rig_config={rig_yaml}", "-o", "response=openephys"],
                           stdout=log, stderr=subprocess.STDOUT, env=run_env)
    try:
        server.set_session("s1", protocol_text)
        rigs = server.wait_for_rigs([], 1, timeout_s=60)
        assert rigs[0].response_kinds == ("population",)
        time.sleep(0.3)

        def command(i: int, attempt: int = 1) -> TrialCommand:
            return TrialCommand(trial_id=i, attempt=attempt, index=i, session_id="s1", stimulus={},
                                stimulus_type="image", response_kind="population", timeout_s=5.0)

        for i in range(3):
            out = server.run_trial(command(i))
            a = out.response["alignment"]
            assert a["method"] == "clock_offset"
            onset = out.timing["presented_at"]
            assert a["onset_acq_s"] == pytest.approx(onset - acq_start, abs=5e-3)
            start, end = a["window_acq_s"]
            assert end - start == pytest.approx(WINDOW_S)
            assert out.response["value"] == trains.counts(start, end, FS, range(20))
            assert sum(out.response["value"]) > 0
            # available at the orchestrator soon after the window closed on the acquisition clock
            assert out.received_at - (onset + LATENCY_S + WINDOW_S) < 0.25

        # a lossy link (every other block lost for a second): the attempt is rejected with the source's reason
        lost_from = emu.sample_at(time.time()) // emu.block_samples
        emu.faults.drop_blocks = set(range(lost_from, lost_from + 200, 2))
        with pytest.raises(TrialRejected) as err:
            server.run_trial(command(3))
        assert err.value.code == "acquisition_gap"
        emu.faults.drop_blocks = set()
        time.sleep(1.0)
        out = server.run_trial(command(3, attempt=2))
        start, end = out.response["alignment"]["window_acq_s"]
        assert out.response["value"] == trains.counts(start, end, FS, range(20))
    finally:
        rig.terminate()
        try:
            rig.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rig.kill()
        log.close()
        server.close()
        emu.close()
