"""Where the files shipped beside the code live: the Alembic migrations and the example protocols.

The repository keeps ``alembic/`` and ``protocols/`` at its top level; a wheel carries copies of
both inside the package (``orchestrator/_resources/``, mapped at build time by ``setup.py``).
These lookups try the installed copy first and the source checkout second, so an editable
install, a wheel and a plain checkout all find the same files.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "_resources"
CHECKOUT = Path(__file__).resolve().parent.parent


class ResourceNotFound(FileNotFoundError):
    """A shipped file is missing: the install is incomplete (neither a wheel nor a checkout)."""


def _first_existing(relative: str) -> Path:
    for root in (PACKAGED, CHECKOUT):
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise ResourceNotFound(f"cannot find {relative} in {PACKAGED} or {CHECKOUT}; reinstall cloop")


def alembic_dir() -> Path:
    """The Alembic script directory (the one holding ``env.py`` and ``versions/``)."""
    return _first_existing("alembic/env.py").parent


def bundled_protocol(name: str) -> Path:
    """An example protocol by file name, e.g. ``bundled_protocol("retention.yaml")``."""
    return _first_existing(f"protocols/{name}")
