"""The Store: the abstract contract and its one SQLAlchemy 2 implementation, ``SqlStore``.

``SqlStore`` is composed of one small part per resource (tokens, runs, records, plugin outcomes,
queries, the ingest queue, the quarantine), each in its own module over the shared sessions of
``monitor.store.session``. This module only assembles them and keeps the names callers import.
"""

from __future__ import annotations

from monitor.store.contract import NotFound, PluginOutcome, Store, StoreError
from monitor.store.ingest_queue import IngestQueue
from monitor.store.outcomes import Outcomes
from monitor.store.quarantine import Quarantine, storable_text
from monitor.store.queries import Queries
from monitor.store.records import Records
from monitor.store.runs import Runs
from monitor.store.tokens import Tokens, hash_token

__all__ = [
    "NotFound",
    "PluginOutcome",
    "SqlStore",
    "Store",
    "StoreError",
    "hash_token",
    "storable_text",
]


class SqlStore(Tokens, Runs, Records, Outcomes, Queries, IngestQueue, Quarantine):
    """The SQLAlchemy 2 store, for SQLite and PostgreSQL.

    ``bind`` is an Engine, or a Connection inside an outer transaction (tests join sessions into
    it with savepoints and roll everything back at the end).
    """
