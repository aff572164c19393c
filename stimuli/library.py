"""The built-in stimulus types and their parameter schemas.

Conventions (PsychoPy's): spatial quantities in degrees of visual angle, converted with the rig's
monitor profile; ``orientation`` 0 = vertical bars, positive = clockwise; ``x``/``y`` relative to
the screen centre, +y up; luminance and contrast as fractions of the display range (0.5 = mean
grey background). Durations of visual stimuli come from the protocol's ``stimulus.duration_s``
and are shown as a whole number of frames.
"""

from __future__ import annotations

from stimuli.schema import ParamSpec, StimulusType

__all__ = ["BUILTIN_TYPES"]


def _p(name: str, kind: str, units: str, default: object, description: str, **kw: object) -> ParamSpec:
    return ParamSpec(name=name, kind=kind, units=units, default=default, description=description, **kw)  # type: ignore[arg-type]


def _position() -> list[ParamSpec]:
    return [
        _p("x", "continuous", "deg", 0.0, "horizontal centre, + right", low=-90, high=90),
        _p("y", "continuous", "deg", 0.0, "vertical centre, + up", low=-90, high=90),
    ]


def _grating_params(default_mask: str, masks: tuple[str, ...]) -> list[ParamSpec]:
    return [
        _p("orientation", "continuous", "deg", 0.0, "0 = vertical bars, + clockwise", low=-360, high=360),
        _p("sf", "continuous", "cycles/deg", 1.0, "spatial frequency", low=0, high=30, low_open=True),
        _p("phase", "continuous", "cycles", 0.0, "spatial phase at onset", low=-1, high=1),
        _p("contrast", "continuous", "fraction", 1.0, "Michelson contrast", low=0, high=1),
        _p("size", "continuous", "deg", 4.0, "diameter of the patch", low=0, high=120, low_open=True),
        *_position(),
        _p("drift", "continuous", "Hz", 0.0, "temporal frequency of the drift (cycles/s), + = phase advance",
           low=-60, high=60),
        _p("mask", "categorical", "", default_mask, "aperture shape", choices=masks),
    ]


_MASKS = ("circle", "none", "gauss", "raisedCos")

_TYPES = [
    StimulusType(
        name="abstract",
        modality="abstract",
        description="Parameters only; nothing is drawn (simulated subjects, analysis-only protocols).",
    ),
    StimulusType(
        name="blank",
        modality="visual",
        description="A uniform screen (inter-trial or catch trial).",
        params={p.name: p for p in [
            _p("luminance", "continuous", "fraction", 0.5, "screen luminance, 0 black .. 1 white", low=0, high=1),
        ]},
        default_duration_s=0.5,
    ),
    StimulusType(
        name="fixation",
        modality="visual",
        description="A fixation cross on the mean-grey background.",
        params={p.name: p for p in [
            _p("size", "continuous", "deg", 0.5, "arm length of the cross", low=0, high=10, low_open=True),
            _p("line_width", "continuous", "pix", 3.0, "stroke width", low=0, high=50, low_open=True),
            _p("luminance", "continuous", "fraction", 1.0, "cross luminance, 0 black .. 1 white", low=0, high=1),
            *_position(),
        ]},
        default_duration_s=0.5,
    ),
    StimulusType(
        name="grating",
        modality="visual",
        description="A sinusoidal luminance grating, optionally drifting.",
        params={p.name: p for p in _grating_params("circle", _MASKS)},
        default_duration_s=0.5,
    ),
    StimulusType(
        name="gabor",
        modality="visual",
        description="A sinusoidal grating in a Gaussian envelope; `size` spans +-3 SD of the envelope.",
        params={p.name: p for p in _grating_params("gauss", ("gauss",))},
        default_duration_s=0.5,
    ),
    StimulusType(
        name="plaid",
        modality="visual",
        description="Two superimposed gratings at `orientation` and `orientation + angle`, "
                    "each at half the plaid's `contrast`.",
        params={p.name: p for p in [
            *_grating_params("circle", _MASKS),
            _p("angle", "continuous", "deg", 90.0, "angle between the two component gratings", low=0, high=180),
        ]},
        default_duration_s=0.5,
    ),
    StimulusType(
        name="rdk",
        modality="visual",
        description="Random-dot kinematogram: a fraction `coherence` of dots moves in `direction`.",
        params={p.name: p for p in [
            _p("coherence", "continuous", "fraction", 1.0, "fraction of signal dots", low=0, high=1),
            _p("direction", "continuous", "deg", 0.0, "signal direction, 0 = rightward, + counter-clockwise",
               low=-360, high=360),
            _p("speed", "continuous", "deg/s", 5.0, "dot speed", low=0, high=200),
            _p("n_dots", "integer", "count", 100, "number of dots", low=1, high=5000),
            _p("dot_size", "continuous", "pix", 4.0, "dot diameter", low=0, high=50, low_open=True),
            _p("dot_life", "integer", "frames", -1, "frames before a dot is replotted (-1 = forever)",
               low=-1, high=10000),
            _p("field_size", "continuous", "deg", 8.0, "diameter of the circular aperture", low=0, high=120,
               low_open=True),
            _p("luminance", "continuous", "fraction", 1.0, "dot luminance, 0 black .. 1 white", low=0, high=1),
            *_position(),
        ]},
        default_duration_s=0.5,
    ),
    StimulusType(
        name="image",
        modality="visual",
        description="An image file from the rig's image folder (rig config `display.image_dir`).",
        params={p.name: p for p in [
            _p("name", "categorical", "", None, "file name in the image folder (with or without extension)"),
            _p("size", "continuous", "deg", 8.0, "width of the image (height keeps the aspect ratio)",
               low=0, high=120, low_open=True),
            _p("contrast", "continuous", "fraction", 1.0, "contrast scaling about mean grey", low=0, high=1),
            _p("orientation", "continuous", "deg", 0.0, "rotation, + clockwise", low=-360, high=360),
            *_position(),
        ]},
        default_duration_s=0.5,
    ),
    StimulusType(
        name="pulse_train",
        modality="stimulator",
        description="A train of biphasic current pulses for electrical or optogenetic stimulators.",
        params={p.name: p for p in [
            _p("amplitude", "continuous", "uA", 10.0, "pulse amplitude", low=0, high=1_000_000),
            _p("frequency", "continuous", "Hz", 100.0, "pulse rate within the train", low=0, high=100_000,
               low_open=True),
            _p("pulse_width", "continuous", "us", 200.0, "width of each phase", low=0, high=1_000_000,
               low_open=True),
            _p("train_duration", "continuous", "ms", 100.0, "length of the train", low=0, high=600_000,
               low_open=True),
            _p("channel", "integer", "", 0, "output channel", low=0, high=255),
        ]},
    ),
]

BUILTIN_TYPES: dict[str, StimulusType] = {t.name: t for t in _TYPES}
