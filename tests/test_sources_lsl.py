"""The ``lsl`` response source against real pylsl outlets in this process.

Spike-event streams (one sample per spike) and continuous dF/F streams (one channel per unit),
with an injected clock offset between the outlet's timestamps and this machine's LSL clock, onset
markers, lost samples, and an outlet that stops mid-session.
"""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
import pytest

pylsl = pytest.importorskip("pylsl", reason="the lsl source needs pylsl (pip install cloop[acquisition])")

from orchestrator.messages import Trial  # noqa: E402
from rig_adapters.base import AdapterError, SessionInfo  # noqa: E402
from rig_adapters.responses import make_response_source, wait_for_response  # noqa: E402
from rig_adapters.rig_config import RigConfig  # noqa: E402
from rig_adapters.sources.emulate import LslEmulator, poisson_trains  # noqa: E402
from rig_adapters.sources.lsl import LslSource, epoch_to_lsl_offset  # noqa: E402

WINDOW_S, LATENCY_S = 0.15, 0.02
_names = itertools.count()


def protocol(units: list[str] | int) -> str:
    spec = units if isinstance(units, int) else "[" + ", ".join(f'"{u}"' for u in units) + "]"
    return (f"name: pop\nresponse: {{kind: population, units: {spec}, window_s: {WINDOW_S}, "
            f"latency_s: {LATENCY_S}, timeout_s: 5}}\n")


def trial(i: int) -> Trial:
    return Trial(trial_id=i, attempt=1, index=i, session_id="s1", stimulus={}, stimulus_type="image",
                 response_kind="population", timeout_s=5.0)


def source_for(section: dict, units: list[str] | int) -> LslSource:
    src = make_response_source("lsl", rig=RigConfig(sources={"lsl": {"max_delay_s": 0.3, "stall_s": 0.5, **section}}))
    assert isinstance(src, LslSource)
    src.start(SessionInfo("s1", protocol(units), "rig-1"))
    return src


def to_stream(emu: LslEmulator, epoch: float) -> float:
    e2l, _ = epoch_to_lsl_offset()
    return emu.stream_time(epoch + e2l)


def spike_stream(offset_s: float, n_units: int = 10, heartbeat: bool = True) -> tuple[LslEmulator, np.ndarray,
                                                                                         np.ndarray]:
    emu = LslEmulator(name=f"cloop-test-spikes-{os.getpid()}-{next(_names)}", kind="events",
                      clock_offset_s=offset_s)
    trains = poisson_trains(n_units, 50.0, 60.0, 30000.0, seed=3)
    t0 = emu.stream_time()
    stamps = t0 + trains.samples / 30000.0  # a sorter stamping spikes at 30 kHz resolution
    emu.start_events(stamps, trains.units.tolist(), heartbeat=-1 if heartbeat else None)
    return emu, stamps, trains.units


def true_counts(stamps: np.ndarray, units: np.ndarray, start: float, order: list[int], n: int) -> list[int]:
    inside = (stamps >= start) & (stamps < start + WINDOW_S)
    c = np.bincount(units[inside], minlength=n)
    return [int(c[i]) for i in order]


def test_spike_events_with_onset_markers_and_a_clock_offset() -> None:
    offset = 517.25  # the sorter's clock runs 517 s ahead of this machine's LSL clock
    emu, stamps, units = spike_stream(offset)
    order = [3, 1, 4, 0, 9, 2, 6, 5, 8, 7]
    src = source_for({"name": emu.outlet.get_info().name(), "sync_value": "-2", "heartbeat_value": "-1",
                      "unit_map": {f"n{i}": str(i) for i in range(10)}}, [f"n{i}" for i in order])
    try:
        time.sleep(0.2)
        for i in range(4):
            onset = time.time()
            marker = to_stream(emu, onset + 0.003)
            emu.marker_at(marker, -2)
            cmd = trial(i)
            src.begin(cmd, onset)
            payload = wait_for_response(src, cmd, onset)
            a = payload["alignment"]
            assert a["method"] == "ttl"
            assert a["onset_acq_s"] == pytest.approx(marker, abs=1e-9)
            assert payload["value"] == true_counts(stamps, units, marker + LATENCY_S, order, 10)
            assert sum(payload["value"]) > 0
            # time_correction sees no offset (same machine): the marker reveals the outlet's clock
            assert a["sync_residual_s"] == pytest.approx(offset + 0.003, abs=2e-3)
            assert abs(a["time_correction_s"]) < 0.01
            assert a["stream_progress_s"] >= a["window_acq_s"][1]
    finally:
        src.close()
        emu.close()


def test_time_correction_alignment_without_markers() -> None:
    emu, stamps, units = spike_stream(0.0, n_units=6)
    src = source_for({"type": "Spikes", "name": emu.outlet.get_info().name(), "heartbeat_value": "-1"}, 6)
    try:
        time.sleep(0.2)
        onset = time.time()
        cmd = trial(0)
        src.begin(cmd, onset)
        payload = wait_for_response(src, cmd, onset)
        a = payload["alignment"]
        assert a["method"] == "time_correction"
        # two independent epoch -> LSL clock readings (here and in the source) under a loaded machine
        assert a["onset_acq_s"] == pytest.approx(to_stream(emu, onset), abs=3e-3 + a["uncertainty_s"])
        assert 0 < a["uncertainty_s"] < 0.01
        assert payload["value"] == true_counts(stamps, units, a["onset_acq_s"] + LATENCY_S, list(range(6)), 6)
    finally:
        src.close()
        emu.close()


def continuous_stream(n: int, srate: float = 200.0, offset_s: float = 0.0) -> tuple[LslEmulator, np.ndarray,
                                                                                  np.ndarray]:
    labels = [f"roi{i}" for i in range(n)] + ["photodiode"]
    emu = LslEmulator(name=f"cloop-test-dff-{os.getpid()}-{next(_names)}", kind="continuous", n_channels=n + 1,
                      srate=srate, labels=labels, channel_format="float32", clock_offset_s=offset_s)
    t0 = emu.stream_time()
    stamps = t0 + np.arange(int(60 * srate)) / srate
    rng = np.random.default_rng(5)
    frames = np.zeros((stamps.size, n + 1), dtype=np.float32)
    frames[:, :n] = rng.normal(0, 1, size=(stamps.size, n)).astype(np.float32)
    emu.start_frames(stamps, frames)
    return emu, stamps, frames


def test_continuous_dff_means_per_unit_with_a_photodiode_channel() -> None:
    emu, stamps, frames = continuous_stream(8, offset_s=-42.0)
    src = source_for({"name": emu.outlet.get_info().name(), "sync_channel": "photodiode", "sync_threshold": 0.5},
                     [f"roi{i}" for i in (7, 0, 3)])
    try:
        time.sleep(0.2)
        for i in range(3):
            onset = time.time()
            flash = to_stream(emu, onset + 0.012)
            k0 = int(np.searchsorted(stamps, flash))
            frames[k0:k0 + 10, 8] = 1.0  # the photodiode channel sees the patch light up
            cmd = trial(i)
            src.begin(cmd, onset)
            payload = wait_for_response(src, cmd, onset)
            a = payload["alignment"]
            assert a["method"] == "ttl"
            assert a["onset_acq_s"] == pytest.approx(stamps[k0], abs=1e-9)
            start = stamps[k0] + LATENCY_S
            inside = (stamps >= start) & (stamps < start + WINDOW_S)
            want = frames[inside][:, [7, 0, 3]].astype(np.float64).mean(axis=0)
            assert payload["value"] == pytest.approx(want.tolist(), abs=1e-6)
    finally:
        src.close()
        emu.close()


def test_lost_samples_inside_the_window_fail_the_trial() -> None:
    emu, stamps, frames = continuous_stream(4)
    src = source_for({"name": emu.outlet.get_info().name()}, [f"roi{i}" for i in range(4)])
    try:
        time.sleep(0.2)
        onset = time.time()
        mid = to_stream(emu, onset + LATENCY_S + WINDOW_S / 2)
        emu.drop_between.append((mid, mid + 0.02))
        cmd = trial(0)
        src.begin(cmd, onset)
        with pytest.raises(AdapterError) as err:
            wait_for_response(src, cmd, onset)
        assert err.value.code == "acquisition_gap"
        assert "sample(s) missing" in str(err.value)
    finally:
        src.close()
        emu.close()


def test_an_outlet_on_a_foreign_clock_without_markers_is_refused() -> None:
    emu, stamps, units = spike_stream(-42.0, n_units=3)
    src = source_for({"name": emu.outlet.get_info().name(), "heartbeat_value": "-1"}, 3)
    try:
        time.sleep(0.2)
        onset = time.time()
        cmd = trial(0)
        src.begin(cmd, onset)
        with pytest.raises(AdapterError) as err:
            wait_for_response(src, cmd, onset)
        assert err.value.code == "clock_mismatch"
        assert "-42.0" in str(err.value)
    finally:
        src.close()
        emu.close()


def test_an_outlet_that_stops_mid_session_fails_trials_as_stalled() -> None:
    emu, stamps, units = spike_stream(0.0, n_units=4)
    src = source_for({"name": emu.outlet.get_info().name(), "heartbeat_value": "-1"}, 4)
    try:
        time.sleep(0.2)
        onset = time.time()
        cmd = trial(0)
        src.begin(cmd, onset)
        assert wait_for_response(src, cmd, onset)["alignment"]["method"] == "time_correction"
        emu.stop_at = emu.stream_time() + 0.02
        time.sleep(0.1)
        onset = time.time()
        cmd = trial(1)
        src.begin(cmd, onset)
        with pytest.raises(AdapterError) as err:
            wait_for_response(src, cmd, onset)
        assert err.value.code == "acquisition_stalled"
    finally:
        src.close()
        emu.close()


def test_config_and_stream_errors_are_one_clear_line() -> None:
    with pytest.raises(AdapterError, match="sources.lsl.*name, type or source_id"):
        make_response_source("lsl", rig=RigConfig(sources={"lsl": {"kind": "events"}}))
    with pytest.raises(AdapterError, match="no stream with name='no-such-stream'"):
        source_for({"name": "no-such-stream", "resolve_timeout_s": 0.3}, 3)
    emu, stamps, frames = continuous_stream(2)
    try:
        with pytest.raises(AdapterError, match="unit 'roi9'.*is not a channel"):
            source_for({"name": emu.outlet.get_info().name()}, ["roi0", "roi9"])
    finally:
        emu.close()
