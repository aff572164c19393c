"""The ``openephys`` response source against a real ZMQ publisher speaking Open Ephys's formats.

Known spike trains (30 kHz sample stamps) go out as the ZMQ Interface or the Event Broadcaster
would send them; each trial's population vector must equal the true count per unit in the window
after the onset — with the acquisition clock offset from the rig's, TTL onsets, network jitter,
lost messages and a publisher that stops mid-session.
"""

from __future__ import annotations

import time

import pytest

from orchestrator.messages import Trial
from rig_adapters.base import AdapterError, SessionInfo
from rig_adapters.responses import make_response_source, wait_for_response
from rig_adapters.rig_config import RigConfig
from rig_adapters.sources import parse_population_window
from rig_adapters.sources.emulate import OpenEphysEmulator, poisson_trains
from rig_adapters.sources.openephys import OpenEphysSettings, OpenEphysSource, parse_frames

FS = 30000.0
WINDOW_S, LATENCY_S = 0.15, 0.03
#: the acquisition PC's clock started counting samples long before the rig's epoch "now"
ACQ_STARTED_S_AGO = 1234.5678


def protocol(unit_ids: list[str]) -> str:
    units = ", ".join(f'"{u}"' for u in unit_ids)
    return (f"name: pop\nresponse: {{kind: population, units: [{units}], window_s: {WINDOW_S}, "
            f"latency_s: {LATENCY_S}, timeout_s: 5}}\n")


def trial(i: int) -> Trial:
    return Trial(trial_id=i, attempt=1, index=i, session_id="s1", stimulus={}, stimulus_type="image",
                 response_kind="population", timeout_s=5.0)


def make(fmt: str = "zmq_interface", n_units: int = 12, rate: float = 40.0, sync: bool = True, seed: int = 1,
         **extra: object) -> tuple[OpenEphysEmulator, OpenEphysSource, list[str], list[int]]:
    acq_start = time.time() - ACQ_STARTED_S_AGO
    trains = poisson_trains(n_units, rate, ACQ_STARTED_S_AGO + 60, FS, seed=seed, electrodes=4)
    # restrict the trains to the minute ahead (the emulator starts at "now" on the acquisition clock)
    emu = OpenEphysEmulator(trains, fmt=fmt, sample_rate=FS, acq_start_epoch=acq_start, block_samples=150, seed=seed)
    keys = [f"{e}#{s}" for e, s in trains.keys]
    order = list(reversed(range(n_units)))  # protocol order differs from the stream's
    ids = [f"u{i}" for i in order]
    section: dict[str, object] = {"endpoints": [emu.endpoint], "unit_map": {f"u{i}": keys[i] for i in range(n_units)},
                                  "max_delay_s": 0.3, "stall_s": 0.5, **extra}
    if sync:
        section["sync"] = {"line": 1, "required": True, "tolerance_s": 0.1}
    rig = RigConfig(sources={"openephys": section})
    source = make_response_source("openephys", rig=rig)
    assert isinstance(source, OpenEphysSource)
    source.start(SessionInfo("s1", protocol(ids), "rig-1"))
    emu.start()
    time.sleep(0.15)  # the SUB socket joins; the clock estimate fills
    return emu, source, ids, order


def run_trial(emu: OpenEphysEmulator, source: OpenEphysSource, i: int, *, ttl_delay_s: float = 0.004,
              send_ttl: bool = True) -> tuple[dict, float]:
    onset = time.time()  # the flip
    if send_ttl:
        emu.ttl_at(onset + ttl_delay_s, line=1)  # the photodiode sees the frame a few ms after the flip
    cmd = trial(i)
    source.begin(cmd, onset)
    return wait_for_response(source, cmd, onset), onset


def expected(emu: OpenEphysEmulator, order: list[int], onset_acq: float) -> list[int]:
    start = onset_acq + LATENCY_S
    return emu.trains.counts(start, start + WINDOW_S, FS, order)


@pytest.mark.parametrize("fmt", ["zmq_interface", "event_broadcaster"])
def test_exact_counts_per_unit_with_ttl_onsets(fmt: str) -> None:
    emu, source, ids, order = make(fmt)
    try:
        for i in range(4):
            payload, onset = run_trial(emu, source, i)
            a = payload["alignment"]
            assert a["method"] == "ttl"
            ttl_t = emu.sample_at(onset + 0.004) / FS
            assert a["onset_acq_s"] == pytest.approx(ttl_t, abs=1e-9)
            assert payload["value"] == expected(emu, order, ttl_t)
            assert sum(payload["value"]) > 0
            # the acquisition clock's offset from the rig's is measured, not assumed
            assert a["offset_s"] == pytest.approx(emu.acq_start_epoch - 0.004, abs=1e-4)
            assert a["clock_offset_s"] == pytest.approx(emu.acq_start_epoch, abs=0.05)
            assert a["uncertainty_s"] == pytest.approx(1 / FS)
            assert a["formats"] == [fmt]
            # final only once the stream had passed the window's end
            assert a["stream_progress_s"] >= a["window_acq_s"][1]
            time.sleep(0.05)
    finally:
        source.close()
        emu.close()


def test_clock_offset_mapping_without_ttl_is_explicit_and_close() -> None:
    emu, source, ids, order = make(sync=False)
    try:
        for i in range(3):
            payload, onset = run_trial(emu, source, i, send_ttl=False)
            a = payload["alignment"]
            assert a["method"] == "clock_offset"
            true_onset_acq = onset - emu.acq_start_epoch
            # early by the smallest transport delay only (about a millisecond here, loaded)
            assert a["onset_acq_s"] - true_onset_acq == pytest.approx(0.0, abs=5e-3)
            assert a["uncertainty_s"] > 0
            assert payload["value"] == expected(emu, order, a["onset_acq_s"])
    finally:
        source.close()
        emu.close()


def test_jitter_never_shortens_a_window() -> None:
    emu, source, ids, order = make()
    emu.faults.jitter_s = 0.03  # each block leaves the acquisition PC up to 30 ms late
    try:
        for i in range(4):
            payload, onset = run_trial(emu, source, i)
            ttl_t = emu.sample_at(onset + 0.004) / FS
            assert payload["value"] == expected(emu, order, ttl_t)
    finally:
        source.close()
        emu.close()


def test_lost_messages_inside_the_window_fail_that_trial_only() -> None:
    emu, source, ids, order = make()
    try:
        payload, onset = run_trial(emu, source, 0)
        assert payload["value"] == expected(emu, order, emu.sample_at(onset + 0.004) / FS)
        # lose the blocks in the middle of the next trial's window
        onset = time.time()
        mid = emu.sample_at(onset + LATENCY_S + WINDOW_S / 2) // emu.block_samples
        emu.faults.drop_blocks = {mid, mid + 1}
        emu.ttl_at(onset + 0.004, line=1)
        cmd = trial(1)
        source.begin(cmd, onset)
        with pytest.raises(AdapterError) as err:
            wait_for_response(source, cmd, onset)
        assert err.value.code == "acquisition_gap"
        assert "lost" in str(err.value)
        emu.faults.drop_blocks = set()
        time.sleep(0.05)
        payload, onset = run_trial(emu, source, 2)
        assert payload["value"] == expected(emu, order, emu.sample_at(onset + 0.004) / FS)
    finally:
        source.close()
        emu.close()


def test_a_missing_onset_ttl_fails_the_trial_when_sync_is_required() -> None:
    emu, source, ids, order = make()
    try:
        with pytest.raises(AdapterError) as err:
            run_trial(emu, source, 0, send_ttl=False)
        assert err.value.code == "sync_missing"
        assert "line 1" in str(err.value)
    finally:
        source.close()
        emu.close()


def test_late_data_fails_with_a_reason_instead_of_a_short_window() -> None:
    emu, source, ids, order = make(stall_s=5.0)
    try:
        run_trial(emu, source, 0)
        emu.faults.delay_s = 0.8  # the acquisition PC falls behind by more than max_delay_s
        time.sleep(0.05)
        t0 = time.time()
        with pytest.raises(AdapterError) as err:
            run_trial(emu, source, 1)
        assert err.value.code == "acquisition_late"
        assert time.time() - t0 < LATENCY_S + WINDOW_S + 0.3 + 0.2
    finally:
        source.close()
        emu.close()


def test_a_stream_that_stops_mid_session_fails_trials_as_stalled() -> None:
    emu, source, ids, order = make()
    try:
        payload, onset = run_trial(emu, source, 0)
        assert payload["value"] == expected(emu, order, emu.sample_at(onset + 0.004) / FS)
        emu.faults.stop_at_s = (time.time() - emu.acq_start_epoch) + 0.05
        time.sleep(0.1)
        for i in (1, 2):
            with pytest.raises(AdapterError) as err:
                run_trial(emu, source, i)
            assert err.value.code == "acquisition_stalled"
            assert "no data" in str(err.value)
    finally:
        source.close()
        emu.close()


def test_protocol_and_rig_config_errors_name_the_field() -> None:
    with pytest.raises(AdapterError, match=r"sources: \{openephys"):
        make_response_source("openephys", rig=RigConfig())
    with pytest.raises(AdapterError, match=r"sources.openephys.endpoints"):
        make_response_source("openephys", rig=RigConfig(sources={"openephys": {"sample_rate_hz": 30000}}))
    with pytest.raises(AdapterError, match=r"sources.openephys.sync.line"):
        make_response_source("openephys", rig=RigConfig(sources={"openephys": {"endpoints": "tcp://127.0.0.1:1",
                                                                               "sync": {"line": 300}}}))
    with pytest.raises(AdapterError, match=r"response.window_s"):
        parse_population_window("response: {kind: population, units: 3}")
    with pytest.raises(AdapterError, match=r"response.kind"):
        parse_population_window("response: {kind: poisson}")
    with pytest.raises(AdapterError, match=r"response.units: unit id\(s\) listed twice"):
        parse_population_window("response: {kind: population, units: [a, a], window_s: 1}")
    assert parse_population_window("response: {kind: population, units: 3, window_s: 0.5}").unit_ids == ("0", "1", "2")


def test_documented_formats_decode_and_others_are_refused() -> None:
    import json
    import struct

    eb = parse_frames([struct.pack("<H", 1), json.dumps({"event_type": "spike", "stream": "s", "source_node": 1,
                                                         "electrode": "Electrode 3", "num_channels": 1,
                                                         "sample_rate": 30000.0, "sample_number": 300,
                                                         "sorted_id": 2, "amp1": 1.0}).encode()])
    assert (eb.kind, eb.sample_number, eb.electrode, eb.sorted_id, eb.fmt) == ("spike", 300, "Electrode 3", 2,
                                                                                "event_broadcaster")
    ttl = parse_frames([b"EVENT\x00", json.dumps({"message_num": 7, "type": "event", "data_size": 10,
                                                  "content": {"stream": "s", "source_node": 1, "type": 3,
                                                              "sample_num": 90}}).encode(),
                        struct.pack("<BBQ", 2, 1, 4)])
    assert (ttl.kind, ttl.line, ttl.state, ttl.message_num) == ("ttl", 2, True, 7)
    with pytest.raises(ValueError, match="not an Open Ephys"):
        parse_frames([b"spikes", b"{}", b"", b""])
    with pytest.raises(ValueError, match="set the plugin's output format to JSON"):
        parse_frames([struct.pack("<H", 1), b"\x00\x01binary"])
    assert OpenEphysSettings(endpoints="tcp://x:1").endpoints == ["tcp://x:1"]


def _zmq_spike(num: int, sample: int, electrode: str, sorted_id: int = 0) -> list[bytes]:
    import json

    header = {"message_num": num, "type": "spike", "timestamp": 0,
              "spike": {"stream": "s", "source_node": 104, "electrode": electrode, "sample_num": sample,
                        "num_channels": 1, "num_samples": 40, "sorted_id": sorted_id, "threshold": [-50.0]}}
    return [b"EVENT\x00", json.dumps(header).encode(), bytes(160)]


def _zmq_data(num: int, first: int, n: int) -> list[bytes]:
    import json

    header = {"message_num": num, "type": "data", "data_size": 4 * n, "timestamp": 0,
              "content": {"stream": "s", "channel_num": 0, "num_samples": n, "sample_num": first,
                          "sample_rate": FS}}
    return [b"DATA\x00", json.dumps(header).encode(), bytes(4 * n)]


def test_window_edges_are_sample_exact_and_units_follow_the_protocol_order() -> None:
    """Start sample counted, end sample not; unknown units reported, not counted; unit order kept."""
    import json

    settings = OpenEphysSettings(endpoints=["tcp://127.0.0.1:1"], unit_map={"a": "E1#0", "b": "E2#3"},
                                 sync={"line": 0}, settle_s=0.0)
    src = OpenEphysSource(RigConfig(), settings=settings)  # not started: frames are fed directly
    src.window = parse_population_window("response: {kind: population, units: [b, a], window_s: 0.1, latency_s: 0.01}")
    src.unit_index = {settings.unit_map.get(u, u): i for i, u in enumerate(src.window.unit_ids)}
    epoch0 = 1000.0  # epoch of acquisition sample 0: received with no delay below
    onset_sample = 60000
    start, end = onset_sample + 300, onset_sample + 3300  # latency 10 ms, window 100 ms at 30 kHz

    def feed(frames: list[bytes], last_sample: int) -> None:
        src._on_frames(0, frames, epoch0 + last_sample / FS)

    ttl = [b"EVENT\x00", json.dumps({"message_num": 2, "type": "event", "data_size": 10, "timestamp": 0,
                                      "content": {"stream": "s", "source_node": 1, "type": 3,
                                                  "sample_num": onset_sample}}).encode(), bytes([0, 1]) + bytes(8)]
    feed(_zmq_data(1, onset_sample - 3000, 3000), onset_sample)
    feed(ttl, onset_sample)
    for num, (sample, el, sid) in enumerate([(start, "E1", 0), (start - 1, "E1", 0), (end - 1, "E2", 3),
                                              (end, "E2", 3), (start + 10, "E9", 1), (start + 20, "E1", 0)], 3):
        feed(_zmq_spike(num, sample, el, sid), sample)
    cmd = trial(0)
    onset_epoch = epoch0 + onset_sample / FS - 0.004  # the flip, 4 ms before the photodiode edge
    src.begin(cmd, onset_epoch)
    feed(_zmq_data(9, onset_sample, end - 10 - onset_sample), end - 10)
    assert src.poll(epoch0 + (end - 10) / FS) is None  # the stream has not passed the window's end yet
    feed(_zmq_data(10, end - 10, 300), end + 290)
    payload = src.poll(epoch0 + (end + 290) / FS)
    assert payload is not None
    al = payload["alignment"]
    assert al["method"] == "ttl" and al["ttl_sample"] == onset_sample
    assert al["offset_s"] == pytest.approx(epoch0 - 0.004, abs=1e-9)
    lo, hi = al["window_acq_s"]
    assert (lo, hi) == pytest.approx((start / FS, end / FS), abs=1e-12)
    assert payload["value"] == [1, 2]  # b: end-1 in, end out; a: start and start+20 in, start-1 out
    assert al["unmapped_events"] == 1


def test_lost_and_restarted_sequences_are_gaps() -> None:
    settings = OpenEphysSettings(endpoints=["tcp://127.0.0.1:1"], sample_rate_hz=FS)
    src = OpenEphysSource(RigConfig(), settings=settings)
    src._on_frames(0, _zmq_data(10, 0, 300), 1.0)
    src._on_frames(0, _zmq_data(13, 600, 300), 1.0)  # 11 and 12 never arrived
    assert len(src.gaps) == 1 and "2 message(s) lost" in src.gaps[0][2]
    src._on_frames(0, _zmq_data(1, 0, 300), 1.0)  # the GUI restarted acquisition
    assert src._restarted and "restarted" in src._restarted


def test_spikes_before_the_sample_rate_is_known_make_their_time_a_gap() -> None:
    src = OpenEphysSource(RigConfig(), settings=OpenEphysSettings(endpoints=["tcp://127.0.0.1:1"]))
    src._on_frames(0, _zmq_spike(1, 90000, "E1"), 1.0)  # no rate yet: cannot be placed
    assert src.bad_messages == 1 and not src.gaps
    src._on_frames(0, _zmq_data(2, 90000, 300), 1.0)
    lo, hi, why = src.gaps[0]
    assert lo == float("-inf") and hi >= 3.0 and "sample rate" in why
