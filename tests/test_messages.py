"""Wire format: round trips, and the decoder refusing hostile bytes with a message naming the fault."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator import messages as m

TRIAL = m.Trial(trial_id="s:3", attempt=2, index=3, session_id="s", stimulus={"lag": 5, "shape": "circle"},
                stimulus_type="abstract", response_kind="binomial", timeout_s=30.0)
RESULT = m.Result(trial_id="s:3", attempt=2, session_id="s", response={"value": 7, "rt_s": 0.41},
                  timing={"presented_at": 1.7e9, "responded_at": 1.7e9 + 0.4}, meta={"seed": 1})
HELLO = m.Hello(rig_id="rig-1", adapters=["simulated"],
                capabilities=m.Capabilities(stimulus_types=["*"], response_kinds=["binomial"]),
                software_version="0.1.0", clock=m.ClockInfo(time=1.7e9), pid=12, hostname="pc")
SAMPLES = [TRIAL, RESULT, HELLO, m.Heartbeat(sent_at=1.7e9 + 1.0, echo_sent_at=1.7e9 + 0.5, echo_received_at=1.7e9 + 0.7),
           m.Welcome(rig_id="rig-1", session_id="s", protocol_text="name: x\n", heartbeat_s=0.25, liveness=3,
                     server_time=1.7e9),
           m.ErrorMessage(code="bad_message", message="nope", trial_id=4, attempt=1), m.Bye(reason="done")]


def raw(msg: Any) -> dict[str, Any]:
    return msgpack.unpackb(m.encode(msg))


def packed(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda s: s.type)
def test_every_message_type_round_trips(msg: Any) -> None:
    assert m.decode(m.encode(msg)) == msg


def test_encoded_message_carries_version_and_type() -> None:
    d = raw(TRIAL)
    assert d["v"] == m.PROTOCOL_VERSION == 1 and d["type"] == "trial"


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty message"),
        (b"\xc1", "not a valid msgpack"),
        (m.encode(TRIAL)[:-3], "not a valid msgpack"),  # truncated
        (m.encode(TRIAL) + b"\x00", "not a valid msgpack"),  # trailing garbage
        (packed([1, 2]), "expected a msgpack map"),
        (packed({"type": "trial"}), "v: missing or non-integer"),
        (packed({"v": True, "type": "bye"}), "v: missing or non-integer"),
        (packed({"v": 2, "type": "bye"}), "v: unsupported protocol version 2"),
        (packed({"v": 1, "type": "launch"}), "type: unknown message type 'launch'"),
        (packed({1: 2}), "not a valid msgpack"),  # non-string key
        (packed({"v": 1, "type": "bye", "reason": msgpack.ExtType(5, b"x")}), "extension type 5"),
        (b"\x91" * 5000, "not a valid msgpack"),  # nesting bomb
    ],
)
def test_decoder_rejects_malformed_bytes(data: bytes, fragment: str) -> None:
    with pytest.raises(m.MessageError) as err:
        m.decode(data)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"attempt": "2"}, "trial.attempt"),
        ({"attempt": 0}, "trial.attempt"),
        ({"attempt": True}, "trial.attempt"),
        ({"index": -1}, "trial.index"),
        ({"timeout_s": float("nan")}, "trial.timeout_s"),
        ({"stimulus": {"lag": float("inf")}}, "trial.stimulus"),
        ({"stimulus": {"lag": b"\x00"}}, "trial.stimulus"),
        ({"stimulus_type": "../etc"}, "trial.stimulus_type"),
        ({"surprise": 1}, "trial.surprise"),
        ({"trial_id": 1.5}, "trial.trial_id"),
    ],
)
def test_wrong_field_is_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(m.MessageError) as err:
        m.decode(packed({**raw(TRIAL), **change}))
    assert str(err.value).startswith(field), str(err.value)
    assert err.value.msg_type == "trial"


def test_missing_field_is_named() -> None:
    d = raw(RESULT)
    del d["trial_id"]
    with pytest.raises(m.MessageError, match=r"^result\.trial_id: Field required"):
        m.decode(packed(d))


def test_result_without_value_is_refused() -> None:
    with pytest.raises(m.MessageError, match=r"result\.response: .*'value'"):
        m.decode(packed({**raw(RESULT), "response": {"rt": 1.0}}))


def test_deep_payload_is_refused() -> None:
    deep: Any = 1
    for _ in range(m.MAX_DEPTH + 2):
        deep = {"x": deep}
    with pytest.raises(m.MessageError, match="nested deeper"):
        m.decode(packed({**raw(RESULT), "response": {"value": 1, "extra": deep}}))


def test_size_limit_on_both_sides() -> None:
    big = m.Bye(reason="x" * 1000)
    with pytest.raises(m.MessageError, match="exceeds the limit"):
        m.encode(big, max_bytes=500)
    with pytest.raises(m.MessageError, match="exceeds the limit of 500 B"):
        m.decode(m.encode(big), max_bytes=500)
    with pytest.raises(m.MessageError, match="exceeds the limit"):
        m.decode(b"\x00" * (m.MAX_MESSAGE_BYTES + 1), sender="worker")  # workers never send pixels
    with pytest.raises(m.MessageError, match="exceeds the limit"):
        m.decode(b"\x00" * (m.MAX_TRIAL_BYTES + 1))
    padded = m.Bye(reason="x" * 1000)
    with pytest.raises(m.MessageError, match="exceeds the limit .* for 'bye'"):  # only a trial may be that big
        m.decode(packed({**raw(padded), "reason": "x" * (m.MAX_MESSAGE_BYTES // 2),
                         "pad": "y" * (m.MAX_MESSAGE_BYTES // 2)}))


def test_direction_is_enforced() -> None:
    with pytest.raises(m.MessageError, match="a worker may not send 'trial'"):
        m.decode(m.encode(TRIAL), sender="worker")
    with pytest.raises(m.MessageError, match="the orchestrator may not send 'result'"):
        m.decode(m.encode(RESULT), sender="orchestrator")
    assert m.decode(m.encode(RESULT), sender="worker") == RESULT


# ----------------------------------------------------------------------------- property-based fuzzing
json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _only_message_error(data: bytes) -> None:
    try:
        msg = m.decode(data)
    except m.MessageError as exc:
        assert str(exc)  # always says something
        return
    # Anything accepted is a proper model whose payloads are JSON-safe and that re-encodes identically.
    assert msg.type in m.WORKER_TYPES | m.ORCHESTRATOR_TYPES
    assert m.decode(m.encode(msg)) == msg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    _only_message_error(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_mutated_valid_messages(msg: Any, data: st.DataObject) -> None:
    d = raw(msg)
    key = data.draw(st.sampled_from(sorted(d) + ["extra"]))
    action = data.draw(st.sampled_from(["replace", "delete"]))
    if action == "delete":
        d.pop(key, None)
    else:
        d[key] = data.draw(json_like)
    _only_message_error(packed(d))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.integers(min_value=0, max_value=400), st.integers(0, 255))
def test_fuzz_truncated_and_bitflipped(msg: Any, pos: int, byte: int) -> None:
    data = bytearray(m.encode(msg))
    _only_message_error(bytes(data[: pos % (len(data) + 1)]))
    data[pos % len(data)] = byte
    _only_message_error(bytes(data))


def test_accepted_payloads_are_finite() -> None:
    msg = m.decode(m.encode(RESULT))
    assert all(math.isfinite(v) for v in msg.timing.values() if v is not None)


# ----------------------------------------------------------------------------- timestamps at the wire
@pytest.mark.parametrize(("value", "hint"), [
    (1_733_000_000_123_456_789, "in nanoseconds?"),  # time.time_ns()
    (1.733e15, "in microseconds?"),
    (1.733e12, "in milliseconds?"),
    (1e300, ""),
    (12.5, ""),  # a monotonic clock, not epoch time
    (-1.0, ""),
])
def test_implausible_result_times_are_refused_naming_field_and_raw_value(value: float, hint: str) -> None:
    bad = {**raw(RESULT), "timing": {"presented_at": value, "responded_at": 1.7e9}}
    with pytest.raises(m.MessageError) as err:
        m.decode(packed(bad), sender="worker")
    text = str(err.value)
    assert text.startswith("result.timing.presented_at: ") and "not a plausible time in epoch seconds" in text
    assert repr(value)[:12] in text and hint in text
    assert (err.value.trial_id, err.value.attempt) == ("s:3", 2)  # the attempt to fail now


def test_hello_clock_and_heartbeat_times_are_range_checked() -> None:
    with pytest.raises(m.MessageError, match=r"hello.clock.time: 1e\+300 is not a plausible time"):
        m.decode(packed({**raw(HELLO), "clock": {"time": 1e300, "source": "time.time"}}), sender="worker")
    hb = raw(m.Heartbeat(sent_at=1.7e9))
    with pytest.raises(m.MessageError, match="heartbeat.echo_received_at"):
        m.decode(packed({**hb, "echo_sent_at": 1.7e9, "echo_received_at": 1.7e18}), sender="worker")
    with pytest.raises(m.MessageError, match="result.timing.presented_at: .*nanoseconds"):
        m.build(m.Result, trial_id=1, attempt=1, session_id="s", response={"value": 1},
                timing={"presented_at": float(1_733_000_000_000_000_000)})
    assert m.decode(m.encode(m.Heartbeat(sent_at=m.EPOCH_MIN_S))).sent_at == m.EPOCH_MIN_S


def test_many_unknown_keys_are_refused_from_the_headers() -> None:
    huge = {**raw(RESULT), **{f"k{i:05x}": 0 for i in range(124_000)}}
    data = packed(huge)
    assert 900_000 < len(data) <= m.MAX_MESSAGE_BYTES  # under the size limit: the key count must stop it
    with pytest.raises(m.MessageError, match="exceeds max_map_len"):  # msgpack stops at the map header
        m.decode(data, sender="worker")
    some = {**raw(RESULT), **{f"x{i}": 0 for i in range(1000)}}
    with pytest.raises(m.MessageError, match=r"unknown field\(s\) 'x0', 'x1', 'x10' and 997 more"):
        m.decode(packed(some), sender="worker")
    nested = {**raw(RESULT), "meta": {"l": [[i] for i in range(30_000)]}}
    with pytest.raises(m.MessageError, match="more than 20000 values in one payload"):
        m.decode(packed(nested), sender="worker")
    population = {**raw(RESULT), "response": {"value": [0.5] * 60_000, "alignment": {"lag_s": 0.01}}}
    assert len(m.decode(packed(population), sender="worker").response["value"]) == 60_000  # one flat list
    with pytest.raises(m.MessageError, match=r"response.value\[7\]: non-finite|meta.v\[7\]: non-finite"):
        m.decode(packed({**raw(RESULT), "meta": {"v": [1.0] * 7 + [float("inf")]}}), sender="worker")


# ----------------------------------------------------------------------------- image stimuli on the wire
def _image_trial(payload: dict[str, Any], **extra: Any) -> m.Trial:
    return m.Trial(trial_id="s:9", attempt=1, index=9, session_id="s", stimulus={"image": payload, **extra},
                   stimulus_type="image", response_kind="population", timeout_s=5.0)


def test_image_stimulus_round_trips_with_exact_pixels() -> None:
    import numpy as np

    from orchestrator.wire_images import image_array, image_payload

    pixels = np.random.default_rng(0).integers(0, 256, size=(600, 800, 3), dtype=np.uint8)
    trial = _image_trial(image_payload(pixels), contrast=0.5)
    data = m.encode(trial)
    assert m.MAX_MESSAGE_BYTES < len(data) <= m.MAX_TRIAL_BYTES  # a trial may carry more than other messages
    back = m.decode(data, sender="orchestrator")
    shown = image_array(back.stimulus["image"])
    assert shown.dtype == np.uint8 and shown.shape == (600, 800, 3) and np.array_equal(shown, pixels)
    assert back.stimulus["contrast"] == 0.5


@pytest.mark.parametrize(("change", "fragment"), [
    ({"data": b"\x00" * 15}, "stimulus.image.data: 15 B, but shape [4, 4] of uint8 needs 16 B"),
    ({"dtype": "float32"}, "stimulus.image.dtype: only 'uint8'"),
    ({"shape": [4, 4, 2]}, "channels must be one of"),
    ({"shape": [0, 4]}, "height and width must be"),
    ({"sha256": "abc"}, "stimulus.image.sha256: expected 64 lowercase hex"),
    ({"extra": 1}, "needs exactly the keys"),
    ({"data": "not bytes" * 2}, "stimulus.image.data: expected bytes"),
])
def test_malformed_image_payloads_are_refused_naming_the_field(change: dict[str, Any], fragment: str) -> None:
    import numpy as np

    from orchestrator.wire_images import image_payload

    good = image_payload(np.zeros((4, 4), dtype=np.uint8))
    bad = {**raw(_image_trial(good)), "stimulus": {"image": {**good, **change}}}
    with pytest.raises(m.MessageError) as err:
        m.decode(packed(bad), sender="orchestrator")
    assert fragment in str(err.value) and (err.value.trial_id, err.value.attempt) == ("s:9", 1)


def test_bytes_anywhere_but_the_image_pixels_are_refused() -> None:
    import numpy as np

    from orchestrator.wire_images import image_payload

    good = image_payload(np.zeros((2, 2), dtype=np.uint8))
    for stimulus in ({"image": good, "note": b"x"}, {"lag": b"\x01"}, {"image": {"nested": {"data": b"x"}}}):
        with pytest.raises(m.MessageError):
            m.decode(packed({**raw(_image_trial(good)), "stimulus": stimulus}), sender="orchestrator")
    with pytest.raises(m.MessageError, match="not allowed"):
        m.decode(packed({**raw(RESULT), "response": {"value": 1, "raw": b"x"}}), sender="worker")


def test_pixels_that_do_not_match_their_hash_are_refused_on_the_rig() -> None:
    import numpy as np

    from orchestrator.wire_images import ImagePayloadError, image_array, image_payload
    from rig_adapters.worker import image_problem

    payload = image_payload(np.full((8, 8), 7, dtype=np.uint8))
    tampered = {**payload, "data": b"\x08" + payload["data"][1:]}
    m.decode(m.encode(_image_trial(tampered)))  # structurally fine: the hash is checked where it is shown
    with pytest.raises(ImagePayloadError, match="stimulus.image.sha256: the pixels hash to"):
        image_array(tampered, "stimulus.image")
    assert "hash to" in image_problem({"image": tampered}) and image_problem({"image": payload}) is None
