"""Shared pieces of the protocol schema: the strict base of every node and the name pattern."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"


class Strict(BaseModel):
    """Base for every schema node: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def require_low_below_high(low: float, high: float) -> None:
    """The one wording of an empty or inverted range, for every node with `low` and `high`."""
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high})")
