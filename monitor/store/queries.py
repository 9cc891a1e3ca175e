"""Reading results back: measures, fits, probes and alerts of a run, in step order."""

from __future__ import annotations

from sqlalchemy import select
from typing_extensions import override

from monitor.store.entities import AlertRecord, FitPoint, MeasurePoint, ProbePoint
from monitor.store.models import AlertRow, FitRow, MeasureRow, ProbeRow, SiteRow
from monitor.store.session import SqlBase


class Queries(SqlBase):
    """Stored results of a run, filtered and in step order."""

    @override
    def measures(
        self,
        run_id: str,
        name: str | None = None,
        site: str | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> list[MeasurePoint]:
        with self._session("read measures") as session:
            query = (
                select(MeasureRow, SiteRow.name)
                .outerjoin(SiteRow, SiteRow.id == MeasureRow.site_id)
                .where(MeasureRow.run_id == run_id)
            )
            if name is not None:
                query = query.where(MeasureRow.name == name)
            if site is not None:
                query = query.where(SiteRow.name == site)
            if step_min is not None:
                query = query.where(MeasureRow.step >= step_min)
            if step_max is not None:
                query = query.where(MeasureRow.step <= step_max)
            query = query.order_by(MeasureRow.step, MeasureRow.id)
            return [
                MeasurePoint(
                    step=row.step,
                    name=row.name,
                    site=site_name,
                    source=row.source,
                    value=row.value,
                    plugin=row.plugin,
                    plugin_version=row.plugin_version,
                )
                for row, site_name in session.execute(query)
            ]

    @override
    def fits(self, run_id: str) -> list[FitPoint]:
        with self._session("read fits") as session:
            query = (
                select(FitRow, SiteRow.name)
                .outerjoin(SiteRow, SiteRow.id == FitRow.site_id)
                .where(FitRow.run_id == run_id)
                .order_by(FitRow.step, FitRow.id)
            )
            return [
                FitPoint(
                    step=r.step,
                    site=name,
                    mu=r.mu,
                    sigma=r.sigma,
                    residual=r.residual,
                    points=r.points,
                    ok=r.ok,
                    reason=r.reason,
                )
                for r, name in session.execute(query)
            ]

    @override
    def probes(self, run_id: str) -> list[ProbePoint]:
        with self._session("read probes") as session:
            query = (
                select(ProbeRow, SiteRow.name)
                .join(SiteRow, SiteRow.id == ProbeRow.site_id)
                .where(ProbeRow.run_id == run_id)
                .order_by(ProbeRow.step, ProbeRow.id)
            )
            return [
                ProbePoint(
                    step=r.step,
                    site=name,
                    kind=r.kind,
                    lr=r.lr,
                    eta=r.eta,
                    rows=r.rows,
                    changed=r.changed,
                )
                for r, name in session.execute(query)
            ]

    @override
    def alerts(self, run_id: str) -> list[AlertRecord]:
        with self._session("read alerts") as session:
            query = select(AlertRow).where(AlertRow.run_id == run_id).order_by(AlertRow.step)
            return [
                AlertRecord(
                    id=r.id,
                    step=r.step,
                    kind=r.kind,
                    severity=r.severity,
                    site=r.site,
                    message=r.message,
                    evidence=dict(r.evidence),
                    plugin=r.plugin,
                    created_at=r.created_at,
                )
                for r in session.scalars(query)
            ]
