"""Alembic migrations: empty database -> head on SQLite and PostgreSQL, and the ORM matches them."""
from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from orchestrator import store as st
from store_factory import REPO, postgres_database

TABLES = {"subjects", "protocols", "sessions", "rigs", "trials", "trial_attempts", "model_states", "session_leases",
          "population_responses"}
HEAD = "0003"


def _check_empty_to_head(url: str) -> None:
    assert st.upgrade(url) == st.head_revision() == HEAD
    engine = st.make_engine(url)
    try:
        names = set(inspect(engine).get_table_names())
        assert TABLES <= names and "alembic_version" in names
        trial_cols = {c["name"] for c in inspect(engine).get_columns("trials")}
        assert {"index", "status", "stimulus", "response", "value", "attempts", "error", "planned_at",
                "dispatched_at", "presented_at", "responded_at", "recorded_at", "rig_id", "timing"} <= trial_cols
        # The schema the migrations build is exactly what the ORM declares (no drift).
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), st.Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
    # Running it again is a no-op; downgrade to base removes everything; and back up works.
    assert st.upgrade(url) == HEAD
    st.downgrade(url, "base")
    engine = st.make_engine(url)
    try:
        assert not (TABLES & set(inspect(engine).get_table_names()))
        assert st.current_revision(engine) is None
    finally:
        engine.dispose()
    assert st.upgrade(url) == HEAD
    with st.TrialStore(url) as store:
        assert store.sessions() == []


def test_sqlite_empty_to_head(tmp_path: Path) -> None:
    _check_empty_to_head(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
def test_postgres_empty_to_head() -> None:
    with postgres_database() as url:
        _check_empty_to_head(url)


def test_sqlite_connections_use_wal_and_foreign_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    st.upgrade(url)
    engine = st.make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


def test_store_refuses_database_not_at_head(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(st.SchemaError, match="no database at .*cloop db upgrade"):
        st.TrialStore(f"sqlite:///{missing}")
    assert not missing.exists()  # opening never creates a database
    empty = tmp_path / "empty.db"
    engine = st.make_engine(f"sqlite:///{empty}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE unrelated (x INTEGER)"))
    engine.dispose()
    with pytest.raises(st.SchemaError, match="has no cloop schema, expected " + HEAD):
        st.TrialStore(f"sqlite:///{empty}")
    with st.TrialStore(f"sqlite:///{empty}", auto_upgrade=True) as store:
        assert store.sessions() == []


def test_upgrade_into_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(st.StoreError, match="directory .*nope does not exist"):
        st.upgrade(f"sqlite:///{tmp_path / 'nope' / 'x.db'}")


def test_alembic_is_configured_in_code_without_ini() -> None:
    assert st.alembic_dir() == REPO / "alembic"
    assert not (REPO / "alembic.ini").exists()
    versions = sorted(p.name for p in (REPO / "alembic" / "versions").glob("*.py"))
    assert versions == ["0001_initial_schema.py", "0002_session_leases.py", "0003_population_responses.py"]
    # Migrations must not import application code (they have to keep working as the ORM evolves).
    for name in versions:
        assert "orchestrator" not in (REPO / "alembic" / "versions" / name).read_text().split('"""', 2)[2]
