"""What a protocol can name, read from the installed code: models, priors, design strategies, plug-ins.

`cloop models` and `cloop designs` print these tables, and docs/protocols.md embeds the same text
(a test compares them), so the reference cannot drift from the code. Names, variables, parameters,
aliases and entry points come from the registries themselves; the one-line meanings and units of
the builtin models' parameters and of the strategies' settings are kept here, next to the code
that renders them, and a test fails when a model or strategy has a name without its note.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from importlib.metadata import entry_points

#: Plug-in groups a lab can add to (see docs/extending.md).
ENTRY_POINT_GROUPS = ("cloop.models", "cloop.adapters", "cloop.responses", "cloop.stimuli")

#: Builtin model id -> {variable or parameter: meaning and units}. Models see raw stimulus values:
#: `log: true` on a stimulus parameter changes how designs search it, never what a model receives.
MODEL_NOTES: dict[str, dict[str, str]] = {
    "retention_power": {
        "t": "retention interval (the stimulus parameter's units, e.g. s)",
        "a": "recall probability at t = 0 (0..1)", "b": "forgetting exponent (> 0, dimensionless)"},
    "retention_exponential": {
        "t": "retention interval (the stimulus parameter's units, e.g. s)",
        "a": "recall probability at t = 0 (0..1)", "b": "forgetting rate (per unit of t)"},
    "orientation_von_mises": {
        "theta": "orientation, deg (period 180)", "baseline": "response far from the preferred orientation",
        "amplitude": "peak response above baseline", "kappa": "concentration (> 0; larger = narrower tuning)",
        "pref": "preferred orientation, deg"},
    "orientation_gaussian": {
        "theta": "orientation, deg (period 180)", "baseline": "response far from the preferred orientation",
        "amplitude": "peak response above baseline", "width": "tuning width (SD), deg",
        "pref": "preferred orientation, deg"},
    "contrast_naka_rushton": {
        "c": "contrast, fraction 0..1 (linear)", "baseline": "response at zero contrast",
        "rmax": "response range above baseline", "c50": "semi-saturation contrast, fraction 0..1 (linear)",
        "n": "exponent (> 0)"},
    "contrast_linear_threshold": {
        "c": "contrast, fraction 0..1 (linear)", "baseline": "response below threshold",
        "slope": "response per unit of contrast above threshold (linear)",
        "threshold": "contrast where the response starts to rise, fraction (linear)"},
    "orientation_contrast": {
        "theta": "orientation, deg (period 180)", "c": "contrast, fraction 0..1 (linear)",
        "baseline": "spontaneous response", "rmax": "peak response above baseline at full drive",
        "kappa": "orientation concentration (> 0)", "pref": "preferred orientation, deg",
        "c50": "semi-saturation contrast, fraction (linear)", "n": "contrast exponent (> 0)"},
    "divisive_normalization": {
        "theta": "orientation, deg (period 180)", "c": "contrast, fraction 0..1 (linear)",
        "baseline": "spontaneous response", "rmax": "peak response above baseline",
        "kappa": "orientation concentration of the drive (> 0)", "pref": "preferred orientation, deg",
        "sigma": "normalization constant, contrast units (linear)", "n": "exponent (> 0)"},
    **{model_id: {
        "x": "stimulus intensity in the stimulus parameter's own units (linear axis; log it in the"
             " protocol if you want a log axis)" + (", x > 0" if model_id.endswith("weibull") else ""),
        "threshold": "intensity at the curve's midpoint, same units and axis as x (linear)",
        "slope": ("shape exponent (dimensionless, > 0)" if model_id.endswith("weibull")
                  else "steepness, per unit of x (linear)"),
        "guess": "lower asymptote, probability (e.g. 0.5 in 2AFC: fix it, see 'fixed')",
        "lapse": "lapse rate, probability (upper asymptote = 1 - lapse)"}
       for model_id in ("psychometric_logistic", "psychometric_weibull", "psychometric_cumulative_normal")},
    **{model_id: {
        "r_ss": "smaller-sooner reward amount", "t_ss": "smaller-sooner delay",
        "r_ll": "larger-later reward amount", "t_ll": "larger-later delay",
        "k": "discount rate, per unit of delay (> 0)", "tau": "choice inverse temperature (> 0)"}
       for model_id in ("discounting_exponential", "discounting_hyperbolic")},
}

#: Settings every non-GP model accepts under `models[i].settings`.
MODEL_SETTINGS = {
    "fixed": "{parameter: number}: hold a parameter at a value instead of inferring it (no prior then)",
    "particles": "number of posterior particles (default 2000; 4000 above 3 free parameters)",
    "moves": "MCMC rejuvenation moves per resampling (default 4)",
}

GP_ENTRY = {
    "doc": "nonparametric: response mean = link(f(x)), f ~ GP with a scaled RBF kernel on the unit-scaled"
           " stimulus space (log scale for `log: true` parameters)",
    "settings": {
        "link": "exp (poisson default) | logit (bernoulli/binomial default) | identity (gaussian default)",
        "lengthscale": "RBF lengthscale on the unit-scaled space (default 0.25; or a prior: its median)",
        "outputscale": "kernel variance (default 2.0, 1.0 for identity; or a prior: its median)",
        "mean": "constant mean on the link scale (default: link of the running mean response; or a prior)",
        "noise_sd": "gaussian responses: noise SD (default 1.0; or a prior: its median)",
        "quadrature": "Gauss-Hermite nodes for the evidence (default 32)",
        "design_nodes": "quadrature nodes of the predictive used by designs (default 12)",
    },
}

#: Strategy class name -> {setting: meaning}. Aliases share their class's entry.
DESIGN_SETTINGS: dict[str, dict[str, str]] = {
    "RandomDesign": {},
    "SweepDesign": {
        "stimuli": "list of stimulus mappings, presented in order (cycling)",
        "values": "list of values of the single stimulus parameter",
        "points": "evenly spaced points per dimension (default 10)"},
    "StaircaseDesign": {
        "parameter": "the numeric parameter to vary (default: the first numeric one)",
        "start": "starting value (default: the upper limit)",
        "step": "first step (default: 1/10 of the range; halved at each reversal)",
        "min_step": "smallest step (default: step / 8)",
        "down": "correct answers in a row before stepping down (default 2)",
        "up": "wrong answers in a row before stepping up (default 1)"},
    "InformationDesign": {
        "mode": "auto (discriminate, then characterize the leader past design.characterize_threshold)"
                " | discriminate | characterize",
        "model": "the model to characterize (default: the current leader)",
        "max_components": "particles per model in the predictive mixture (default 512, 256 if all discrete)",
        "raw_samples": "random starts scored before optimizing (default 128; 32 when characterizing)",
        "num_restarts": "gradient restarts from the best raw samples (default 1)",
        "maxiter": "optimizer iterations per restart (default 5)",
        "exhaustive_limit": "discrete spaces up to this many stimuli are scored exhaustively (default 5000)",
        "mixed_limit": "categorical combinations optimized separately in mixed spaces (default 32)",
        "float32": "score in float32 (default true; false for float64)"},
}
DESIGN_SETTINGS["ParameterEstimationDesign"] = {
    k: v for k, v in DESIGN_SETTINGS["InformationDesign"].items() if k != "mode"}


@dataclass(frozen=True)
class ModelEntry:
    """One model id a protocol can name under `builtin:`."""

    id: str
    doc: str
    variables: tuple[str, ...]
    parameters: tuple[str, ...]
    notes: dict[str, str] = field(default_factory=dict)
    source: str = "builtin"


@dataclass(frozen=True)
class PriorEntry:
    dist: str
    arguments: tuple[str, ...]


@dataclass(frozen=True)
class DesignEntry:
    name: str
    aliases: tuple[str, ...]
    doc: str
    settings: dict[str, str]


def _is_builtin(cls: type) -> bool:
    """A model class shipped with cloop (as opposed to one from another package's entry point)."""
    return cls.__module__.startswith("orchestrator.")


def models() -> list[ModelEntry]:
    """Builtin models (registry order: by id), then models from `cloop.models` entry points."""
    from orchestrator.models import base

    found: list[ModelEntry] = []
    for model_id in base.available_models():
        if model_id == "gaussian_process":
            found.append(ModelEntry(model_id, GP_ENTRY["doc"], (), (), dict(GP_ENTRY["settings"])))
            continue
        cls = base.get_model_class(model_id)
        source = "builtin" if _is_builtin(cls) else f"entry point {base.ENTRY_POINT_GROUP}"
        notes = MODEL_NOTES.get(model_id, {})
        found.append(ModelEntry(model_id, (cls.doc or cls.__doc__ or "").strip(), tuple(cls.variables),
                                tuple(cls.parameters), dict(notes), source))
    return found


def priors() -> list[PriorEntry]:
    """Prior distributions of the protocol schema with their argument names, in schema order."""
    from orchestrator.protocol import Prior

    union = typing.get_args(Prior)[0]
    found = []
    for cls in typing.get_args(union):
        (dist,) = typing.get_args(cls.model_fields["dist"].annotation)
        found.append(PriorEntry(dist, tuple(name for name in cls.model_fields if name != "dist")))
    return found


def designs() -> list[DesignEntry]:
    """Design strategies (each class once, its aliases beside it)."""
    from orchestrator.design import STRATEGIES

    by_target: dict[object, list[str]] = {}
    for name, target in STRATEGIES.items():
        by_target.setdefault(target, []).append(name)
    found = []
    for target, names in by_target.items():
        cls = target if isinstance(target, type) else None
        canonical = getattr(cls, "name", None) if cls else None
        primary = canonical if canonical in names else names[0]
        doc = " ".join((cls.__doc__ or "").split()) if cls else ""
        if cls is None:  # a preset of another strategy (e.g. discriminate = mutual information, one mode)
            doc = "mutual information, mode fixed to discriminate (never switches to characterizing)"
            settings = {k: v for k, v in DESIGN_SETTINGS["InformationDesign"].items() if k not in ("mode", "model")}
        else:
            settings = DESIGN_SETTINGS.get(cls.__name__, {})
        found.append(DesignEntry(primary, tuple(n for n in names if n != primary), doc, settings))
    return found


def plugins() -> dict[str, list[tuple[str, str]]]:
    """Installed entry points per cloop group: [(name, module:object), ...]."""
    return {group: sorted((ep.name, ep.value) for ep in entry_points(group=group)) for group in ENTRY_POINT_GROUPS}


def render_models() -> str:
    """Markdown for `cloop models`: builtin models, model settings, priors, model plug-ins."""
    from orchestrator.models.candidate import NOISE_PARAM
    from orchestrator.models.formula import CONSTANTS, FUNCTIONS

    lines = ["### Models", ""]
    for entry in models():
        lines.append(f"#### `{entry.id}`" + ("" if entry.source == "builtin" else f" ({entry.source})"))
        lines += ["", entry.doc, ""]
        if entry.id == "gaussian_process":
            lines += ["Settings (`models[i].settings`):", ""]
            lines += [f"- `{k}`: {v}" for k, v in entry.notes.items()]
        else:
            for label, names in (("inputs", entry.variables), ("parameters", entry.parameters)):
                lines.append(f"{label.capitalize()}:")
                lines.append("")
                lines += [f"- `{n}`" + (f": {entry.notes[n]}" if n in entry.notes else "") for n in names]
                lines.append("")
            lines.pop()
        lines.append("")
    lines += ["### Model settings (every model except `gaussian_process`)", ""]
    lines += [f"- `{k}`: {v}" for k, v in MODEL_SETTINGS.items()]
    lines += ["", f"With a `gaussian` response every model has one more parameter, `{NOISE_PARAM}` (the response"
              " noise SD, response units): give it a prior or a value under `settings.fixed`."]
    lines += ["", "### Formula models", "",
              "`formula:` is the response mean written with numbers, the model's parameters and input"
              " variables, `+ - * / **`, unary minus, these constants and these functions:", ""]
    lines.append("- constants: " + ", ".join(f"`{name}`" for name in CONSTANTS))
    lines.append("- functions: " + ", ".join(f"`{name}({', '.join('xyz'[:arity])})`"
                                            for name, (arity, _impl) in FUNCTIONS.items()))
    lines += ["", "### Priors", "", "| dist | arguments |", "|---|---|"]
    lines += [f"| `{p.dist}` | {', '.join(f'`{a}`' for a in p.arguments)} |" for p in priors()]
    return "\n".join(lines) + "\n"


def render_designs(include_plugins: bool = True) -> str:
    """Markdown for `cloop designs`: strategies with aliases and settings, then installed plug-ins."""
    lines = ["### Design strategies", ""]
    for entry in designs():
        aliases = f" (aliases: {', '.join(f'`{a}`' for a in entry.aliases)})" if entry.aliases else ""
        lines += [f"#### `{entry.name}`{aliases}", "", entry.doc, ""]
        if entry.settings:
            lines += ["Settings (`design.settings`):", ""]
            lines += [f"- `{k}`: {v}" for k, v in entry.settings.items()]
        else:
            lines.append("No settings.")
        lines.append("")
    if include_plugins:
        lines += ["### Installed plug-ins", ""]
        for group, eps in plugins().items():
            lines.append(f"- `{group}`: " + (", ".join(f"`{n}` ({v})" for n, v in eps) if eps else "none"))
        lines.append("")
    return "\n".join(lines[:-1]) + "\n"


def render_reference() -> str:
    """The catalogue section of docs/protocols.md: what this code version ships, without plug-ins."""
    import stimuli

    return (render_models() + "\n" + render_designs(include_plugins=False)
            + "\n### Stimulus types\n\n" + stimuli.describe_types().strip().replace("### `", "#### `") + "\n")


BEGIN_MARK = "<!-- catalogue: generated by `python -m orchestrator.catalogue docs/protocols.md` -->"
END_MARK = "<!-- end of catalogue -->"


def replace_section(document: str, section: str) -> str:
    """`document` with the text between the catalogue marks replaced by `section`."""
    head, found, rest = document.partition(BEGIN_MARK)
    _old, found_end, tail = rest.partition(END_MARK)
    if not (found and found_end):
        raise ValueError("the document has no catalogue marks")
    return f"{head}{BEGIN_MARK}\n\n{section}\n{END_MARK}{tail}"


def main(argv: list[str] | None = None) -> None:
    """Rewrite the catalogue section of the given markdown file(s) from the installed code."""
    import sys
    from pathlib import Path

    for name in (sys.argv[1:] if argv is None else argv):
        path = Path(name)
        path.write_text(replace_section(path.read_text(encoding="utf-8"), render_reference()), encoding="utf-8")


if __name__ == "__main__":
    main()
