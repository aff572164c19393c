"""What each design strategy does and which `design.settings` it reads, for `cloop designs`.

One entry per strategy name `make_design` accepts; the settings' defaults are the ones the code
uses (orchestrator.design.information, .grid, .baselines), the limits those of .limits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.design import limits
from orchestrator.models import grid


@dataclass(frozen=True)
class SettingInfo:
    name: str
    default: Any
    meaning: str


@dataclass(frozen=True)
class DesignInfo:
    name: str
    summary: str
    settings: tuple[SettingInfo, ...]
    aliases: tuple[str, ...] = ()


_MODE = SettingInfo("mode", "auto", "auto (discriminate, then characterize past design.characterize_threshold), "
                                    "discriminate or characterize")
_COMMON = (SettingInfo("inference", "auto", "posterior of every model: auto (exact grid when it applies), grid, smc"),)
_INFORMATION = (
    _MODE,
    SettingInfo("model", None, "characterize this model (default: the current leader)"),
    SettingInfo("exact", True, "run as exact grid ADO when every model has <= 3 parameters and the stimulus "
                               f"space has <= {grid.MAX_STIMULI} candidate stimuli (continuous dimensions on settings.points "
                               "grid points) and outcome tables "
                               f"<= {grid.MAX_TABLE_ENTRIES} float32 entries"),
    SettingInfo("exhaustive_limit", 5000, "score every stimulus of a discrete space up to this many points "
                                          "(beyond: a seeded sample of this many)"),
    SettingInfo("mixed_limit", 32, "optimise continuous dimensions per discrete combination up to this many"),
    SettingInfo("max_components", "256 (discrete) / 128 (continuous, batched) / 512 (continuous, lbfgs)",
                "particles per model in the design's mixture"),
    SettingInfo("optimizer", "batched", "continuous spaces, one stimulus per decision: batched (Sobol points, "
                                        "then pattern-search rounds, no gradients) or lbfgs (BoTorch optimize_acqf)"),
    SettingInfo("raw_samples", 128, "seeded candidate points scored first (32 when characterizing)"),
    SettingInfo("refine_rounds", 2, "batched optimizer: pattern-search rounds after the Sobol points"),
    SettingInfo("refine_keep", 2, "batched optimizer: best points refined per round"),
    SettingInfo("num_restarts", 1, "L-BFGS-B starts from the best raw samples"),
    SettingInfo("maxiter", 5, "L-BFGS-B iterations per decision"),
    SettingInfo("float32", True, "float32 outcome tables (ranking only; evidence stays float64)"),
) + _COMMON


def catalogue() -> list[DesignInfo]:
    """Every design strategy with its settings and defaults, the population designs last."""
    return _scalar_designs() + population_designs()


#: Meanings of the population designs' settings (their defaults are read from the code's docs).
POPULATION_SETTINGS = {
    "contrast": "RMS contrast of the noise images (default 0.8 x the protocol's rms_contrast limit)",
    "starts": "best pool images the synthesis starts from (default 3)",
    "random_starts": "extra starts from seeded noise images (default 1)",
    "steps": "gradient steps per start (default 30)",
    "lr": "Adam learning rate on the pixel parametrization (default 0.08)",
    "margin": "feature energy may reach the pool's maximum times 1 + margin (default 0)",
    "pipeline": "compute the next image while the current trial runs (default true)",
}


def population_designs() -> list[DesignInfo]:
    """The population design strategies (summary: the class docstring; settings: what each reads)."""
    from orchestrator.neural.designs import STRATEGIES

    found = []
    for name, cls in STRATEGIES.items():
        settings = tuple(SettingInfo(key, None, POPULATION_SETTINGS.get(key, ""))
                         for key in sorted(cls.known_settings, key=list(POPULATION_SETTINGS).index))
        found.append(DesignInfo(name, " ".join((cls.__doc__ or "").split()), settings))
    return found


def _scalar_designs() -> list[DesignInfo]:
    return [
        DesignInfo("mutual_information", "maximise the mutual information between the next response and the "
                   "model identity (then the winner's parameters)", _INFORMATION, ("mi", "ado")),
        DesignInfo("discriminate", "mutual_information fixed to mode: discriminate", _INFORMATION),
        DesignInfo("parameter_estimation", "maximise information about one model's parameters", _INFORMATION),
        DesignInfo("exact_grid", "exact ADO: every candidate stimulus scored by its exact mutual information on "
                   f"parameter grids (<= {grid.MAX_GRID_PARAMS} parameters per model, one stimulus per decision)",
                   (_MODE, SettingInfo("model", None, "characterize this model (default: the leader)"),
                    SettingInfo("points", "101 (1 continuous dim) / 33 (2) / 9", "grid points per continuous "
                                "stimulus dimension"))),
        DesignInfo("random", "uniform draws within the safety limits (log-uniform on log axes)", _COMMON),
        DesignInfo("sweep", "cycle through a fixed list of stimuli",
                   (SettingInfo("stimuli", None, "list of stimulus mappings"),
                    SettingInfo("values", None, "values of the single numeric parameter"),
                    SettingInfo("points", 10, f"evenly spaced points per dimension (at most "
                                              f"{limits.MAX_SWEEP_POINTS} in all)")) + _COMMON, ("fixed",)),
        DesignInfo("staircase", "transformed up/down staircase on one numeric parameter",
                   (SettingInfo("parameter", "first numeric", "the stimulus parameter stepped"),
                    SettingInfo("start", "upper limit", "first level"),
                    SettingInfo("step", "range / 10", "initial step, halved at each reversal"),
                    SettingInfo("min_step", "step / 8", "smallest step"),
                    SettingInfo("down", 2, "correct answers in a row before stepping down"),
                    SettingInfo("up", 1, "errors before stepping up")) + _COMMON),
    ]


__all__ = ["DesignInfo", "SettingInfo", "catalogue", "population_designs"]
