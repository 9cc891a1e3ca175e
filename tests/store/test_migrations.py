"""Migrations: one head, migrated schema == models (SQLite and PostgreSQL), stale schema refused."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from monitor.store import SchemaOutOfDate, make_engine, open_store, require_current_schema
from monitor.store.migrate import current_revision, head_revision
from monitor.store.models import Base


def test_one_head() -> None:
    assert head_revision() == "0003"


def test_migrated_database_matches_models(db_engine: Engine) -> None:
    with db_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"schema drift between migrations and models: {diff}"
    tables = set(inspect(db_engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert current_revision(db_engine) == head_revision()


def test_empty_database_is_refused_with_the_fixing_command(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with pytest.raises(SchemaOutOfDate) as caught:
        require_current_schema(engine)
    assert "apmon db upgrade" in str(caught.value)
    assert "empty database" in str(caught.value)
    with pytest.raises(SchemaOutOfDate):
        open_store(sqlite_url)


def test_schema_behind_head_is_refused(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    from monitor.store import upgrade

    upgrade(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = 'older'")
    with pytest.raises(SchemaOutOfDate, match="revision older"):
        require_current_schema(engine)


def test_embedded_auto_upgrade_only_touches_a_new_database(sqlite_url: str) -> None:
    store = open_store(sqlite_url, auto_upgrade=True)
    assert store.runs() == []
    engine = make_engine(sqlite_url)
    assert current_revision(engine) == head_revision()
