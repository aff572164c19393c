"""Checks of a session's options before anything is written: bind address, keys, design, subject.

A session row is a promise ("this session ran, or can be resumed"). Every option that can be
checked without running the session is checked here first, so a typo'd flag costs one line naming
the flag and exit code 2, never a junk session row or a traceback. Each check raises
:class:`OptionError`, whose message starts with the flag or field at fault.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

__all__ = ["OptionError", "check_endpoint", "check_bind", "check_keys", "check_design", "check_subject", "check_truth",
           "check_session_options", "MAX_NAME_LENGTH"]

#: Subject names are stored in a String(200) column (PostgreSQL refuses longer ones with a DataError).
MAX_NAME_LENGTH = 200
_TCP_RE = re.compile(r"^tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(?P<port>\*|\d+)$")


class OptionError(ValueError):
    """An option the session cannot run with; the message names the flag, e.g. ``--bind: ...``."""


def check_endpoint(bind: str, flag: str = "--bind") -> None:
    """Refuse an endpoint that is not tcp://HOST:PORT (or ipc://PATH)."""
    if not bind.startswith(("tcp://", "ipc://")):
        raise OptionError(f"{flag}: {bind!r} is not an endpoint; use tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555)")
    if bind.startswith("tcp://"):
        match = _TCP_RE.match(bind)
        if match is None:
            raise OptionError(f"{flag}: {bind!r} is not tcp://HOST:PORT (PORT a number or '*')")
        port = match.group("port")
        if port != "*" and not 0 <= int(port) <= 65535:
            raise OptionError(f"{flag}: port {port} is outside 0..65535")


def check_bind(bind: str, flag: str = "--bind") -> None:
    """Refuse a malformed endpoint, and one whose address is taken (found by binding it briefly)."""
    check_endpoint(bind, flag)
    import zmq

    context = zmq.Context()  # its own: term() returns only once the probe's listener is closed again
    probe = context.socket(zmq.ROUTER)
    try:
        probe.setsockopt(zmq.LINGER, 0)
        probe.bind(bind if not bind.endswith(":0") else bind[:-2] + ":*")
    except zmq.ZMQError as exc:
        hint = " (is another orchestrator running there? give another --bind)" if exc.errno == zmq.EADDRINUSE else ""
        raise OptionError(f"{flag}: cannot bind {bind}: {exc.strerror}{hint}") from None
    finally:
        probe.close(0)
        context.term()


def check_keys(keys_dir: Path | str | None, flag: str = "--keys") -> None:
    """Load the orchestrator's key pair and the rigs' allow-list as the rig server will, and try them."""
    if keys_dir is None:
        return
    import zmq

    from orchestrator import keys as keyfiles

    folder = Path(keys_dir)
    if not folder.is_dir():
        raise OptionError(f"{flag}: {folder} is not a directory (create one with `cloop keys generate`)")
    try:
        pair = keyfiles.orchestrator_pair(folder)
        allowed = keyfiles.allowed_keys(folder)
    except (keyfiles.SecurityError, ValueError, OSError) as exc:
        raise OptionError(f"{flag}: {exc}") from None
    context = zmq.Context()
    probe = context.socket(zmq.ROUTER)
    try:
        for what, key in [("secret key in orchestrator.key_secret", pair.secret),
                          ("public key in orchestrator.key_secret", pair.public),
                          *((f"public key in rigs/{name}.key", public) for public, name in allowed.items())]:
            try:
                probe.curve_secretkey = key  # libzmq checks the z85 text of any Curve key here
            except (zmq.ZMQError, TypeError, ValueError):
                raise OptionError(f"{flag}: the {what} is not a valid Curve key (40 z85 characters); "
                                  "regenerate it with `cloop keys generate`") from None
    finally:
        probe.close(0)
        context.term()


def check_design(protocol: Any, design: str | None, flag: str = "--design") -> None:
    """Refuse an unknown design strategy (the list of known ones is in the message)."""
    if design is None:
        return
    from orchestrator.design import STRATEGIES

    if design not in STRATEGIES:
        raise OptionError(f"{flag}: unknown strategy {design!r}; known: {', '.join(sorted(STRATEGIES))}")
    from orchestrator.design import kind_mismatch, make_design

    if (mismatch := kind_mismatch(protocol, design)) is not None:
        raise OptionError(f"{flag}: {mismatch}")

    try:
        make_design(protocol, 0, design)
    except Exception as exc:  # noqa: BLE001 - any construction problem is a refusal of this option
        raise OptionError(f"{flag}: {design!r} cannot run this protocol: {exc}") from None


def check_subject(subject: str, flag: str = "--subject") -> None:
    """A subject id is a short label: non-empty, printable, at most MAX_NAME_LENGTH characters."""
    if not subject.strip():
        raise OptionError(f"{flag}: must not be empty")
    if len(subject) > MAX_NAME_LENGTH:
        raise OptionError(f"{flag}: {len(subject)} characters; at most {MAX_NAME_LENGTH} are stored")
    if not subject.isprintable():
        raise OptionError(f"{flag}: must be printable text (no control characters)")


def check_truth(protocol: Any, truth: str, flag: str = "--truth") -> None:
    """The simulated subject's truth must name a protocol model and its parameters."""
    from orchestrator.models import build_truth

    try:
        if getattr(protocol, "is_population", False):  # a seeded population answering from a feature model
            from orchestrator.neural.truth import parse_population_truth

            parse_population_truth(protocol, truth)
        else:
            build_truth(protocol, truth)
    except (ValueError, KeyError) as exc:
        message = str(exc).strip("'\"")
        if message.startswith("truth: "):
            message = message[len("truth: "):]
        raise OptionError(f"{flag}: {message}") from None


def check_session_options(protocol: Any, *, bind: str, keys_dir: Path | str | None, design: str | None,
                          subject: str) -> None:
    """Every check of `cloop run`'s options, cheapest first; raises OptionError on the first problem."""
    check_subject(subject)
    check_design(protocol, design)
    check_keys(keys_dir)
    check_bind(bind)
