"""Stimulator adapter: hard limits from the rig config, enforced whatever the orchestrator sends."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.messages import Trial
from rig_adapters.base import SessionInfo
from rig_adapters.responses import ResponseSource
from rig_adapters.rig_config import RigConfig
from rig_adapters.stimulator import (
    PulseTrain,
    SimulatedStimulator,
    StimulatorAdapter,
    StimulusRefused,
    limit_violations,
)

LIMITS = {
    "amplitude": {"min": 0, "max": 50},
    "frequency": {"min": 1, "max": 300},
    "pulse_width": {"min": 50, "max": 500},
    "train_duration": {"min": 1, "max": 1000},
    "channel": {"min": 0, "max": 3},
}
RIG = RigConfig.model_validate({"stimulator": {"driver": "simulated", "limits": LIMITS, "max_charge_nc": 20}})

PROTOCOL = """
name: microstim
version: "1"
stimulus:
  type: pulse_train
  parameters:
    amplitude: {kind: continuous, low: 0, high: 1000, units: uA}
    frequency: {kind: continuous, low: 1, high: 1000, units: Hz}
  fixed: {pulse_width: 200, train_duration: 20}
response: {kind: bernoulli, timeout_s: 5}
models:
  - name: logistic
    formula: "1 / (1 + exp(-(amplitude - m) / s))"
    priors:
      m: {dist: uniform, low: 1, high: 100}
      s: {dist: gamma, shape: 2, rate: 0.2}
  - name: flat
    formula: "p"
    priors:
      p: {dist: beta, alpha: 1, beta: 1}
"""


class FixedResponse(ResponseSource):
    """Answers 1 at once; records what it was asked (a response source written in a few lines)."""

    name = "fixed"

    def __init__(self) -> None:
        self.begun: list[float] = []

    def begin(self, cmd: Trial, onset: float) -> None:
        self.begun.append(onset)

    def poll(self, now: float) -> dict[str, Any] | None:
        return {"value": 1} if self.begun else None


def trial(index: int, **stimulus: Any) -> Trial:
    # model_construct: skip the wire-format validation (which already refuses NaN/inf), as a
    # buggy or hostile orchestrator's message would be if decoding were bypassed
    return Trial.model_construct(trial_id=index, attempt=1, index=index, session_id="s1", stimulus=stimulus,
                                 stimulus_type="pulse_train", response_kind="bernoulli", timeout_s=5.0)


_shared: list[StimulatorAdapter] = []


def shared_adapter() -> StimulatorAdapter:
    """One started adapter for the property tests (starting parses the protocol: ~50 ms)."""
    if not _shared:
        a = StimulatorAdapter(RIG, FixedResponse(), device=SimulatedStimulator(time_scale=0.0))
        a.start(SessionInfo(session_id="s1", protocol_text=PROTOCOL, rig_id="r"))
        _shared.append(a)
    device = _shared[0].device
    assert isinstance(device, SimulatedStimulator)
    device.delivered.clear()
    return _shared[0]


@pytest.fixture
def adapter() -> StimulatorAdapter:
    device = SimulatedStimulator(time_scale=0.01)
    a = StimulatorAdapter(RIG, FixedResponse(), device=device)
    a.start(SessionInfo(session_id="s1", protocol_text=PROTOCOL, rig_id="r"))
    return a


def test_in_limits_train_is_delivered_and_timed(adapter: StimulatorAdapter) -> None:
    res = adapter.present(trial(0, amplitude=20.0, frequency=100.0))
    device = adapter.device
    assert isinstance(device, SimulatedStimulator)
    assert device.delivered == [PulseTrain(20.0, 100.0, 200.0, 20.0, 0)]
    assert res.response["value"] == 1
    t = res.timing
    assert t["commanded_at"] <= t["train_started_at"] <= t["train_finished_at"] <= t["responded_at"]
    assert res.meta["train"]["charge_nc"] == pytest.approx(4.0)


@pytest.mark.parametrize(
    "stimulus, reason",
    [
        ({"amplitude": 80.0, "frequency": 100.0}, "amplitude=80uA outside rig limit [0, 50]"),
        ({"amplitude": 10.0, "frequency": 900.0}, "frequency=900Hz outside rig limit [1, 300]"),
        ({"amplitude": 10.0, "frequency": 100.0, "channel": 7}, "channel=7 outside rig limit [0, 3]"),
        ({"amplitude": 10.0, "frequency": 100.0, "pulse_width": 9000}, "pulse_width=9000us outside rig limit [50, 500]"),
        ({"amplitude": 10.0, "frequency": 100.0, "voltage": 5}, "not a parameter of pulse_train"),
    ],
)
def test_out_of_limit_commands_are_refused_before_the_device(adapter: StimulatorAdapter, stimulus: dict,
                                                              reason: str) -> None:
    with pytest.raises(StimulusRefused) as info:
        adapter.present(trial(1, **stimulus))
    assert reason in str(info.value)
    assert info.value.code == "refused"
    device = adapter.device
    assert isinstance(device, SimulatedStimulator) and device.delivered == []
    assert isinstance(adapter.response, FixedResponse) and adapter.response.begun == []


def test_charge_limit(adapter: StimulatorAdapter) -> None:
    with pytest.raises(StimulusRefused, match="charge per phase 25 nC exceeds rig limit 20 nC"):
        adapter.present(trial(2, amplitude=50.0, frequency=100.0, pulse_width=500.0))


def test_nonsense_values_are_refused(adapter: StimulatorAdapter) -> None:
    with pytest.raises(StimulusRefused, match="amplitude"):
        adapter.present(trial(3, amplitude="lots", frequency=100.0))
    with pytest.raises(StimulusRefused, match="amplitude"):
        adapter.present(trial(3, amplitude=-5.0, frequency=100.0))


def test_rig_config_must_limit_every_parameter() -> None:
    from pydantic import ValidationError

    partial = {k: v for k, v in LIMITS.items() if k != "amplitude"}
    with pytest.raises(ValidationError, match="missing hard limits for \\['amplitude'\\]"):
        RigConfig.model_validate({"stimulator": {"limits": partial}})


finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e7, max_value=1e7)
anything = st.one_of(finite, st.just(math.nan), st.just(math.inf), st.just(-math.inf))


@settings(max_examples=400, deadline=None)
@given(amp=anything, freq=anything, pw=anything, dur=anything, ch=st.integers(-5, 20))
def test_property_nothing_outside_limits_reaches_the_device(amp: float, freq: float, pw: float, dur: float,
                                                            ch: int) -> None:
    """Whatever the orchestrator sends, the device only ever sees trains inside every limit."""
    adapter = shared_adapter()
    device = adapter.device
    assert isinstance(device, SimulatedStimulator)
    stimulus = {"amplitude": amp, "frequency": freq, "pulse_width": pw, "train_duration": dur, "channel": ch}
    try:
        adapter.present(trial(0, **stimulus))
    except StimulusRefused as exc:
        assert str(exc).startswith("refused")
        assert device.delivered == []
        return
    (sent,) = device.delivered
    for name, lim in LIMITS.items():
        assert lim["min"] <= getattr(sent, name) <= lim["max"], name
    assert sent.charge_nc <= 20
    assert limit_violations(sent, RIG.stimulator) == []  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(amp=st.floats(0, 50), freq=st.floats(1, 300), pw=st.floats(50, 500), dur=st.floats(1, 1000),
       ch=st.integers(0, 3))
def test_property_inside_limits_is_accepted(amp: float, freq: float, pw: float, dur: float, ch: int) -> None:
    train = PulseTrain(amp, freq, pw, dur, ch)
    expected_ok = train.charge_nc <= 20 and 2 * pw <= 1e6 / freq
    assert (limit_violations(train, RIG.stimulator) == []) == expected_ok  # type: ignore[arg-type]
