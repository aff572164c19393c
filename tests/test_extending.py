"""Each extension point of docs/extending.md, loaded through the documented mechanism.

The example classes live in tests/extension_examples.py; tests/plugins/ holds the distribution
metadata (entry_points.txt) an installed lab package would have, so the loaders find them exactly
as they find a real plug-in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import stimuli
from builders import retention_text
from orchestrator import catalogue
from orchestrator.protocol import ProtocolError, parse_protocol_text
from orchestrator.protocol_checks import parse_checked

HERE = Path(__file__).resolve().parent


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example package is 'installed': its metadata directory and module are on the path."""
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.syspath_prepend(str(HERE / "plugins"))
    monkeypatch.setattr(stimuli, "_plugins", None)  # stimulus plug-ins are read once per process


def test_a_model_plugin_is_a_builtin_a_protocol_can_name(plugins: None) -> None:
    from orchestrator.inference import ModelComparison

    text = retention_text({"models.1.name": "hyperbolic", "models.1.builtin": "retention_hyperbolic",
                           "models.1.priors.b": {"dist": "gamma", "shape": 2, "rate": 20}})
    protocol = parse_checked(text).protocol
    comparison = ModelComparison.from_protocol(protocol, seed=3)
    for lag, recalled in [(0, 9), (10, 6), (40, 4), (80, 3)]:
        comparison.update({"lag": lag}, recalled)
    probabilities = comparison.probabilities()
    assert set(probabilities) == {"power", "hyperbolic"}
    assert sum(probabilities.values()) == pytest.approx(1.0)
    entry = next(m for m in catalogue.models() if m.id == "retention_hyperbolic")
    assert entry.source == "entry point cloop.models" and entry.parameters == ("a", "b")


def test_an_adapter_plugin_is_found_by_name(plugins: None) -> None:
    from orchestrator.messages import Trial
    from rig_adapters.base import build_adapter, load_adapter_class
    from extension_examples import CountingAdapter

    assert load_adapter_class("counting") is CountingAdapter
    adapter = build_adapter("counting", {"modulus": "3"})
    cmd = Trial(trial_id="s:7", attempt=1, index=7, session_id="s", stimulus={"lag": 5},
                stimulus_type="abstract", response_kind="binomial", timeout_s=5.0)
    assert adapter.present(cmd).response == {"value": 1}


def test_a_response_source_plugin_is_found_by_name(plugins: None) -> None:
    from rig_adapters.responses import make_response_source
    from rig_adapters.rig_config import RigConfig
    from extension_examples import ConstantResponse

    source = make_response_source("constant", rig=RigConfig())
    assert isinstance(source, ConstantResponse)
    assert source.poll(1.0) is None  # nothing before the stimulus is on
    source.begin(None, onset=2.0)
    assert source.poll(2.5) == {"value": 1.0, "responded_at": 2.5}


def test_a_stimulus_type_plugin_is_checked_like_a_builtin(plugins: None) -> None:
    assert stimuli.get_stimulus_type("checkerboard").modality == "visual"
    good = retention_text({"stimulus.type": "checkerboard",
                           "stimulus.parameters": {"contrast": {"kind": "continuous", "low": 0.1, "high": 1.0,
                                                                "units": "fraction"}},
                           "models.0.inputs": {"t": "contrast"}, "models.1.inputs": {"t": "contrast"},
                           "safety": None, "rig.capabilities": ["checkerboard"]})
    assert parse_checked(good).protocol.stimulus.type == "checkerboard"
    with pytest.raises(ProtocolError) as err:
        parse_checked(good.replace("units: fraction", "units: deg"))
    assert any(p.path == "stimulus.parameters.contrast.units" for p in err.value.problems)


def test_a_design_strategy_is_one_registered_class(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.design import STRATEGIES, make_design
    from extension_examples import AlternatingExtremes

    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setitem(STRATEGIES, "alternating_extremes", AlternatingExtremes)
    protocol = parse_checked(retention_text({"design.strategy": "alternating_extremes",
                                                   "safety.lag": {"min": 5, "max": 60}})).protocol
    design = make_design(protocol, seed=0)
    assert [design.propose(None, i).stimulus["lag"] for i in range(3)] == [5, 60, 5]
