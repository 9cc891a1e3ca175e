"""Migrations: one head, migrated schema == models (SQLite and PostgreSQL), stale schema refused."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from monitor.store import SchemaOutOfDate, make_engine, open_store, require_current_schema
from monitor.store.migrate import HEAD_REVISION, current_revision, head_revision
from monitor.store.models import Base


def test_one_head_and_the_code_names_it() -> None:
    head = head_revision()
    assert len(head) == 4 and head.isdigit() and head >= "0002"
    assert head == HEAD_REVISION  # a new migration: name it in monitor/store/migrate.py


def test_the_revision_read_without_alembic_is_alembics(sqlite_url: str) -> None:
    from monitor.store import upgrade

    engine = make_engine(sqlite_url)
    revisions = []
    for target in (None, "0001", "head"):
        if target is not None:
            upgrade(engine, target)
        with engine.connect() as connection:
            alembic_says = MigrationContext.configure(connection).get_current_revision()
        assert current_revision(engine) == alembic_says
        revisions.append(alembic_says)
    assert revisions == [None, "0001", HEAD_REVISION]


def test_0002_keeps_received_batches_and_adds_digest_and_error(sqlite_url: str) -> None:
    from monitor.store import upgrade

    engine = make_engine(sqlite_url)
    upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.exec_driver_sql("INSERT INTO projects (id, name, created_at) VALUES (1, 'p', 0)")
        connection.exec_driver_sql(
            "INSERT INTO runs (id, project_id, name, status, config, created_at, processed_step)"
            " VALUES ('r', 1, '', 'running', '{}', 0, -1)"
        )
        connection.exec_driver_sql(
            "INSERT INTO ingest_batches (run_id, stream, seq, received_at, processed)"
            " VALUES ('r', 'main', 0, 0, 1)"
        )
    upgrade(engine, "0002")
    with engine.connect() as connection:
        rows = connection.exec_driver_sql(
            "SELECT run_id, seq, digest, error FROM ingest_batches"
        ).all()
    assert [tuple(r) for r in rows] == [("r", 0, None, None)]
    from alembic import command

    from monitor.store.migrate import alembic_config

    config = alembic_config(sqlite_url)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    assert "digest" not in {c["name"] for c in inspect(engine).get_columns("ingest_batches")}


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
