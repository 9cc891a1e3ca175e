"""What the client sent: step summaries (one row per site) and probe records (one per site, eta).

``save_events`` writes many of them at once together with their plugin results: the one row
builder behind ``save_summary`` and ``save_probe`` too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import delete, insert, select
from typing_extensions import override

from monitor.schema import ActivationDiagram, ProbeRecord, SiteInfo, SiteSummary, StepSummary
from monitor.store.bulk import insert_many
from monitor.store.contract import PluginOutcome
from monitor.store.models import (
    AlertRow,
    DiagramRow,
    FitRow,
    MeasureRow,
    PluginErrorRow,
    PluginStateRow,
    ProbeRow,
    StepRow,
    SummaryRow,
)
from monitor.store.outcomes import copy_states
from monitor.store.session import SqlBase


class Records(SqlBase):
    """Step summaries and probe records as the client sent them."""

    @override
    def save_summary(self, run_id: str, summary: StepSummary) -> None:
        self.save_events(run_id, [], [(summary, PluginOutcome(summary.source))], {})

    @override
    def diagrams(self, run_id: str) -> list[tuple[int, ActivationDiagram]]:
        with self._session("read diagrams") as session:
            rows = session.execute(
                select(DiagramRow.step, DiagramRow.payload)
                .where(DiagramRow.run_id == run_id)
                .order_by(DiagramRow.step)
            ).all()
        return [(step, ActivationDiagram.model_validate(payload)) for step, payload in rows]

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
        self.save_events(run_id, [], [(probe, PluginOutcome(probe.kind))], {})

    def save_events(
        self,
        run_id: str,
        sites: Sequence[SiteInfo],
        events: Sequence[tuple[StepSummary | ProbeRecord, PluginOutcome]],
        states: Mapping[str, dict[str, Any]],
    ) -> None:
        """Store many events with their plugin results, and the given states, in one transaction.

        The same rows as ``save_summary``/``save_probe`` + ``save_outcome`` per event, written
        as one multi-row insert per table: the embedded host writes a slice of steps at a time
        this way (per-event sessions cost milliseconds each). New ``sites`` are added first.
        """
        if sites:
            self.add_sites(run_id, sites)
        with self._session(f"save {len(events)} events") as session:
            self._check_run(session, run_id)
            ids = self._site_id_map(session, run_id)

            def site_id(name: str | None) -> int | None:
                return None if name is None else self._site_id(ids, name, run_id)

            steps: list[dict[str, Any]] = []
            summaries: list[dict[str, Any]] = []
            probes: list[dict[str, Any]] = []
            measures: list[dict[str, Any]] = []
            fits: list[dict[str, Any]] = []
            alerts: list[dict[str, Any]] = []
            errors: list[dict[str, Any]] = []
            diagrams: list[dict[str, Any]] = []
            for event, outcome in events:
                if isinstance(event, StepSummary):
                    if event.diagram is not None:
                        diagrams.append(
                            {
                                "run_id": run_id,
                                "step": event.step,
                                "payload": event.diagram.model_dump(mode="json"),
                            }
                        )
                    if event.loss is not None or event.sample_indices is not None:
                        steps.append(
                            {
                                "run_id": run_id,
                                "step": event.step,
                                "source": event.source,
                                "loss": event.loss,
                                "sample_indices": event.sample_indices,
                            }
                        )
                    summaries += [
                        {
                            "run_id": run_id,
                            "site_id": site_id(site.site),
                            "step": event.step,
                            "source": event.source,
                            "rows": site.rows,
                            "payload": site.model_dump(mode="json", exclude={"site"}),
                        }
                        for site in event.sites
                        if not site.scale_only  # its statistics live on as the plugins' measures
                    ]
                else:
                    probes += [
                        {
                            "run_id": run_id,
                            "site_id": site_id(site.site),
                            "step": event.step,
                            "kind": event.kind,
                            "lr": event.lr,
                            "eta": eta,
                            "rows": site.rows,
                            "changed": changed,
                        }
                        for site in event.sites
                        for eta, changed in zip(site.etas, site.changed, strict=True)
                    ]
                at = [(p, v, event.step, m) for p, v, m in outcome.measures] + outcome.backfill
                measures += [
                    {
                        "run_id": run_id,
                        "site_id": site_id(m.site),
                        "step": step,
                        "source": m.source,
                        "name": m.name,
                        "value": m.value,
                        "plugin": plugin,
                        "plugin_version": version,
                    }
                    for plugin, version, step, m in at
                ]
                fits += [
                    {
                        "run_id": run_id,
                        "site_id": site_id(f.site),
                        "step": event.step,
                        "mu": f.mu,
                        "sigma": f.sigma,
                        "residual": f.residual,
                        "points": f.points,
                        "ok": f.ok,
                        "reason": f.reason,
                        "plugin": plugin,
                        "plugin_version": version,
                    }
                    for plugin, version, f in outcome.fits
                ]
                alerts += [
                    {
                        "run_id": run_id,
                        "step": a.step,
                        "kind": a.kind,
                        "severity": a.severity,
                        "site": a.site,
                        "message": a.message,
                        "evidence": a.evidence,
                        "dedup_key": f"{a.kind}:{a.site or '*'}",
                        "plugin": plugin,
                    }
                    for plugin, a in outcome.alerts
                ]
                errors += [
                    {"run_id": run_id, "plugin": plugin, "step": event.step, "error": error}
                    for plugin, error in outcome.errors
                ]
            insert_many(session, StepRow, steps)
            insert_many(session, SummaryRow, summaries)
            insert_many(session, ProbeRow, probes)
            insert_many(session, MeasureRow, measures)
            insert_many(session, DiagramRow, diagrams)
            for model, rows in ((FitRow, fits), (AlertRow, alerts), (PluginErrorRow, errors)):
                if rows:  # ORM bulk insert: fills Python-side defaults such as created_at
                    session.execute(insert(model), rows)
            if states:
                session.execute(
                    delete(PluginStateRow).where(
                        PluginStateRow.run_id == run_id,
                        PluginStateRow.plugin.in_(list(states)),
                    )
                )
                insert_many(
                    session,
                    PluginStateRow,
                    [{"run_id": run_id, "plugin": n, "state": st} for n, st in states.items()],
                )
        cached = self._states_cache.get(run_id)
        if states and cached is not None:
            cached.update(copy_states(dict(states)))
