"""Protocols for test fixtures, derived from protocols/retention.yaml so they follow the real file.

    retention_text()                                            # the example protocol, as YAML
    retention_text({"design.strategy": "random", "stopping.model_probability": None}, name="lifecycle")
    retention_minimal_text()                                    # stimulus space, response, models only

Changes are dotted paths into the protocol (list items by index: ``"models.1.builtin"``); a value
of None removes the field, so the schema's default applies. The YAML keeps the layout of the
repository's protocol files (flow style for flat mappings, indented lists), so a test may still
edit one line of it as text.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

REPO = Path(__file__).resolve().parent.parent
RETENTION_PATH = REPO / "protocols" / "retention.yaml"


class _Dumper(yaml.SafeDumper):
    """Indents list items under their key, like the protocol files do."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:  # noqa: ARG002
        return super().increase_indent(flow, False)


class _FlowMap(dict):
    pass


class _FlowList(list):
    pass


_Dumper.add_representer(_FlowMap, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=True))
_Dumper.add_representer(_FlowList, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _layout(node: Any, depth: int = 0) -> Any:
    """Top-level sections in block style; flat mappings below them and lists of scalars in flow style."""
    flat = lambda values: all(not isinstance(v, (dict, list)) for v in values)  # noqa: E731
    if isinstance(node, dict):
        items = {k: _layout(v, depth + 1) for k, v in node.items()}
        return _FlowMap(items) if depth >= 2 and flat(node.values()) else items
    if isinstance(node, list):
        items = [_layout(v, depth + 1) for v in node]
        return _FlowList(items) if flat(node) else items
    return node


def _set(node: Any, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        if value is None:
            del node[int(last)]
        else:
            node[int(last)] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value


def retention_protocol(changes: Mapping[str, Any] | None = None, **top_level: Any) -> dict[str, Any]:
    """protocols/retention.yaml as a mapping, with `changes` (dotted paths) and top-level fields applied."""
    data = copy.deepcopy(yaml.safe_load(RETENTION_PATH.read_text(encoding="utf-8")))
    data["description"] = data["description"].strip()
    for path, value in {**top_level, **dict(changes or {})}.items():
        _set(data, path, value)
    return data


def protocol_text(data: Mapping[str, Any]) -> str:
    """A protocol mapping as YAML in the layout of the repository's protocol files."""
    return yaml.dump(_layout(dict(data)), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def retention_text(changes: Mapping[str, Any] | None = None, **top_level: Any) -> str:
    """`retention_protocol(...)` as protocol YAML text."""
    return protocol_text(retention_protocol(changes, **top_level))


def write_protocol(directory: Path, text: str, name: str = "protocol.yaml") -> Path:
    """Write protocol text to ``directory/name`` and return the path."""
    path = Path(directory) / name
    path.write_text(text, encoding="utf-8")
    return path


#: What unit tests of models, inference and design leave out: everything but the stimulus space,
#: the response and the two models (defaults apply; prior model probabilities become uniform).
MINIMAL = {"description": None, "stimulus.parameters.lag.units": None, "response.timeout_s": None,
           "models.0.prior_probability": None, "models.1.prior_probability": None,
           "design": None, "stopping": None, "rig": None, "safety": None}


def retention_minimal_text(changes: Mapping[str, Any] | None = None, **top_level: Any) -> str:
    """The retention stimulus space, response and models only (named "r"), with `changes` applied."""
    return retention_text({**MINIMAL, **dict(changes or {})}, **{"name": "r", "version": "1", **top_level})
