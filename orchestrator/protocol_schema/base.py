"""Shared pieces of the protocol schema: the strict base of every node and the name pattern."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_\-]*$"


class Strict(BaseModel):
    """Base for every schema node: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)
