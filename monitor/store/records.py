"""What the client sent: step summaries (one row per site) and probe records (one per site, eta)."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import select
from typing_extensions import override

from monitor.schema import ProbeRecord, SiteSummary, StepSummary
from monitor.store.bulk import insert_many
from monitor.store.models import ProbeRow, StepRow, SummaryRow
from monitor.store.session import SqlBase


class Records(SqlBase):
    """Step summaries and probe records as the client sent them."""

    @override
    def save_summary(self, run_id: str, summary: StepSummary) -> None:
        with self._session(f"save summary of step {summary.step}") as session:
            self._check_run(session, run_id)
            ids = self._site_id_map(session, run_id)
            rows = [
                {
                    "run_id": run_id,
                    "site_id": self._site_id(ids, site.site, run_id),
                    "step": summary.step,
                    "source": summary.source,
                    "rows": site.rows,
                    "payload": site.model_dump(mode="json", exclude={"site"}),
                }
                for site in summary.sites
            ]
            if summary.loss is not None or summary.sample_indices is not None:
                session.add(
                    StepRow(
                        run_id=run_id,
                        step=summary.step,
                        source=summary.source,
                        loss=summary.loss,
                        sample_indices=summary.sample_indices,
                    )
                )
            insert_many(session, SummaryRow, rows)

    @override
    def step_summaries(self, run_id: str, source: str) -> Iterator[StepSummary]:
        with self._session("read summaries") as session:
            names = {site_id: name for name, site_id in self._site_id_map(session, run_id).items()}
            steps = {
                row.step: row
                for row in session.scalars(
                    select(StepRow).where(StepRow.run_id == run_id, StepRow.source == source)
                )
            }
            rows = session.execute(
                select(SummaryRow.step, SummaryRow.site_id, SummaryRow.payload)
                .where(SummaryRow.run_id == run_id, SummaryRow.source == source)
                .order_by(SummaryRow.step, SummaryRow.site_id)
            ).all()
        grouped: dict[int, list[SiteSummary]] = {}
        for step, site_id, payload in rows:
            grouped.setdefault(step, []).append(
                SiteSummary.model_validate({**payload, "site": names[site_id]})
            )
        for step, sites in grouped.items():
            extra = steps.get(step)
            yield StepSummary(
                step=step,
                source=source,  # type: ignore[arg-type]
                sites=sites,
                loss=extra.loss if extra else None,
                sample_indices=extra.sample_indices if extra else None,
            )

    @override
    def save_probe(self, run_id: str, probe: ProbeRecord) -> None:
        with self._session(f"save probe of step {probe.step}") as session:
            self._run_row(session, run_id)
            ids = self._site_id_map(session, run_id)
            for site in probe.sites:
                site_id = self._site_id(ids, site.site, run_id)
                for eta, changed in zip(site.etas, site.changed, strict=True):
                    session.add(
                        ProbeRow(
                            run_id=run_id,
                            site_id=site_id,
                            step=probe.step,
                            kind=probe.kind,
                            lr=probe.lr,
                            eta=eta,
                            rows=site.rows,
                            changed=changed,
                        )
                    )
