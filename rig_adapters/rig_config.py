"""The rig's own configuration: monitor profile, window, keyboard, stimulator hard limits, streams.

It lives on the rig PC (``cloop rig --rig-config rig.yaml``), not in the protocol, because it
describes hardware: a protocol written elsewhere must not be able to widen a stimulator's limits.
Unknown keys are errors so a misspelt limit never silently disappears.

Example::

    rig_id: rig-1
    monitor: {distance_cm: 57, width_cm: 53, resolution: [1920, 1080], refresh_hz: 60}
    display: {size: [1920, 1080], fullscreen: true, photodiode: {enabled: true, corner: bottom-right}}
    keyboard: {keys: {left: 0, right: 1}}
    stimulator:
      driver: serial
      port: /dev/ttyUSB0
      limits:
        amplitude: {min: 0, max: 50}        # uA
        frequency: {min: 1, max: 300}       # Hz
        pulse_width: {min: 50, max: 500}    # us per phase
        train_duration: {min: 1, max: 1000} # ms
        channel: {min: 0, max: 3}
      max_charge_nc: 20                     # amplitude x pulse_width per phase
    zmq: {endpoint: "tcp://127.0.0.1:5556", topic: "spikes", window_s: [0.05, 0.55]}
    image_limits:                           # every image stimulus, before it is shown
      pixel: {min: 0, max: 255}             # uint8 values
      mean_luminance: {min: 0.2, max: 0.8}  # mean of value/255 over all pixels and channels
      rms_contrast_max: 0.35                # standard deviation of value/255
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "RigConfig",
    "RigConfigError",
    "MonitorProfile",
    "DisplayConfig",
    "PhotodiodeConfig",
    "KeyboardConfig",
    "StimulatorConfig",
    "Limit",
    "ZmqSourceConfig",
    "ImageLimits",
    "load_rig_config",
    "STIMULATOR_LIMITED_PARAMETERS",
]

#: pulse_train parameters that must have a hard limit in the rig config before anything is sent.
STIMULATOR_LIMITED_PARAMETERS = ("amplitude", "frequency", "pulse_width", "train_duration", "channel")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RigConfigError(ValueError):
    """The rig config is unreadable or invalid; one line per problem, naming the field."""


class MonitorProfile(_Strict):
    """PsychoPy monitor profile: converts degrees of visual angle to pixels."""

    name: str = "cloop-monitor"
    distance_cm: float = Field(default=57.0, gt=0)
    width_cm: float = Field(default=40.0, gt=0)
    resolution: tuple[int, int] = (1024, 768)
    refresh_hz: float | None = Field(default=None, gt=0, le=1000)
    """Nominal refresh rate; None = measure it when the window opens."""


class PhotodiodeConfig(_Strict):
    """A patch in a screen corner: white while the stimulus is on, black otherwise."""

    enabled: bool = False
    corner: Literal["top-left", "top-right", "bottom-left", "bottom-right"] = "bottom-right"
    size_px: int = Field(default=40, ge=4, le=400)


class DisplayConfig(_Strict):
    screen: int = Field(default=0, ge=0)
    size: tuple[int, int] = (1024, 768)
    fullscreen: bool = False
    background: float = Field(default=0.5, ge=0, le=1)
    """Background luminance, 0 black .. 1 white (0.5 = mean grey, the grating mean)."""
    wait_blanking: bool = True
    photodiode: PhotodiodeConfig = Field(default_factory=PhotodiodeConfig)
    image_dir: Path | None = None
    screenshot_dir: Path | None = None
    """If set, the first frame of the first `screenshots` trials is saved there as PNG."""
    screenshots: int = Field(default=1, ge=0)
    dropped_frame_tolerance: float = Field(default=1.2, gt=1.0, le=3.0)
    """A frame interval longer than this many refresh periods counts as a dropped frame."""
    inter_trial_frames: int = Field(default=1, ge=1)
    software_vsync: bool = False
    """Pace flips on the nominal refresh grid; only for virtual displays (Xvfb) without vblank."""


class KeyboardConfig(_Strict):
    keys: dict[str, float] = Field(default_factory=lambda: {"left": 0.0, "right": 1.0})
    """Key name (PsychoPy naming) -> response value."""
    abort_key: str = "escape"
    backend: Literal["", "ptb", "event", "iohub"] = ""

    @model_validator(mode="after")
    def _abort_not_a_response(self) -> "KeyboardConfig":
        if not self.keys:
            raise ValueError("keys: give at least one response key")
        if self.abort_key in self.keys:
            raise ValueError(f"abort_key {self.abort_key!r} is also a response key")
        return self


class Limit(_Strict):
    min: float
    max: float

    @model_validator(mode="after")
    def _ordered(self) -> "Limit":
        if self.min > self.max:
            raise ValueError(f"min ({self.min:g}) must not exceed max ({self.max:g})")
        return self


class StimulatorConfig(_Strict):
    driver: Literal["simulated", "serial"] = "simulated"
    port: str | None = None
    baudrate: int = Field(default=115200, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    limits: dict[str, Limit]
    """Hard limits per pulse_train parameter (units as in stimuli: uA, Hz, us, ms)."""
    max_charge_nc: float | None = Field(default=None, gt=0)
    """Charge per phase limit (amplitude uA x pulse_width us / 1000), if set."""

    @model_validator(mode="after")
    def _complete(self) -> "StimulatorConfig":
        missing = [p for p in STIMULATOR_LIMITED_PARAMETERS if p not in self.limits]
        if missing:
            raise ValueError(f"limits: missing hard limits for {missing} (every pulse_train parameter needs one)")
        unknown = [p for p in self.limits if p not in STIMULATOR_LIMITED_PARAMETERS]
        if unknown:
            raise ValueError(f"limits: unknown parameters {unknown} (known: {list(STIMULATOR_LIMITED_PARAMETERS)})")
        if self.driver == "serial" and not self.port:
            raise ValueError("port: the serial driver needs a port (e.g. /dev/ttyUSB0)")
        return self


class ZmqSourceConfig(_Strict):
    """A ZMQ PUB stream of events/spike counts from the acquisition system."""

    endpoint: str
    topic: str = ""
    window_s: tuple[float, float] = (0.0, 0.5)
    """Counting window relative to stimulus onset."""
    time_field: str = "t"
    """Event timestamp field (epoch seconds, same clock as the rig: NTP/PTP-synchronised)."""
    count_field: str | None = "count"
    """Field holding a count per message; None = each message counts as one event."""
    settle_s: float = Field(default=0.05, ge=0, le=10)
    """Extra wait after the window closes for late messages."""

    @model_validator(mode="after")
    def _window(self) -> "ZmqSourceConfig":
        if self.window_s[0] >= self.window_s[1]:
            raise ValueError(f"window_s: start ({self.window_s[0]}) must be before end ({self.window_s[1]})")
        return self


class ImageLimits(_Strict):
    """Hard limits on the images this display shows, checked before each image trial.

    Pixel values are uint8 (0..255); luminance and contrast are fractions of the display range
    (value / 255): ``mean_luminance`` bounds the mean over all pixels and channels, and
    ``rms_contrast_max`` the RMS contrast, their standard deviation (at most 0.5, a half-black,
    half-white image). The defaults allow every image; a rig narrows them for its subjects.
    """

    pixel: Limit = Field(default_factory=lambda: Limit(min=0, max=255))
    mean_luminance: Limit = Field(default_factory=lambda: Limit(min=0, max=1))
    rms_contrast_max: float = Field(default=0.5, ge=0, le=0.5)

    @model_validator(mode="after")
    def _ranges(self) -> "ImageLimits":
        if not (0 <= self.pixel.min and self.pixel.max <= 255):
            raise ValueError(f"pixel: limits must lie within 0..255, got [{self.pixel.min:g}, {self.pixel.max:g}]")
        if not (0 <= self.mean_luminance.min and self.mean_luminance.max <= 1):
            raise ValueError("mean_luminance: limits are fractions of the display range, within 0..1")
        return self

    def violations(self, pixels: "Any") -> list[str]:
        """Every way a uint8 image breaks these limits (empty list = allowed)."""
        import numpy as np

        values = np.asarray(pixels)
        problems: list[str] = []
        lo, hi = int(values.min()), int(values.max())
        if lo < self.pixel.min or hi > self.pixel.max:
            problems.append(f"pixel values {lo}..{hi} outside rig limit [{self.pixel.min:g}, {self.pixel.max:g}]")
        scaled = values.astype(np.float64) / 255.0
        mean, rms = float(scaled.mean()), float(scaled.std())
        if not self.mean_luminance.min <= mean <= self.mean_luminance.max:
            problems.append(f"mean luminance {mean:.4f} outside rig limit "
                            f"[{self.mean_luminance.min:g}, {self.mean_luminance.max:g}]")
        if rms > self.rms_contrast_max:
            problems.append(f"RMS contrast {rms:.4f} exceeds rig limit {self.rms_contrast_max:g}")
        return problems


class RigConfig(_Strict):
    rig_id: str | None = None
    monitor: MonitorProfile = Field(default_factory=MonitorProfile)
    display: DisplayConfig = Field(default_factory=DisplayConfig)
    keyboard: KeyboardConfig = Field(default_factory=KeyboardConfig)
    stimulator: StimulatorConfig | None = None
    zmq: ZmqSourceConfig | None = None
    image_limits: ImageLimits = Field(default_factory=ImageLimits)
    sources: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Settings of plugin response sources by source name (e.g. ``openephys``, ``lsl``); each
    source validates its own section when it is selected, naming the field at fault."""


def load_rig_config(path: str | Path | None) -> RigConfig:
    """Read a rig config YAML (None = defaults); raise RigConfigError naming each bad field."""
    if path is None:
        return RigConfig()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RigConfigError(f"{path}: cannot read rig config: {exc}") from None
    if not isinstance(data, dict):
        raise RigConfigError(f"{path}: a rig config must be a mapping")
    try:
        return RigConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"])
            lines.append(f"{path}: {loc or '(top)'}: {err['msg']}")
        raise RigConfigError("\n".join(lines)) from None
