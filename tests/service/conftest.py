"""Service fixtures: PostgreSQL schemas of their own, since live servers commit real rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from monitor.store import make_engine, upgrade


@contextmanager
def private_schema(postgres_schema_url: str) -> Iterator[str]:
    """An empty schema beside the session's one (so committed rows never meet the rolled-back
    store tests), dropped with everything in it at the end."""
    schema = f"apmon_svc_{uuid.uuid4().hex[:12]}"
    base = make_url(postgres_schema_url)
    admin_url = base.difference_update_query(["options"]).render_as_string(hide_password=False)
    admin = make_engine(admin_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{admin_url}{'&' if '?' in admin_url else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def service_pg_url(postgres_schema_url: str) -> Iterator[str]:
    """A private PostgreSQL schema migrated to head."""
    with private_schema(postgres_schema_url) as url:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture()
def empty_pg_url(postgres_schema_url: str) -> Iterator[str]:
    """A private, empty PostgreSQL schema (nothing migrated)."""
    with private_schema(postgres_schema_url) as url:
        yield url
