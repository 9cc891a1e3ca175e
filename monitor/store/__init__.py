"""Persistence: models, migrations and the Store."""

from monitor.store.engine import make_engine
from monitor.store.migrate import SchemaOutOfDate, require_current_schema, upgrade
from monitor.store.store import NotFound, PluginOutcome, SqlStore, Store, StoreError

__all__ = [
    "NotFound",
    "PluginOutcome",
    "SchemaOutOfDate",
    "SqlStore",
    "Store",
    "StoreError",
    "make_engine",
    "open_store",
    "require_current_schema",
    "upgrade",
]


def open_store(database_url: str, auto_upgrade: bool = False) -> SqlStore:
    """Open the store at ``database_url``; refuse an out-of-date schema unless ``auto_upgrade``.

    ``auto_upgrade`` is for a brand-new embedded SQLite file only: an existing database is never
    migrated behind the user's back.
    """
    engine = make_engine(database_url)
    if auto_upgrade:
        from monitor.store.migrate import current_revision

        if current_revision(engine) is None:
            upgrade(engine)
    require_current_schema(engine)
    return SqlStore(engine)
