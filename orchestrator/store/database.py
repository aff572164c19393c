"""Database URLs, engines and the Alembic schema lifecycle.

The schema is made and upgraded only by Alembic (`upgrade(url)` / ``cloop db upgrade``); opening a
store checks the revision instead of silently creating tables.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from orchestrator.store.errors import StoreError
from orchestrator.store.values import json_dumps

DEFAULT_URL = "sqlite:///./cloop.db"


def _postgres_driver_missing() -> StoreError:
    return StoreError("PostgreSQL needs the psycopg driver: pip install 'cloop[postgres]'")


def normalize_url(url: str) -> str:
    """Pick an installed PostgreSQL driver for bare ``postgresql://`` URLs (psycopg 3 here)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                return "postgresql+psycopg://" + url[len(prefix):]
            return "postgresql://" + url[len(prefix):]
    return url


def resolve_url(db: str | None = None) -> str:
    """The database URL: ``--db`` if given, else ``$CLOOP_DB``, else ``sqlite:///./cloop.db``."""
    url = db or os.environ.get("CLOOP_DB") or DEFAULT_URL
    url = normalize_url(url.strip())
    try:
        make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"invalid database URL {url!r}: {exc}") from None
    return url


def display_url(url: str) -> str:
    """The URL with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def is_sqlite(url: str) -> bool:
    """True for SQLite URLs (file or memory)."""
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for in-memory databases and other backends."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    database = u.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        return None
    if database.startswith("file:"):
        database = database[5:].split("?", 1)[0]
    return Path(database)


def make_engine(url: str) -> Engine:
    """Create an Engine; SQLite connections get WAL, foreign keys and a busy timeout."""
    url = normalize_url(url)
    try:
        engine = create_engine(url, json_serializer=json_dumps, future=True)
    except ModuleNotFoundError as exc:
        if make_url(url).get_backend_name() == "postgresql":
            raise _postgres_driver_missing() from None
        raise StoreError(f"no driver for {display_url(url)}: {exc}") from None
    if is_sqlite(url):
        file_backed = sqlite_path(url) is not None

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:  # pragma: no branch
            cur = dbapi_conn.cursor()
            if file_backed:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    return engine


def alembic_dir() -> Path:
    """The Alembic script directory, from a wheel or a source checkout."""
    from orchestrator.resources import alembic_dir as shipped_alembic_dir

    return shipped_alembic_dir()


def alembic_config(url: str, connection: Any = None) -> Any:
    """An Alembic Config built in code (no alembic.ini): script location + URL/connection."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(alembic_dir()))
    cfg.attributes["url"] = normalize_url(url)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    """The newest migration id in ``alembic/versions``."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(DEFAULT_URL)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is stamped with (None if it has no alembic_version)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(url: str, revision: str = "head") -> str | None:
    """Create or upgrade the schema with Alembic (the only way the schema is made).

    Returns the revision the database is at afterwards.
    """
    from alembic import command

    url = resolve_url(url)
    path = sqlite_path(url)
    if path is not None and not path.parent.exists():
        raise StoreError(f"cannot create database {path}: directory {path.parent} does not exist")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(url, conn), revision)
        return current_revision(engine)
    except OperationalError as exc:
        raise StoreError(f"cannot open database {display_url(url)}: {exc.orig}") from None
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    """Alembic downgrade (used by migration tests)."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(url, conn), revision)
    finally:
        engine.dispose()
