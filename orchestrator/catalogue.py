"""What a protocol can name, read from the installed code: models, priors, design strategies, plug-ins.

`cloop models` and `cloop designs` print these tables, and docs/protocols.md embeds the same text
(a test compares them), so the reference cannot drift from the code. Models, their inputs and
parameters (meaning, unit, natural axis) come from `orchestrator.models.builtin_catalogue()`, design
strategies and their settings (population designs included) from `orchestrator.design.catalogue()`.
Kept here only what has no other home: the settings shared by every model and the
Gaussian-process candidate's settings (it is no `EncodingModel` class).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

#: Plug-in groups a lab can add to (see docs/extending.md).
ENTRY_POINT_GROUPS = ("cloop.models", "cloop.adapters", "cloop.responses", "cloop.stimuli")

#: Settings every non-GP model accepts under `models[i].settings`.
MODEL_SETTINGS = {
    "fixed": "{parameter: number}: hold a parameter at a value instead of inferring it (no prior then;"
             " the same as the prior `{dist: fixed, value: v}`)",
    "particles": "number of posterior particles (default 2000; 4000 above 3 free parameters)",
    "moves": "MCMC rejuvenation moves per resampling (default 4)",
}

GP_MODEL_ID = "gaussian_process"
GP_DOC = ("nonparametric: response mean = link(f(x)), f ~ GP with a scaled RBF kernel on the unit-scaled"
          " stimulus space (log scale for `log: true` parameters)")
GP_SETTINGS = {
    "link": "exp (poisson default) | logit (bernoulli/binomial default) | identity (gaussian default)",
    "hyper": "marginal (default: lengthscale x outputscale marginalised on a grid in the evidence) | fixed"
             " (one value each) | type2 (max over the grid: an over-confident evidence, for comparison)",
    "lengthscale": "RBF lengthscale on the unit-scaled space (a number fixes it; a prior: 4 equal-mass points;"
                   " default grid 0.1 / 0.2 / 0.4 / 0.8, 0.25 with hyper: fixed)",
    "outputscale": "kernel variance (a number fixes it; a prior: 3 equal-mass points; default grid 0.5 / 2 / 8,"
                   " 0.25 / 1 / 4 for identity; 2.0 or 1.0 with hyper: fixed)",
    "mean": "constant mean on the link scale (default: link of the running mean response; or a prior)",
    "noise_sd": "gaussian responses: noise SD (default 1.0; or a prior: its median)",
    "quadrature": "Gauss-Hermite nodes for the evidence (default 32)",
    "design_nodes": "quadrature nodes of the predictive used by designs (default 12)",
}

@dataclass(frozen=True)
class PriorEntry:
    """One prior distribution of the protocol schema and its argument names."""

    dist: str
    arguments: tuple[str, ...]


@dataclass(frozen=True)
class ModelEntry:
    """One model id a protocol can name under `builtin:`, with the names of its inputs and parameters."""

    id: str
    doc: str
    variables: tuple[str, ...]
    parameters: tuple[str, ...]
    notes: dict[str, str]
    source: str = "builtin"


def _source(info: Any) -> str:
    """Where a model comes from, as `cloop models` shows it: builtin, registered or the entry-point group."""
    from orchestrator.models import ENTRY_POINT_GROUP

    return f"entry point {ENTRY_POINT_GROUP}" if info.source.startswith("entry point") else info.source


def models() -> list[ModelEntry]:
    """Builtin models (by id), then registered and `cloop.models` entry-point models; the GP candidate
    among the builtins. Names and meanings come from `orchestrator.models.builtin_catalogue()`."""
    from orchestrator.models import builtin_catalogue

    found = [ModelEntry(m.id, m.formula, tuple(v.name for v in m.variables), tuple(p.name for p in m.parameters),
                        {i.name: i.meaning for i in (*m.variables, *m.parameters) if i.meaning}, _source(m))
             for m in builtin_catalogue()]
    found.append(ModelEntry(GP_MODEL_ID, GP_DOC, (), (), dict(GP_SETTINGS)))
    return sorted(found, key=lambda e: (e.source != "builtin", e.id))


def _describe(name: str, meaning: str, unit: str = "", axis: str = "") -> str:
    """`- `name`: meaning (unit; log axis)` — the unit and a log axis only when there is one."""
    extras = [u for u in (unit, "log axis" if axis == "log" else "") if u]
    return f"- `{name}`" + (f": {meaning}" if meaning else "") + (f" ({'; '.join(extras)})" if extras else "")


def priors() -> list[PriorEntry]:
    """Prior distributions of the protocol schema with their argument names, in schema order."""
    from orchestrator.protocol import Prior

    union = typing.get_args(Prior)[0]
    found = []
    for cls in typing.get_args(union):
        (dist,) = typing.get_args(cls.model_fields["dist"].annotation)
        found.append(PriorEntry(dist, tuple(name for name in cls.model_fields if name != "dist")))
    return found


def plugins() -> dict[str, list[tuple[str, str]]]:
    """Installed entry points per cloop group: [(name, module:object), ...]."""
    return {group: sorted((ep.name, ep.value) for ep in entry_points(group=group)) for group in ENTRY_POINT_GROUPS}


def render_models() -> str:
    """Markdown for `cloop models`: builtin and plug-in models, model settings, priors."""
    from orchestrator.models import builtin_catalogue
    from orchestrator.models.candidate import NOISE_PARAM
    from orchestrator.models.formula import CONSTANTS, FUNCTIONS

    lines = ["### Models", ""]
    entries: list[Any] = sorted(builtin_catalogue(), key=lambda m: (m.source != "builtin", m.id))
    gp_at = next((i for i, m in enumerate(entries) if m.source != "builtin" or m.id > GP_MODEL_ID), len(entries))
    entries.insert(gp_at, None)  # the GP candidate, in id order among the builtins
    for entry in entries:
        if entry is None:
            lines += [f"#### `{GP_MODEL_ID}`", "", GP_DOC, "", "Settings (`models[i].settings`):", ""]
            lines += [f"- `{k}`: {v}" for k, v in GP_SETTINGS.items()]
            lines.append("")
            continue
        source = _source(entry)
        lines.append(f"#### `{entry.id}`" + ("" if source == "builtin" else f" ({source})"))
        lines += ["", entry.formula, ""]
        for label, infos in (("Inputs", entry.variables), ("Parameters", entry.parameters)):
            lines += [f"{label}:", ""]
            lines += [_describe(i.name, i.meaning, i.unit, getattr(i, "axis", "")) for i in infos]
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


def _default(value: Any) -> str:
    if value is None:
        return ""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f" (default {text})"


def render_designs(include_plugins: bool = True) -> str:
    """Markdown for `cloop designs`: strategies with aliases and settings, then installed plug-ins."""
    from orchestrator.design import catalogue as design_catalogue

    lines = ["### Design strategies", ""]
    for entry in design_catalogue():
        aliases = f" (aliases: {', '.join(f'`{a}`' for a in entry.aliases)})" if entry.aliases else ""
        lines += [f"#### `{entry.name}`{aliases}", "", entry.summary, ""]
        if entry.settings:
            lines += ["Settings (`design.settings`):", ""]
            lines += [f"- `{s.name}`: {s.meaning}{_default(s.default)}" for s in entry.settings]
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
