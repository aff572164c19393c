"""Protocol files: loading and validating `protocols/*.yaml`, every problem with its line, in one pass.

A protocol is the experimenter's whole contract with cloop: what may be shown (stimulus space and its
hard safety limits), what comes back (response kind), which hypotheses compete (encoding models with
priors), how stimuli are chosen (design), when to stop, and what the rig must provide. Everything that
is wrong with a file is reported at once, one line per problem, as ``FILE:LINE: field.path: message``.

The schema itself lives in orchestrator.protocol_schema, one module per section (stimulus, response,
models, the whole document); every schema name is importable from here too, which is how the rest of
cloop reads it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence

import yaml
from pydantic import TypeAdapter, ValidationError

from orchestrator.protocol_schema.base import NAME_PATTERN  # noqa: F401 - the schema, read from here
from orchestrator.protocol_schema.stimulus import (  # noqa: F401 - the schema, read from here
    ContinuousParameter, IntegerParameter, CategoricalParameter, StimulusParameter, StimulusSpace,
    IMAGE_SAFETY_LIMITS, IMAGE_REF, ImageStimulusSpace, AnyStimulusSpace,
)
from orchestrator.protocol_schema.response import (  # noqa: F401 - the schema, read from here
    InvalidResponse, DEFAULT_RESPONSE_RANGE, ResponseSpec, PopulationResponseSpec, AnyResponseSpec,
)
from orchestrator.protocol_schema.models import (  # noqa: F401 - the schema, read from here
    UniformPrior, NormalPrior, LogNormalPrior, BetaPrior, GammaPrior, HalfNormalPrior, TruncNormalPrior, FixedPrior,
    Prior, PRIOR_EXAMPLES, ReadoutPrior, ReadoutSpec, ModelSpec,
)
from orchestrator.protocol_schema.document import (  # noqa: F401 - the schema, read from here
    DesignSpec, StoppingSpec, RigSpec, NumericLimit, CategoricalLimit, SafetyViolation, Protocol,
)

__all__ = [
    "Protocol", "LoadedProtocol", "Problem", "ProtocolError", "SafetyViolation", "InvalidResponse",
    "PopulationResponseSpec", "ImageStimulusSpace", "load_protocol", "parse_protocol_text",
]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a protocol file, located by field path and line."""

    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.path or '<root>'}: {self.message}"


class ProtocolError(ValueError):
    """A protocol file that cannot be used; `problems` holds every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class LoadedProtocol:
    """A validated protocol together with its exact text (stored verbatim) and content hash."""

    protocol: Protocol
    text: str
    sha256: str
    source: str


#: A semantic check owned by another module (model formulas, stimulus types, design capabilities):
#: takes the protocol (validated, or partly validated: see _partial_protocol) and returns
#: (field path, message) pairs. Each declares the top-level fields it reads in `NEEDS`.
Checker = Callable[[Any], list[tuple[str, str]]]

#: The text sizes a protocol file may have; a protocol is a page of YAML, not a data set.
MAX_PROTOCOL_BYTES = 1_000_000


def load_protocol(path: str | Path, checks: Sequence[Checker] = ()) -> LoadedProtocol:
    """Read and validate a protocol file; raise ProtocolError listing every problem (see parse_protocol_text)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProtocolError([Problem(str(path), None, "", f"cannot read file: {exc}")]) from exc
    return parse_protocol_text(text, source=str(path), checks=checks)


def parse_protocol_text(text: str, source: str = "<string>", checks: Sequence[Checker] = ()) -> LoadedProtocol:
    """Validate protocol YAML text; raise ProtocolError listing every problem with its line, in one pass.

    `checks` are the semantic checks to run beside the schema; this module knows none of them, so
    it imports neither torch nor the modules that own them. The orchestrator passes its own
    (`orchestrator.protocol_checks.parse_checked` / `load_checked`: models, stimulus types, design
    limits); a rig passes none: it parses the text the orchestrator already validated. The YAML is
    parsed once; anchors and aliases are refused before anything is expanded.
    """
    node, data, problems = _compose(text, source)
    if node is None:
        raise ProtocolError(problems)
    lines: dict[tuple[str, ...], int] = {}
    _index_lines(node, (), lines, problems, source)
    if not isinstance(data, dict):
        raise ProtocolError(problems + [Problem(source, lines.get((), 1), "", "top level must be a mapping of protocol fields")])
    protocol: Protocol | None = None
    try:
        protocol = Protocol.model_validate(data)
        valid_fields = set(Protocol.model_fields)
    except ValidationError as exc:
        problems.extend(_problems_from_validation(exc, lines, source))
        partial, valid_fields = _partial_protocol(data)
    target = protocol if protocol is not None else partial
    found: list[tuple[str, str]] = []
    for check in checks:
        needs = set(getattr(check, "NEEDS", Protocol.model_fields))
        if needs <= valid_fields:
            found.extend(check(target))
        elif needs - valid_fields == {"models"} and "models" in data:
            found.extend(_check_each_model(check, target, data["models"]))
    problems.extend(Problem(source, _line_for(tuple(path.split(".")), lines), path, message) for path, message in found)
    problems.sort(key=lambda problem: problem.line or 0)  # file order, whichever stage found it
    if problems or protocol is None:
        raise ProtocolError(problems)
    return LoadedProtocol(protocol, text, hashlib.sha256(text.encode("utf-8")).hexdigest(), source)


class _NoAnchorsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases as it meets them (before any expansion)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AnchorRefused(event.start_mark)
        return super().compose_node(parent, index)


class _AnchorRefused(Exception):
    def __init__(self, mark: Any) -> None:
        self.mark = mark


def _compose(text: str, source: str) -> tuple[Any, Any, list[Problem]]:
    """Parse the text once: (node tree, data, []) or (None, None, [the problem]).

    Refused: syntax errors, anchors/aliases (an alias bomb expands a few hundred bytes into
    gigabytes), empty files and files larger than a protocol can need.
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_PROTOCOL_BYTES:
        return None, None, [Problem(source, None, "", f"file is larger than {MAX_PROTOCOL_BYTES:,} bytes; "
                                                      "a protocol is a page of YAML")]
    loader = _NoAnchorsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None, [Problem(source, 1, "", "file is empty")]
        return node, loader.construct_document(node), []
    except _AnchorRefused as refused:
        return None, None, [Problem(source, refused.mark.line + 1, "",
                                    "YAML anchors (&name) and aliases (*name) are not allowed in a protocol; "
                                    "write each value out")]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        message = getattr(exc, "problem", None) or str(exc)
        return None, None, [Problem(source, line, "", f"YAML syntax error: {message}")]
    finally:
        loader.dispose()


def _check_each_model(check: Checker, partial: Protocol, models: Any) -> list[tuple[str, str]]:
    """Run a model check on each model that validates alone (the list as a whole did not)."""
    found: list[tuple[str, str]] = []
    for i, raw in enumerate(models if isinstance(models, list) else []):
        try:
            model = ModelSpec.model_validate(raw)
        except ValidationError:
            continue
        for path, message in check(partial.model_copy(update={"models": [model]})):
            if path == "models.0" or path.startswith("models.0."):
                path = f"models.{i}" + path[len("models.0"):]
            found.append((path, message))
    return found


def _partial_protocol(data: dict[str, Any]) -> tuple[Protocol, set[str]]:
    """The top-level fields that validate on their own, so semantic checks can run on them too."""
    valid: dict[str, Any] = {}
    for name, field in Protocol.model_fields.items():
        adapter = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
        if name not in data:
            if not field.is_required():
                valid[name] = field.get_default(call_default_factory=True)
            continue
        value = data[name]
        if name == "version" and isinstance(value, (int, float)):
            value = str(value)
        try:
            valid[name] = adapter.validate_python(value)
        except ValidationError:
            continue
    return Protocol.model_construct(**valid), set(valid)


def _index_lines(
    node: yaml.Node, path: tuple[str, ...], lines: dict[tuple[str, ...], int], problems: list[Problem], source: str
) -> None:
    """Record the 1-based line of every field path; report duplicate keys (YAML silently keeps the last)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in seen:
                problems.append(
                    Problem(source, key_node.start_mark.line + 1, ".".join(path + (key,)), "duplicate key")
                )
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _index_lines(value_node, path + (key,), lines, problems, source)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_lines(item, path + (str(i),), lines, problems, source)


def _line_for(path: tuple[str, ...], lines: dict[tuple[str, ...], int]) -> int | None:
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())


_UNION_TAGS = {"continuous", "integer", "categorical", "NumericLimit", "CategoricalLimit"} | {
    "uniform", "normal", "lognormal", "beta", "gamma", "halfnormal", "truncnormal",
}
_UNION_TAGS |= {"scalar", "image", "population"}  # tags of the stimulus/response unions


def _problems_from_validation(exc: ValidationError, lines: dict[tuple[str, ...], int], source: str) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"] if str(part) not in _UNION_TAGS)
        message = error["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        if error["type"] == "extra_forbidden":
            message = "unknown field (check spelling)"
        elif error["type"] == "union_tag_invalid":
            ctx = error.get("ctx", {})
            message = (
                f"unknown {ctx.get('discriminator', 'kind').strip(chr(39))} {ctx.get('tag')!r}; "
                f"expected one of {ctx.get('expected_tags')}"
            )
        if loc == () and ": " in message:
            # Cross-field checks from Protocol._cross_checks carry their own field paths.
            for part in message.split("; "):
                field, _, text = part.partition(": ")
                problems.append(Problem(source, _line_for(tuple(field.split(".")), lines), field, text))
            continue
        key = (".".join(loc), message)
        if key in seen:
            continue
        seen.add(key)
        problems.append(Problem(source, _line_for(loc, lines), ".".join(loc), message))
    return problems
