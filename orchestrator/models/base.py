"""The encoding-model interface and the metadata every model declares (for the catalogue).

An encoding model maps stimulus variables and parameters to the mean of the response
(a probability for bernoulli/binomial, a rate for poisson, a mean for gaussian). Everything is
elementwise torch so that one call evaluates N particles x S stimuli by broadcasting.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch



@dataclass(frozen=True)
class ParameterInfo:
    """One model parameter: what it means, its unit ("" = dimensionless) and the axis on which
    priors and plots are natural ("linear" or "log")."""

    name: str
    meaning: str
    unit: str = ""
    axis: str = "linear"


@dataclass(frozen=True)
class VariableInfo:
    """One input variable of a model (bound to a stimulus parameter by the protocol's `inputs:`)."""

    name: str
    meaning: str
    unit: str = ""


class EncodingModel(ABC):
    """A parametric encoding model. Subclasses set `id`, `parameters`, `variables`, `doc` and,
    for the catalogue, `parameter_info` / `variable_info` (meaning, unit, axis of each name)."""

    id: ClassVar[str]
    parameters: ClassVar[tuple[str, ...]]
    variables: ClassVar[tuple[str, ...]]
    doc: ClassVar[str] = ""
    parameter_info: ClassVar[tuple[ParameterInfo, ...]] = ()
    variable_info: ClassVar[tuple[VariableInfo, ...]] = ()

    @classmethod
    def describe_parameters(cls) -> tuple[ParameterInfo, ...]:
        """Metadata of every parameter, in `parameters` order (names without metadata get blanks)."""
        known = {p.name: p for p in cls.parameter_info}
        return tuple(known.get(n, ParameterInfo(n, "")) for n in cls.parameters)

    @classmethod
    def describe_variables(cls) -> tuple[VariableInfo, ...]:
        known = {v.name: v for v in cls.variable_info}
        return tuple(known.get(n, VariableInfo(n, "")) for n in cls.variables)

    @abstractmethod
    def mean(self, x: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Response mean; inputs broadcast against each other (e.g. theta (N,1) x stimuli (S,))."""
