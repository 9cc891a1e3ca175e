"""Shared fixtures: real SQLite files, a real PostgreSQL schema that is dropped at the end,
and stores whose every test runs inside a rolled-back transaction."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import Engine, text

from monitor.store import SqlStore, make_engine, upgrade

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

PG_ADMIN_URL = os.environ.get(
    "APMON_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_available() -> bool:
    try:
        engine = make_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def postgres_schema_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL schema for this test session; dropped (with everything in it)
    at the end, so a test run leaves no tables or rows behind."""
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but not reachable at {PG_ADMIN_URL}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}")
    schema = f"apmon_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(PG_ADMIN_URL)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in PG_ADMIN_URL else "?"
    try:
        yield f"{PG_ADMIN_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture()
def sqlite_url(tmp_path: Path) -> str:
    """URL of a new SQLite file."""
    return f"sqlite:///{tmp_path / 'apmon.db'}"


@pytest.fixture(scope="session")
def migrated_postgres(postgres_schema_url: str) -> Iterator[Engine]:
    """An engine on the session's PostgreSQL schema, migrated to head."""
    engine = make_engine(postgres_schema_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated engine, once for SQLite and once for PostgreSQL."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'apmon.db'}")
        upgrade(engine)
        yield engine
        engine.dispose()
    else:
        yield request.getfixturevalue("migrated_postgres")


@pytest.fixture()
def store(db_engine: Engine) -> Iterator[SqlStore]:
    """A store whose writes are rolled back after the test (SQLAlchemy 2's recipe for joining a
    session into an external transaction)."""
    connection = db_engine.connect()
    transaction = connection.begin()
    try:
        yield SqlStore(connection)
    finally:
        transaction.rollback()
        connection.close()


@pytest.fixture(scope="session")
def benchmark_script() -> Callable[[str], ModuleType]:
    """Loads a script of ``benchmarks/`` (no package) by its path there, as a module.

    The module is registered under its file's stem: dataclasses and pickle look it up there,
    and a sibling script that imports it by that name gets the same module.
    """

    def load(relative: str) -> ModuleType:
        path = BENCHMARKS / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module

    return load
