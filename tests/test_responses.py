"""Response sources: ZMQ SUB windowing over real sockets, keyboard mapping, simulated subject."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import zmq

from orchestrator.messages import Trial
from rig_adapters.base import AdapterError, SessionInfo
from rig_adapters.responses import (
    KeyboardResponse,
    KeyEvent,
    ResponseTimeout,
    SimulatedResponse,
    TrialAborted,
    ZmqResponse,
    make_response_source,
    wait_for_response,
)
from rig_adapters.rig_config import KeyboardConfig, RigConfig, ZmqSourceConfig

ROOT = Path(__file__).resolve().parent.parent
ORIENTATION = (ROOT / "protocols" / "orientation_tuning.yaml").read_text()


def trial(index: int = 0, timeout_s: float = 2.0) -> Trial:
    return Trial(trial_id=index, attempt=1, index=index, session_id="s", stimulus={"orientation": 90.0, "contrast": 1.0},
                 stimulus_type="grating", response_kind="poisson", timeout_s=timeout_s)


@pytest.fixture
def publisher() -> Iterator[tuple[zmq.Socket, str]]:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    yield pub, f"tcp://127.0.0.1:{port}"
    pub.close(0)


def _connected(pub: zmq.Socket, source: ZmqResponse, topic: bytes) -> None:
    """PUB/SUB joins asynchronously: publish probes until the subscriber sees one (slow-joiner)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pub.send_multipart([topic, json.dumps({"t": 0.0, "count": 0}).encode()])
        time.sleep(0.02)
        source._drain()
        if source._events:
            source._events.clear()
            return
    raise AssertionError("subscriber never connected")


def test_zmq_counts_events_in_window(publisher: tuple[zmq.Socket, str]) -> None:
    pub, endpoint = publisher
    cfg = ZmqSourceConfig(endpoint=endpoint, topic="spikes", window_s=(0.05, 0.30), settle_s=0.05)
    source = ZmqResponse(cfg)
    source.start(SessionInfo("s", ORIENTATION, "r"))
    _connected(pub, source, b"spikes")
    onset = time.time()
    source.begin(trial(), onset)
    events = [(-0.5, 7), (0.00, 100), (0.049, 100), (0.05, 2), (0.10, 3), (0.2999, 4), (0.30, 50), (0.5, 9)]
    for dt, count in events:
        pub.send_multipart([b"spikes", json.dumps({"t": onset + dt, "count": count}).encode()])
    pub.send_multipart([b"lfp", json.dumps({"t": onset + 0.1, "count": 1000}).encode()])  # other topic
    pub.send_multipart([b"spikes", b"not json"])
    assert source.poll(time.time()) is None  # window still open
    payload = wait_for_response(source, trial(), onset)
    assert payload["value"] == 2 + 3 + 4
    assert payload["n_messages"] == 3
    assert payload["window_start"] == pytest.approx(onset + 0.05)
    assert time.time() >= onset + 0.35
    assert source.bad_messages == 1
    source.close()


def test_zmq_event_stream_without_count_field(publisher: tuple[zmq.Socket, str]) -> None:
    pub, endpoint = publisher
    cfg = ZmqSourceConfig(endpoint=endpoint, topic="", window_s=(0.0, 0.2), count_field=None, settle_s=0.02)
    source = ZmqResponse(cfg)
    source.start(SessionInfo("s", ORIENTATION, "r"))
    _connected(pub, source, b"ev")
    onset = time.time()
    source.begin(trial(), onset)

    def stream() -> None:  # events arrive while the trial runs, as from an acquisition system
        for i in range(20):
            pub.send_multipart([b"ev", json.dumps({"t": onset + i * 0.015, "channel": 3}).encode()])
            time.sleep(0.005)

    th = threading.Thread(target=stream)
    th.start()
    payload = wait_for_response(source, trial(), onset)
    th.join()
    assert payload["value"] == sum(1 for i in range(20) if i * 0.015 < 0.2)  # 14 events inside [0, 0.2)
    source.close()


def test_zmq_config_rejects_empty_window() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="window_s: start"):
        ZmqSourceConfig(endpoint="tcp://127.0.0.1:1", window_s=(0.5, 0.5))


def test_keyboard_maps_first_key_after_onset() -> None:
    src = KeyboardResponse(KeyboardConfig(keys={"f": 0, "j": 1}))
    assert src.response_kinds == ("bernoulli",)
    src.begin(trial(), onset=100.0)
    src.offer_keys([KeyEvent("j", 99.9)])  # before onset: ignored
    assert src.poll(100.0) is None
    src.offer_keys([KeyEvent("space", 100.1), KeyEvent("f", 100.25), KeyEvent("j", 100.3)])
    payload = src.poll(100.4)
    assert payload is not None
    assert payload["value"] == 0 and payload["key"] == "f" and payload["rt_s"] == pytest.approx(0.25)
    with pytest.raises(TrialAborted, match="aborted by the operator"):
        src.offer_keys([KeyEvent("escape", 100.5)])


def test_keyboard_config_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="abort_key 'escape' is also a response key"):
        KeyboardConfig(keys={"escape": 1})


def test_simulated_subject_is_seeded() -> None:
    session = SessionInfo("s", ORIENTATION, "r")
    a, b = SimulatedResponse("von_mises", seed=5), SimulatedResponse("von_mises", seed=5)
    a.start(session)
    b.start(session)
    values = []
    for src in (a, b):
        src.begin(trial(3), time.time())
        payload = src.poll(time.time())
        assert payload is not None and payload["source"] == "simulated"
        values.append(payload["value"])
        assert src.poll(time.time()) is None  # one answer per trial
    assert values[0] == values[1]


def test_wait_for_response_times_out() -> None:
    src = KeyboardResponse(KeyboardConfig())
    src.begin(trial(), time.time())
    t0 = time.monotonic()
    with pytest.raises(ResponseTimeout, match="no response within 0.2 s"):
        wait_for_response(src, trial(timeout_s=0.2), time.time())
    assert time.monotonic() - t0 < 1.0


def test_make_response_source_errors() -> None:
    rig = RigConfig()
    with pytest.raises(AdapterError, match="needs --truth"):
        make_response_source("simulated", rig=rig)
    with pytest.raises(AdapterError, match="needs a `zmq:` section"):
        make_response_source("zmq", rig=rig)
    with pytest.raises(AdapterError, match="unknown response source 'eeg'"):
        make_response_source("eeg", rig=rig)
    assert isinstance(make_response_source("keyboard", rig=rig), KeyboardResponse)


def test_rig_config_file_errors_name_the_field(tmp_path: Path) -> None:
    from rig_adapters.rig_config import RigConfigError, load_rig_config

    path = tmp_path / "rig.yaml"
    path.write_text("monitor: {distance_cm: -3}\ndisplay: {sise: [1, 2]}\n")
    with pytest.raises(RigConfigError) as info:
        load_rig_config(path)
    text = str(info.value)
    assert f"{path}: monitor.distance_cm: Input should be greater than 0" in text
    assert f"{path}: display.sise: Extra inputs are not permitted" in text
    assert load_rig_config(None) == RigConfig()
