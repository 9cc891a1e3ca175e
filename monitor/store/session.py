"""The base of the SQL store: sessions that commit or roll back as one, and the read caches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from monitor.schema import SiteInfo
from monitor.store.contract import NotFound, Store, StoreError
from monitor.store.entities import RunInfo
from monitor.store.models import ProjectRow, RunRow, SiteRow


class SqlBase(Store):
    """What every part of the SQL store shares: the bind, managed sessions, and read caches.

    ``bind`` is an Engine, or a Connection inside an outer transaction (tests join sessions into
    it with savepoints and roll everything back at the end). Each public method opens one managed
    session (commit on success, rollback on error) and translates database errors into
    ``StoreError``; callers only ever see plain entities.
    """

    def __init__(self, bind: Engine | Connection, savepoints: bool = True) -> None:
        options: dict[str, Any] = {"expire_on_commit": False}
        if isinstance(bind, Connection):
            # ``savepoints=False`` (``locked_run``): sessions join the caller's transaction
            # without a SAVEPOINT each, and any failure rolls the whole transaction back.
            options["join_transaction_mode"] = "create_savepoint" if savepoints else "rollback_only"
        self._bind = bind
        self._sessions = sessionmaker(bind=bind, **options)
        self._site_ids: dict[tuple[str, str], int] = {}
        # Read caches, only for a store bound to one connection (one transaction: a test's, or
        # the service's ``locked_run``), where nothing else writes the run meanwhile. They are
        # dropped when a savepoint rolls back and refreshed by this store's own writes.
        self._cached = isinstance(bind, Connection)
        self._site_id_cache: dict[str, dict[str, int]] = {}
        self._sites_cache: dict[str, dict[str, SiteInfo]] = {}
        self._states_cache: dict[str, dict[str, dict[str, Any]]] = {}
        self._run_cache: dict[str, RunInfo] = {}

    @contextmanager
    def _session(self, what: str) -> Iterator[Session]:
        session = self._sessions()
        try:
            yield session
            session.commit()
        except StoreError:
            session.rollback()
            raise
        except IntegrityError as error:
            session.rollback()
            raise StoreError(f"{what}: conflicts with stored data ({error.orig})") from error
        except SQLAlchemyError as error:
            session.rollback()
            raise StoreError(f"{what}: database error ({error})") from error
        finally:
            session.close()

    def _project_id(self, session: Session, name: str, create: bool) -> int:
        found = session.scalar(select(ProjectRow.id).where(ProjectRow.name == name))
        if found is not None:
            return found
        if not create:
            raise NotFound(f"no project named {name!r}")
        row = ProjectRow(name=name)
        session.add(row)
        session.flush()
        return row.id

    def _run_row(self, session: Session, run_id: str) -> RunRow:
        row = session.get(RunRow, run_id)
        if row is None:
            raise NotFound(f"no run with id {run_id!r}")
        return row

    def _site_id_map(self, session: Session, run_id: str) -> dict[str, int]:
        cached = self._site_id_cache.get(run_id)
        if cached is not None:
            return cached
        found = {
            name: site_id
            for name, site_id in session.execute(
                select(SiteRow.name, SiteRow.id).where(SiteRow.run_id == run_id)
            )
        }
        if self._cached and found:
            self._site_id_cache[run_id] = found
        return found

    def _forget(self, run_id: str | None = None) -> None:
        """Drop cached reads (of one run, or all)."""
        for cache in (self._site_id_cache, self._sites_cache, self._states_cache):
            if run_id is None:
                cache.clear()
            else:
                cache.pop(run_id, None)

    def _check_run(self, session: Session, run_id: str) -> None:
        """NotFound unless the run exists (a run with cached sites is known to exist)."""
        if run_id not in self._site_id_cache and run_id not in self._run_cache:
            self._run_row(session, run_id)

    def _site_id(self, ids: Mapping[str, int], name: str, run_id: str) -> int:
        try:
            return ids[name]
        except KeyError:
            raise NotFound(f"run {run_id!r} has no site named {name!r}") from None
