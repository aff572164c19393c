"""Candidate models as a protocol declares them: model + input mapping + priors + likelihood.

`Candidate.mean(X, theta)` evaluates N parameter vectors at S raw stimuli in one broadcast call,
which is what both inference (N particles x T observations) and design (N x S candidates) need.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from orchestrator.models.base import EncodingModel
from orchestrator.models.registry import get_model_class
from orchestrator.models.formula import CompiledFormula, FormulaError, compile_formula
from orchestrator.models.likelihoods import Likelihood, make_likelihood
from orchestrator.models.priors import Prior, PriorError, make_prior
from orchestrator.models.space import StimulusEncoding

GP_ID = "gaussian_process"
#: name of the Gaussian-response noise SD parameter (needs a prior, or a value in settings.fixed)
NOISE_PARAM = "noise_sd"


class ModelSpecError(ValueError):
    """A model entry of the protocol cannot be built; `problems` holds (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m in problems))


class _FormulaModel(EncodingModel):
    id = "formula"
    parameters: tuple[str, ...] = ()
    variables: tuple[str, ...] = ()

    def __init__(self, compiled: CompiledFormula, parameters: tuple[str, ...], variables: tuple[str, ...]) -> None:
        self.compiled = compiled
        self.parameters = parameters  # type: ignore[misc]
        self.variables = variables  # type: ignore[misc]

    def mean(self, x: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.compiled({**x, **theta})


@dataclass
class Candidate:
    """One competing hypothesis, ready for inference."""

    name: str
    index: int
    model: EncodingModel | None  # None for the Gaussian-process candidate
    priors: dict[str, Prior]  # free parameters (incl. NOISE_PARAM for gaussian responses)
    fixed: dict[str, float]
    var_columns: dict[str, int]  # model variable -> column of the raw stimulus tensor
    likelihood: Likelihood
    prior_probability: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def is_gp(self) -> bool:
        return self.model is None

    @property
    def free_params(self) -> tuple[str, ...]:
        return tuple(self.priors)

    def mean(self, X: torch.Tensor, theta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Response mean for parameter tensors theta[p] (N,) at raw stimuli X (S, d) -> (N, S)."""
        assert self.model is not None
        x = {v: X[..., c] for v, c in self.var_columns.items()}
        th: dict[str, torch.Tensor] = {p: t.unsqueeze(-1) for p, t in theta.items()}
        for p, v in self.fixed.items():
            th.setdefault(p, torch.tensor(v, dtype=X.dtype))
        out = self.model.mean(x, th)
        n = next(iter(theta.values())).shape[0] if theta else 1
        shape = (n, X.shape[0])
        return out if tuple(out.shape) == shape else torch.broadcast_to(out, shape)

    def noise(self, theta: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Gaussian noise SD per parameter vector (N,), None for discrete responses."""
        if self.likelihood.kind != "gaussian":
            return None
        if NOISE_PARAM in theta:
            return theta[NOISE_PARAM]
        n = next(iter(theta.values())).shape[0] if theta else 1
        return torch.full((n,), float(self.fixed[NOISE_PARAM]), dtype=torch.float64)


def _fixed_values(settings: Mapping[str, Any], path: str, problems: list[tuple[str, str]]) -> dict[str, float]:
    raw = settings.get("fixed", {}) or {}
    if not isinstance(raw, Mapping):
        problems.append((f"{path}.settings.fixed", "must be a mapping parameter -> number"))
        return {}
    out: dict[str, float] = {}
    for k, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            problems.append((f"{path}.settings.fixed.{k}", f"must be a number, got {v!r}"))
        else:
            out[str(k)] = float(v)
    return out


def build_candidates(protocol: Any) -> list[Candidate]:
    """Build every candidate of the protocol, or raise ModelSpecError listing all problems."""
    space = StimulusEncoding(protocol)
    likelihood = make_likelihood(protocol.response)
    probs = protocol.model_prior_probabilities()
    problems: list[tuple[str, str]] = []
    out: list[Candidate] = []
    stim_names = set(space.names)
    for i, spec in enumerate(protocol.models):
        path = f"models.{i}"
        settings = dict(spec.settings or {})
        fixed = _fixed_values(settings, path, problems)
        priors: dict[str, Prior] = {}
        for pname, pspec in (spec.priors or {}).items():
            try:
                priors[pname] = make_prior(pspec, f"{path}.priors.{pname}")
            except PriorError as exc:
                problems.append((f"{path}.priors.{pname}", str(exc).split(": ", 1)[-1]))
        both = sorted(set(priors) & set(fixed))
        for p in both:
            problems.append((f"{path}.settings.fixed.{p}", "parameter has both a prior and a fixed value"))
        noise_needed = likelihood.kind == "gaussian"
        model: EncodingModel | None
        if spec.builtin == GP_ID:
            model = None
            variables = tuple(space.names)  # the GP sees every stimulus dimension
            params: tuple[str, ...] = ()
            # GP hyper-priors are optional; any prior given must name a known hyperparameter
            from orchestrator.models.gp import GP_HYPERPARAMETERS

            for p in priors:
                if p not in GP_HYPERPARAMETERS and p != NOISE_PARAM:
                    problems.append((f"{path}.priors.{p}", f"not a gaussian_process hyperparameter "
                                                           f"(known: {', '.join(GP_HYPERPARAMETERS)})"))
            noise_needed = False
        elif spec.builtin is not None:
            try:
                cls = get_model_class(spec.builtin)
            except ValueError as exc:
                problems.append((f"{path}.builtin", str(exc)))
                continue
            model = cls()
            params, variables = tuple(cls.parameters), tuple(cls.variables)
        else:
            reserved = set(priors) | set(fixed)
            allowed = {p: "parameter" for p in reserved}
            allowed.update({v: "variable" for v in spec.inputs})
            allowed.update({s: "variable" for s in stim_names if s not in allowed})
            try:
                compiled = compile_formula(spec.formula, allowed, f"{path}.formula")
            except FormulaError as exc:
                problems.append((exc.path, exc.message))
                continue
            params = tuple(sorted(n for n in compiled.names if n in reserved))
            variables = tuple(sorted(n for n in compiled.names if n not in reserved))
            model = _FormulaModel(compiled, params, variables)
        # variable -> stimulus column
        var_columns: dict[str, int] = {}
        for v in variables:
            target = spec.inputs.get(v, v)
            if target not in space.index:
                problems.append((f"{path}.inputs.{v}" if v in spec.inputs else f"{path}.inputs",
                                 f"model variable {v!r} has no stimulus parameter (map it with inputs: {{{v}: PARAM}}; "
                                 f"stimulus parameters: {sorted(stim_names)})"))
                continue
            var_columns[v] = space.index[target]
        for v in spec.inputs:
            if model is not None and v not in variables:
                problems.append((f"{path}.inputs.{v}", f"not a variable of this model (variables: {list(variables)})"))
        if model is not None:
            needed = set(params) | ({NOISE_PARAM} if noise_needed else set())
            for p in sorted(needed - set(priors) - set(fixed)):
                problems.append((f"{path}.priors", f"missing prior for parameter {p!r}"
                                 + (" (gaussian response noise SD)" if p == NOISE_PARAM else "")))
            if not set(priors) & needed:
                problems.append((f"{path}.priors", "at least one parameter needs a prior (all are fixed)"))
            for p in sorted((set(priors) | set(fixed)) - needed):
                where = f"{path}.priors.{p}" if p in priors else f"{path}.settings.fixed.{p}"
                problems.append((where, f"not a parameter of this model (parameters: {sorted(needed)})"))
        out.append(Candidate(spec.name, i, model, priors, fixed, var_columns, likelihood,
                             probs[spec.name], settings))
    if problems:
        raise ModelSpecError(problems)
    return out


def check_protocol(protocol: Any) -> list[tuple[str, str]]:
    """Hook used by orchestrator.protocol: every model-definition problem as (field path, message)."""
    try:
        build_candidates(protocol)
    except ModelSpecError as exc:
        return exc.problems
    except ValueError as exc:  # e.g. response section problems already reported by the schema
        return [("models", str(exc))]
    return []
