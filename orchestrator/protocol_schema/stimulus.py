"""The stimulus section of a protocol: scalar parameter spaces and image stimuli."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from orchestrator.protocol_schema.base import Strict, require_low_below_high


class ContinuousParameter(Strict):
    kind: Literal["continuous"]
    low: float
    high: float
    units: str = ""
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> "ContinuousParameter":
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        require_low_below_high(self.low, self.high)
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low={self.low}")
        return self


class IntegerParameter(Strict):
    kind: Literal["integer"]
    low: int
    high: int
    units: str = ""

    @model_validator(mode="after")
    def _bounds(self) -> "IntegerParameter":
        require_low_below_high(self.low, self.high)
        return self


class CategoricalParameter(Strict):
    kind: Literal["categorical"]
    choices: list[Union[str, int, float]] = Field(min_length=1)
    units: str = ""

    @field_validator("choices")
    @classmethod
    def _unique(cls, choices: list[Any]) -> list[Any]:
        if len(set(map(str, choices))) != len(choices):
            raise ValueError("choices must be unique")
        return choices


StimulusParameter = Annotated[
    Union[ContinuousParameter, IntegerParameter, CategoricalParameter], Field(discriminator="kind")
]


class StimulusSpace(Strict):
    type: str = "abstract"
    parameters: dict[str, StimulusParameter] = Field(min_length=1)
    fixed: dict[str, Any] = Field(default_factory=dict)
    """Stimulus-type parameters that are held constant (e.g. size, spatial frequency)."""
    duration_s: float | None = Field(default=None, gt=0)

    @field_validator("parameters")
    @classmethod
    def _names(cls, parameters: dict[str, Any]) -> dict[str, Any]:
        for name in parameters:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"parameter name {name!r} must be an identifier")
        return parameters


#: safety limit names of an image stimulus space (pixel values in 0..1, 0 = black, 1 = white)
IMAGE_SAFETY_LIMITS = ("pixel", "mean_luminance", "rms_contrast")
IMAGE_REF = re.compile(r"^[0-9a-f]{64}$")


class ImageStimulusSpace(Strict):
    """Images of a fixed size, chosen from a pool or synthesized pixel by pixel.

    Pixels are numbers in 0..1 (stored and sent as uint8 0..255). ``pool`` is a .npz file (one
    array of shape (n, H, W) or (n, H, W, C)) or a directory of .npy/.png images; without one the
    designs use a seeded pool of ``pool_size`` 1/f-noise images (natural-image-like spectra).
    """

    type: Literal["image"]
    size: tuple[int, int]
    channels: Literal[1, 3] = 1
    parametrization: Literal["pixels"] = "pixels"
    pool: str | None = None
    pool_size: int = Field(default=1000, ge=2, le=100_000)
    duration_s: float | None = Field(default=None, gt=0)

    @field_validator("size")
    @classmethod
    def _size(cls, size: tuple[int, int]) -> tuple[int, int]:
        if not all(4 <= v <= 1024 for v in size):
            raise ValueError(f"each side must be 4..1024 pixels, got {list(size)}")
        return size

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape of one image: (H, W) for grey, (H, W, C) for colour."""
        h, w = self.size
        return (h, w) if self.channels == 1 else (h, w, self.channels)


def _stimulus_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "image" if kind == "image" else "scalar"


AnyStimulusSpace = Annotated[
    Union[Annotated[StimulusSpace, Tag("scalar")], Annotated[ImageStimulusSpace, Tag("image")]],
    Discriminator(_stimulus_kind),
]
