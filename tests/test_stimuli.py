"""Stimulus parameter schemas: importable without PsychoPy, checked at `cloop validate` time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stimuli
from orchestrator.protocol import ProtocolError, load_protocol, parse_protocol_text
from orchestrator.protocol_checks import parse_checked, load_checked
from stimuli import StimulusParameterError, UnknownStimulusType, get_stimulus_type

ROOT = Path(__file__).resolve().parent.parent
ORIENTATION = (ROOT / "protocols" / "orientation_tuning.yaml").read_text()


def test_schemas_import_without_psychopy() -> None:
    code = ("import sys; import stimuli; stimuli.get_stimulus_type('grating').resolve({'orientation': 3});"
            "import orchestrator.protocol; print('psychopy' in sys.modules, 'pyglet' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def test_all_issue_types_exist() -> None:
    names = stimuli.stimulus_type_names()
    for name in ["abstract", "blank", "fixation", "grating", "gabor", "plaid", "rdk", "image", "pulse_train"]:
        assert name in names
    grating = get_stimulus_type("grating")
    assert {"orientation", "sf", "phase", "contrast", "size", "x", "y", "drift"} <= set(grating.params)
    assert grating.params["sf"].units == "cycles/deg"
    assert set(get_stimulus_type("rdk").params) >= {"coherence", "direction", "speed"}
    assert set(get_stimulus_type("pulse_train").params) >= {"amplitude", "frequency", "pulse_width", "train_duration"}


def test_unknown_type_lists_known() -> None:
    with pytest.raises(UnknownStimulusType) as info:
        get_stimulus_type("gratin")
    assert "gratin" in str(info.value) and "grating" in str(info.value)


def test_resolve_fills_defaults_and_keeps_trial_over_fixed() -> None:
    p = get_stimulus_type("grating").resolve({"orientation": 30, "contrast": 0.5}, {"sf": 0.04, "contrast": 1.0})
    assert p["orientation"] == 30.0 and p["contrast"] == 0.5 and p["sf"] == 0.04
    assert p["mask"] == "circle" and p["drift"] == 0.0


@pytest.mark.parametrize(
    "values, parameter, text",
    [
        ({"contrast": 1.5}, "contrast", "above the maximum 1"),
        ({"sf": 0}, "sf", "must be above 0"),
        ({"orientation": "up"}, "orientation", "expected a number"),
        ({"orientation": float("nan")}, "orientation", "not a finite number"),
        ({"mask": "star"}, "mask", "not one of"),
        ({"colour": 1}, "colour", "not a parameter of grating"),
    ],
)
def test_resolve_names_the_bad_parameter(values: dict, parameter: str, text: str) -> None:
    with pytest.raises(StimulusParameterError) as info:
        get_stimulus_type("grating").resolve(values)
    assert info.value.parameter == parameter
    assert text in str(info.value)


def test_integer_parameter_rejects_fraction() -> None:
    with pytest.raises(StimulusParameterError, match="whole number"):
        get_stimulus_type("rdk").resolve({"n_dots": 10.5})


def test_image_name_must_be_safe_and_required() -> None:
    image = get_stimulus_type("image")
    with pytest.raises(StimulusParameterError, match="missing"):
        image.resolve({})
    with pytest.raises(StimulusParameterError, match="safe name"):
        image.resolve({"name": "../../etc/passwd"})
    assert image.resolve({"name": "face_01"})["name"] == "face_01"


def test_orientation_tuning_protocol_is_valid() -> None:
    loaded = parse_checked(ORIENTATION)
    assert stimuli.check_protocol(loaded.protocol) == []


def _variant(tmp_path: Path, old: str, new: str) -> Path:
    assert old in ORIENTATION
    path = tmp_path / "p.yaml"
    path.write_text(ORIENTATION.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("type: grating", "type: gratin", "stimulus.type: unknown stimulus type 'gratin'"),
        ("units: fraction", "units: percent", "stimulus.parameters.contrast.units: unknown unit 'percent'"),
        ("high: 180, units: deg", "high: 180, units: Hz", "stimulus.parameters.orientation.units: grating.orientation is in 'deg'"),
        ("high: 180, units: deg", "high: 720, units: deg", "stimulus.parameters.orientation: range [0, 720]"),
        ("sf: 0.04", "sf: -1", "stimulus.fixed.sf: -1 must be above 0"),
        ("size: 40", "size: 40\n    colour: red", "stimulus.fixed.colour: grating has no parameter 'colour'"),
        ("size: 40", "size: 40\n    contrast: 0.5", "stimulus.fixed.contrast: 'contrast' is both varied and fixed"),
    ],
)
def test_validate_reports_file_line_and_field(tmp_path: Path, old: str, new: str, expected: str) -> None:
    path = _variant(tmp_path, old, new)
    with pytest.raises(ProtocolError) as info:
        load_checked(path)
    text = str(info.value)
    assert expected in text, text
    line = next(l for l in text.splitlines() if expected in l)
    assert line.startswith(f"{path}:") and line.split(":")[1].isdigit()


def test_unknown_varied_parameter_and_wrong_kind(tmp_path: Path) -> None:
    path = _variant(tmp_path, "    contrast: {kind: continuous",
                    "    n_dots: {kind: continuous, low: 1, high: 5}\n    contrast: {kind: continuous")
    with pytest.raises(ProtocolError) as info:
        load_checked(path)
    assert "stimulus.parameters.n_dots: grating has no parameter 'n_dots'" in str(info.value)


def test_pulse_train_rejects_display_duration() -> None:
    text = ORIENTATION.replace("type: grating", "type: pulse_train")
    loaded_problems = None
    try:
        parse_checked(text)
    except ProtocolError as exc:
        loaded_problems = str(exc)
    assert loaded_problems and "stimulus.duration_s" in loaded_problems


def test_abstract_accepts_anything() -> None:
    retention = (ROOT / "protocols" / "retention.yaml").read_text()
    loaded = parse_checked(retention)
    assert loaded.protocol.stimulus.type == "abstract"
    assert stimuli.check_protocol(loaded.protocol) == []


def test_describe_types_lists_every_parameter() -> None:
    text = stimuli.describe_types()
    for name in stimuli.stimulus_type_names():
        for param in get_stimulus_type(name).params:
            assert f"`{param}`" in text


@settings(max_examples=200, deadline=None)
@given(lo=st.floats(-1e4, 1e4), width=st.floats(1e-6, 1e4))
def test_space_check_agrees_with_value_check(lo: float, width: float) -> None:
    """A range passes the protocol-time check iff both its ends are drawable values."""
    contrast = get_stimulus_type("grating").params["contrast"]
    hi = lo + width
    space_ok = not get_stimulus_type("grating").check_space(
        {"contrast": {"kind": "continuous", "low": lo, "high": hi, "units": "fraction"}})
    ends_ok = True
    for v in (lo, hi):
        try:
            contrast.check_value(v)
        except ValueError:
            ends_ok = False
    assert space_ok == ends_ok


def test_cloop_validate_cli_names_the_bad_unit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(ORIENTATION.replace("units: fraction", "units: percent", 1))
    out = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(bad)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert "stimulus.parameters.contrast.units: unknown unit 'percent'" in out.stdout + out.stderr


PLUGIN = '''
from stimuli import ParamSpec, StimulusType

CHECKERBOARD = StimulusType(
    name="checkerboard", modality="visual", description="A lab's own stimulus.",
    params={"check_size": ParamSpec("check_size", "continuous", "deg", 1.0, "side of a check", low=0, low_open=True)},
    default_duration_s=0.25, drawer="labstim_draw:build",
)
'''


def test_lab_stimulus_type_via_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lab package registers a type in the `cloop.stimuli` group; cloop finds and checks it."""
    (tmp_path / "labstim.py").write_text(PLUGIN)
    dist = tmp_path / "labstim-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: labstim\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[cloop.stimuli]\ncheckerboard = labstim:CHECKERBOARD\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(stimuli, "_plugins", None)
    try:
        assert "checkerboard" in stimuli.stimulus_type_names()
        st_ = get_stimulus_type("checkerboard")
        assert st_.resolve({}) == {"check_size": 1.0}
        assert st_.check_space({"check_size": {"kind": "continuous", "low": -1, "high": 2, "units": "deg"}}) == [
            ("stimulus.parameters.check_size", "range [-1, 2] does not fit checkerboard.check_size: -1 must be above 0 (deg)")]
    finally:
        stimuli._plugins = None
