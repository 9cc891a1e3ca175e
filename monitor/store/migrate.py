"""Alembic migrations configured in code: upgrade, revisions, and the out-of-date schema check.

Alembic is imported only to migrate or to read the migration scripts: opening a database whose
schema is current (every embedded run's host process does) reads its revision with SQLAlchemy
and compares it with ``HEAD_REVISION``, which saves the host about 0.4 CPU-s of imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

import migrations

if TYPE_CHECKING:
    from alembic.config import Config

UPGRADE_COMMAND = "apmon db upgrade"
# The newest revision in migrations/versions; tests/store/test_migrations.py checks that it is
# Alembic's head, so a new migration fails the tests until this names it.
HEAD_REVISION = "0003"
VERSION_TABLE = "alembic_version"  # Alembic's default, which migrations/env.py keeps


class SchemaOutOfDate(RuntimeError):
    """The database schema is not at the code's head revision."""


def alembic_config(database_url: str) -> Config:
    """An Alembic config built in code: no alembic.ini to keep in step."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    # '%' is ConfigParser interpolation; a password may contain it.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest revision of the migration scripts (there is exactly one head)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    heads = script.get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations must have one head, found {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database.

    What Alembic's ``MigrationContext.get_current_revision`` reads, without importing Alembic.
    """
    with engine.connect() as connection:
        if not inspect(connection).has_table(VERSION_TABLE):
            return None
        rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).all()
    if len(rows) > 1:
        raise RuntimeError(f"the database is at several revisions: {[r[0] for r in rows]}")
    return str(rows[0][0]) if rows else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind ``engine`` to ``revision``."""
    from alembic import command

    config = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def require_current_schema(engine: Engine) -> None:
    """Raise SchemaOutOfDate, naming the fixing command, unless the schema is at head."""
    current, head = current_revision(engine), HEAD_REVISION
    if current != head:
        where = engine.url.render_as_string(hide_password=True)
        found = "an empty database" if current is None else f"revision {current}"
        raise SchemaOutOfDate(
            f"the apmon database {where} is at {found}, but this apmon needs revision {head}. "
            f"Run `{UPGRADE_COMMAND}` (with the same APMON_DATABASE_URL) to migrate it."
        )
