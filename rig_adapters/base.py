"""What a rig adapter is, and how `cloop rig --adapter NAME` finds one.

An adapter turns one trial command into one presentation and one response. The worker calls it
from the process's main thread (PsychoPy windows must live there) while a background thread keeps
the network alive, so ``present`` may block for as long as the trial takes.

Discovery: entry points in the group ``cloop.adapters`` (``simulated = rig_adapters.simulated:SimulatedAdapter``),
or an import path ``package.module:ClassName`` for adapters that are not installed as plugins.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from orchestrator.messages import Trial

ENTRY_POINT_GROUP = "cloop.adapters"
RESPONSE_KINDS = ("bernoulli", "binomial", "poisson", "gaussian", "population")


class AdapterError(RuntimeError):
    """The adapter could not be found, configured, or could not present a trial.

    ``code`` is sent to the orchestrator in the worker's ``error`` reply (subclasses override it,
    e.g. ``aborted``); any other exception from ``present`` is reported as ``adapter_failed``.
    """

    code: str = "adapter_failed"


class StimulusRefused(AdapterError):
    """The command is outside the rig's own hard limits; nothing was delivered or shown."""

    code = "refused"


@dataclass(frozen=True)
class SessionInfo:
    """Given to :meth:`Adapter.start` when the orchestrator announces a (new) session."""

    session_id: str
    protocol_text: str
    rig_id: str


@dataclass(frozen=True)
class AdapterResult:
    """The subject's response (``{"value": ..., extras}``) and the rig's own times (epoch s).

    Conventional timing keys: ``presented_at`` (stimulus onset), ``responded_at``; add any others.
    """

    response: dict[str, Any]
    timing: dict[str, float | None]
    meta: dict[str, Any] = field(default_factory=dict)


class Adapter(abc.ABC):
    """One kind of rig hardware (or a simulated subject)."""

    #: Short name, used as the rig's adapter name in ``hello`` and matched against protocol capabilities.
    name: str = "adapter"
    #: True only if ``present`` returns within about a millisecond and may run on any thread: the
    #: worker then calls it from its network thread and saves two thread hops per trial.
    inline: bool = False

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Adapter":
        """Build from command-line ``key=value`` strings; override to convert types."""
        try:
            return cls(**options)  # type: ignore[call-arg]
        except TypeError as exc:
            raise AdapterError(f"adapter {cls.name!r} does not accept these options {sorted(options)}: {exc}") from None

    @abc.abstractmethod
    def capabilities(self) -> dict[str, list[str]]:
        """``{"stimulus_types": [...] or ["*"], "response_kinds": [...]}``."""

    @abc.abstractmethod
    def start(self, session: SessionInfo) -> None:
        """Prepare for a session (called again if the orchestrator announces a new one)."""

    @abc.abstractmethod
    def present(self, cmd: Trial) -> AdapterResult:
        """Present one trial and return the response; raise to report the trial as failed on this rig."""

    def idle(self) -> None:
        """Called on the main thread about every 0.2 s while no trial is waiting (e.g. to keep a
        window's event queue pumped so the OS does not mark it unresponsive). Default: nothing."""

    def close(self) -> None:
        """Release hardware; called once when the worker stops."""


def available_adapters() -> dict[str, str]:
    """Installed adapter names mapped to their ``module:Class`` targets."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_adapter_class(name: str) -> type[Adapter]:
    """Resolve an entry-point name, or a ``module:Class`` import path, to an :class:`Adapter` subclass."""
    target: Any
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise AdapterError(f"cannot import adapter {name!r}: {exc}") from None
    else:
        eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not eps:
            known = ", ".join(sorted(available_adapters())) or "none installed"
            raise AdapterError(f"unknown adapter {name!r} (known: {known}; or give module:Class)")
        try:
            target = eps[0].load()
        except Exception as exc:
            raise AdapterError(f"adapter {name!r} ({eps[0].value}) failed to import: {exc}") from None
    if not (isinstance(target, type) and issubclass(target, Adapter)):
        raise AdapterError(f"{name!r} resolves to {target!r}, which is not an Adapter subclass")
    return target


def build_adapter(name: str, options: dict[str, str]) -> Adapter:
    """Find the adapter class and construct it from string options."""
    return load_adapter_class(name).from_options(options)
