"""Encoding models: builtin library, protocol formulas, the Gaussian-process candidate, priors, likelihoods."""
from orchestrator.models.base import EncodingModel, ParameterInfo, VariableInfo
from orchestrator.models.registry import (ENTRY_POINT_GROUP, ModelInfo, available_models, builtin_catalogue,
                                          get_model_class, register_model)
from orchestrator.models.candidate import NOISE_PARAM, Candidate, ModelSpecError, build_candidates, check_protocol
from orchestrator.models.formula import FormulaError, compile_formula
from orchestrator.models.likelihoods import Likelihood, make_likelihood
from orchestrator.models.priors import Prior, PriorError, make_prior
from orchestrator.models.space import StimulusEncoding
from orchestrator.models.truth import Truth, build_truth, parse_truth_spec

__all__ = [
    "ENTRY_POINT_GROUP", "EncodingModel", "ParameterInfo", "VariableInfo", "ModelInfo", "builtin_catalogue",
    "available_models", "get_model_class", "register_model",
    "NOISE_PARAM", "Candidate", "ModelSpecError", "build_candidates", "check_protocol",
    "FormulaError", "compile_formula", "Likelihood", "make_likelihood", "Prior", "PriorError", "make_prior",
    "StimulusEncoding", "Truth", "build_truth", "parse_truth_spec",
]
