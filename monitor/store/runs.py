"""Runs and their sites: creation, reading, heartbeats, the end, the MLflow run claim."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.orm import Session
from typing_extensions import override

from monitor.schema import RunStart, SiteInfo
from monitor.store.entities import RunInfo
from monitor.store.models import ProjectRow, RunRow, SiteRow, utcnow
from monitor.store.session import SqlBase


class Runs(SqlBase):
    """Runs, their sites in forward-call order, and their lifecycle."""

    @override
    def create_run(self, project: str, start: RunStart, run_id: str | None = None) -> str:
        run_id = run_id or str(uuid.uuid4())
        with self._session("create run") as session:
            project_id = self._project_id(session, project, create=True)
            session.add(
                RunRow(
                    id=run_id,
                    project_id=project_id,
                    name=start.name,
                    mlflow_run_id=start.mlflow_run_id,
                    config=dict(start.config),
                    processed_step=-1,
                )
            )
            session.flush()
            self._add_sites(session, run_id, start.sites)
        return run_id

    def _add_sites(self, session: Session, run_id: str, sites: Sequence[SiteInfo]) -> None:
        self._forget(run_id)
        known = {
            name: position
            for name, position in session.execute(
                select(SiteRow.name, SiteRow.position).where(SiteRow.run_id == run_id)
            )
        }
        position = max(known.values(), default=-1) + 1
        for site in sites:
            if site.name in known:
                continue
            session.add(
                SiteRow(
                    run_id=run_id,
                    name=site.name,
                    position=position,
                    kind=site.kind,
                    mode=site.mode,
                    units=site.units,
                )
            )
            known[site.name] = position
            position += 1

    @override
    def add_sites(self, run_id: str, sites: Sequence[SiteInfo]) -> None:
        with self._session("add sites") as session:
            self._run_row(session, run_id)
            self._add_sites(session, run_id, sites)

    @override
    def run(self, run_id: str) -> RunInfo:
        if run_id in self._run_cache:
            return self._run_cache[run_id]
        with self._session("read run") as session:
            row = self._run_row(session, run_id)
            project = session.get(ProjectRow, row.project_id)
            return _run_info(row, project.name if project else "")

    @override
    def runs(self, project: str | None = None) -> list[RunInfo]:
        with self._session("list runs") as session:
            query = select(RunRow, ProjectRow.name).join(ProjectRow)
            if project is not None:
                query = query.where(ProjectRow.name == project)
            query = query.order_by(RunRow.created_at.desc())
            return [_run_info(row, name) for row, name in session.execute(query)]

    @override
    def sites(self, run_id: str) -> dict[str, SiteInfo]:
        cached = self._sites_cache.get(run_id)
        if cached is not None:
            return dict(cached)
        with self._session("read sites") as session:
            rows = session.scalars(
                select(SiteRow).where(SiteRow.run_id == run_id).order_by(SiteRow.position)
            )
            ids: dict[str, int] = {}
            found = {}
            for r in rows:
                found[r.name] = SiteInfo(name=r.name, kind=r.kind, mode=r.mode, units=r.units)  # type: ignore[arg-type]
                ids[r.name] = r.id
        if self._cached:
            self._sites_cache[run_id] = found
            if ids:
                self._site_id_cache[run_id] = ids
        return dict(found)

    @override
    def finish_run(self, run_id: str, status: str = "finished") -> None:
        self._run_cache.pop(run_id, None)
        with self._session("finish run") as session:
            row = self._run_row(session, run_id)
            row.status = status
            row.finished_at = utcnow()

    def heartbeat(self, run_id: str) -> None:
        """Record that the run's client is alive."""
        with self._session("heartbeat") as session:
            self._run_row(session, run_id).heartbeat_at = utcnow()

    def claim_mlflow_run_id(self, run_id: str, mlflow_run_id: str) -> str:
        """Set the run's MLflow run id unless one is set already; returns the id that holds.

        Several workers may race to create the MLflow run of one apmon run: the first conditional
        update wins, and a loser learns the winner's id (and should delete its own MLflow run).
        """
        self._run_cache.pop(run_id, None)
        with self._session("claim mlflow run") as session:
            session.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.mlflow_run_id.is_(None))
                .values(mlflow_run_id=mlflow_run_id)
            )
            return self._run_row(session, run_id).mlflow_run_id or mlflow_run_id


def _run_info(row: RunRow, project: str) -> RunInfo:
    return RunInfo(
        id=row.id,
        project=project,
        name=row.name,
        status=row.status,
        mlflow_run_id=row.mlflow_run_id,
        created_at=row.created_at,
        finished_at=row.finished_at,
        config=dict(row.config or {}),
    )
