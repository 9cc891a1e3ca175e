"""Service fixtures: a PostgreSQL schema of its own, since live servers commit real rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from monitor.store import make_engine, upgrade


@pytest.fixture(scope="module")
def service_pg_url(postgres_schema_url: str) -> Iterator[str]:
    """A migrated schema beside the session's one (so committed rows never meet the rolled-back
    store tests), dropped with everything in it when the module ends."""
    schema = f"apmon_svc_{uuid.uuid4().hex[:12]}"
    base = make_url(postgres_schema_url)
    admin_url = base.difference_update_query(["options"]).render_as_string(hide_password=False)
    admin = make_engine(admin_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{admin_url}{'&' if '?' in admin_url else '?'}options=-csearch_path%3D{schema}"
    try:
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
