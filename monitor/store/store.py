"""The Store: a small abstract interface and its one SQLAlchemy 2 implementation.

Each public method opens one managed session (commit on success, rollback on error) and
translates database errors into ``StoreError``; callers only ever see plain entities.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
import pickle
import secrets
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Dialect,
    Engine,
    Table,
    TextClause,
    Transaction,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import override

from monitor.schema import (
    ActivationDiagram,
    AlertValue,
    FitValue,
    MeasureValue,
    ProbeRecord,
    RunStart,
    SiteInfo,
    SiteSummary,
    StepSummary,
)
from monitor.store.entities import AlertRecord, FitPoint, MeasurePoint, ProbePoint, RunInfo
from monitor.store.models import (
    AlertRow,
    ApiTokenRow,
    DiagramRow,
    FitRow,
    IngestBatchRow,
    MeasureRow,
    PluginErrorRow,
    PluginStateRow,
    ProbeRow,
    ProjectRow,
    RunRow,
    SiteRow,
    StepRow,
    SummaryRow,
    utcnow,
)


class StoreError(RuntimeError):
    """A storage operation failed; the message says which and why."""


class NotFound(StoreError):
    """The run, project or token does not exist (or is not visible to the caller)."""


def hash_token(token: str) -> str:
    """SHA-256 of a token: tokens are random and long, so a fast hash is the right one."""
    return hashlib.sha256(token.encode()).hexdigest()


class Store(abc.ABC):
    """What the plugin host, the service and the CLI need from storage."""

    @abc.abstractmethod
    def create_run(self, project: str, start: RunStart, run_id: str | None = None) -> str:
        """Create a run (and its project when new); returns the run id."""

    @abc.abstractmethod
    def add_sites(self, run_id: str, sites: Sequence[SiteInfo]) -> None:
        """Register sites not yet known for the run, keeping first-seen order."""

    @abc.abstractmethod
    def run(self, run_id: str) -> RunInfo:
        """The run, or NotFound."""

    @abc.abstractmethod
    def sites(self, run_id: str) -> dict[str, SiteInfo]:
        """The run's sites by name, in forward-call order."""

    @abc.abstractmethod
    def save_summary(self, run_id: str, summary: StepSummary) -> None:
        """Store one step summary (site summaries, loss, sample indices)."""

    @abc.abstractmethod
    def save_probe(self, run_id: str, probe: ProbeRecord) -> None:
        """Store one probe record, one row per (site, eta)."""

    @abc.abstractmethod
    def plugin_states(self, run_id: str) -> dict[str, dict[str, Any]]:
        """Every plugin's state for the run."""

    @abc.abstractmethod
    def save_outcome(self, run_id: str, step: int, outcome: PluginOutcome) -> None:
        """Store what the plugins produced for one event, and their new states, atomically."""

    @abc.abstractmethod
    def finish_run(self, run_id: str, status: str = "finished") -> None:
        """Mark the run finished."""

    @abc.abstractmethod
    def step_summaries(self, run_id: str, source: str) -> Iterator[StepSummary]:
        """Stored step summaries of one source, in step order."""

    @abc.abstractmethod
    def diagrams(self, run_id: str) -> list[tuple[int, ActivationDiagram]]:
        """Stored activation pattern diagrams as (step, diagram), in step order."""

    @abc.abstractmethod
    def measures(
        self,
        run_id: str,
        name: str | None = None,
        site: str | None = None,
        step_min: int | None = None,
        step_max: int | None = None,
    ) -> list[MeasurePoint]:
        """Stored measures, filtered, ordered by step."""

    @abc.abstractmethod
    def fits(self, run_id: str) -> list[FitPoint]:
        """Stored fits, ordered by step."""

    @abc.abstractmethod
    def probes(self, run_id: str) -> list[ProbePoint]:
        """Stored probe points, ordered by step."""

    @abc.abstractmethod
    def alerts(self, run_id: str) -> list[AlertRecord]:
        """Stored alerts, ordered by step."""

    @abc.abstractmethod
    def runs(self, project: str | None = None) -> list[RunInfo]:
        """Runs, newest first."""


class PluginOutcome:
    """Everything the host's plugins produced for one event, ready to store."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.measures: list[tuple[str, str, MeasureValue]] = []
        self.backfill: list[tuple[str, str, int, MeasureValue]] = []
        self.fits: list[tuple[str, str, FitValue]] = []
        self.alerts: list[tuple[str, AlertValue]] = []
        self.errors: list[tuple[str, str]] = []
        self.states: dict[str, dict[str, Any]] = {}


class SqlStore(Store):
    """The SQLAlchemy 2 store, for SQLite and PostgreSQL.

    ``bind`` is an Engine, or a Connection inside an outer transaction (tests join sessions into
    it with savepoints and roll everything back at the end).
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

    # -- projects and tokens -----------------------------------------------------------------

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

    def create_token(self, project: str, label: str = "") -> str:
        """Create an API token for the project; the plain token is returned once, never stored."""
        token = "apm_" + secrets.token_urlsafe(32)
        with self._session("create token") as session:
            project_id = self._project_id(session, project, create=True)
            session.add(
                ApiTokenRow(project_id=project_id, token_hash=hash_token(token), label=label)
            )
        return token

    def project_for_token(self, token: str) -> str | None:
        """The name of the project a valid, unrevoked token belongs to, else None."""
        with self._session("check token") as session:
            return session.scalar(
                select(ProjectRow.name)
                .join(ApiTokenRow, ApiTokenRow.project_id == ProjectRow.id)
                .where(
                    ApiTokenRow.token_hash == hash_token(token), ApiTokenRow.revoked_at.is_(None)
                )
            )

    # -- runs and sites ----------------------------------------------------------------------

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

    def _run_row(self, session: Session, run_id: str) -> RunRow:
        row = session.get(RunRow, run_id)
        if row is None:
            raise NotFound(f"no run with id {run_id!r}")
        return row

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

    @override
    def finish_run(self, run_id: str, status: str = "finished") -> None:
        self._run_cache.pop(run_id, None)
        with self._session("finish run") as session:
            row = self._run_row(session, run_id)
            row.status = status
            row.finished_at = utcnow()

    # -- summaries and probes ----------------------------------------------------------------

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

    # -- plugin results ----------------------------------------------------------------------

    @override
    def plugin_states(self, run_id: str) -> dict[str, dict[str, Any]]:
        cached = self._states_cache.get(run_id)
        if cached is not None:
            return _copy_states(cached)  # plugins mutate their state in place
        with self._session("read plugin states") as session:
            found = {
                row.plugin: dict(row.state)
                for row in session.scalars(
                    select(PluginStateRow).where(PluginStateRow.run_id == run_id)
                )
            }
        if self._cached:
            self._states_cache[run_id] = _copy_states(found)
        return found

    @override
    def save_outcome(self, run_id: str, step: int, outcome: PluginOutcome) -> None:
        with self._session(f"save plugin results of step {step}") as session:
            self._check_run(session, run_id)
            ids = self._site_id_map(session, run_id)

            def site_id(name: str | None) -> int | None:
                return None if name is None else self._site_id(ids, name, run_id)

            measure_rows = [
                {
                    "run_id": run_id,
                    "site_id": site_id(m.site),
                    "step": at_step,
                    "source": m.source,
                    "name": m.name,
                    "value": m.value,
                    "plugin": plugin,
                    "plugin_version": version,
                }
                for plugin, version, at_step, m in [
                    (plugin, version, step, m) for plugin, version, m in outcome.measures
                ]
                + outcome.backfill
            ]
            _insert_many(session, MeasureRow, measure_rows)
            for plugin, version, fit in outcome.fits:
                session.add(
                    FitRow(
                        run_id=run_id,
                        site_id=site_id(fit.site),
                        step=step,
                        mu=fit.mu,
                        sigma=fit.sigma,
                        residual=fit.residual,
                        points=fit.points,
                        ok=fit.ok,
                        reason=fit.reason,
                        plugin=plugin,
                        plugin_version=version,
                    )
                )
            for plugin, alert in outcome.alerts:
                session.add(
                    AlertRow(
                        run_id=run_id,
                        step=alert.step,
                        kind=alert.kind,
                        severity=alert.severity,
                        site=alert.site,
                        message=alert.message,
                        evidence=alert.evidence,
                        dedup_key=f"{alert.kind}:{alert.site or '*'}",
                        plugin=plugin,
                    )
                )
            for plugin, error in outcome.errors:
                session.add(PluginErrorRow(run_id=run_id, plugin=plugin, step=step, error=error))
            # Only states that changed are written (the cache, when there is one, holds what
            # the database holds): a detector's state can be tens of kB per run.
            cached = self._states_cache.get(run_id)
            changed = {
                name: state
                for name, state in outcome.states.items()
                if cached is None or cached.get(name) != state
            }
            if changed:
                session.execute(
                    delete(PluginStateRow).where(
                        PluginStateRow.run_id == run_id,
                        PluginStateRow.plugin.in_(list(changed)),
                    )
                )
                _insert_many(
                    session,
                    PluginStateRow,
                    [
                        {"run_id": run_id, "plugin": name, "state": state}
                        for name, state in changed.items()
                    ],
                )
        if cached is not None:
            cached.update(_copy_states(changed))

    def save_events(
        self,
        run_id: str,
        sites: Sequence[SiteInfo],
        events: Sequence[tuple[StepSummary | ProbeRecord, PluginOutcome]],
        states: Mapping[str, dict[str, Any]],
    ) -> None:
        """Store many events with their plugin results, and the given states, in one transaction.

        The same rows as ``add_sites`` + ``save_summary``/``save_probe`` + ``save_outcome`` per
        event, written as one multi-row insert per table: the embedded host writes a slice of
        steps at a time this way (per-event sessions cost milliseconds each).
        """
        with self._session(f"save {len(events)} events") as session:
            self._check_run(session, run_id)
            if sites:
                self._add_sites(session, run_id, sites)
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
            _insert_many(session, StepRow, steps)
            _insert_many(session, SummaryRow, summaries)
            _insert_many(session, ProbeRow, probes)
            _insert_many(session, MeasureRow, measures)
            _insert_many(session, DiagramRow, diagrams)
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
                _insert_many(
                    session,
                    PluginStateRow,
                    [{"run_id": run_id, "plugin": n, "state": st} for n, st in states.items()],
                )
        cached = self._states_cache.get(run_id)
        if states and cached is not None:
            cached.update(_copy_states(dict(states)))

    def last_alert_step(self, run_id: str, dedup_key: str) -> int | None:
        """Step of the newest stored alert with this key (for cool-downs)."""
        with self._session("read alerts") as session:
            return session.scalar(
                select(AlertRow.step)
                .where(AlertRow.run_id == run_id, AlertRow.dedup_key == dedup_key)
                .order_by(AlertRow.step.desc())
                .limit(1)
            )

    # -- queries -----------------------------------------------------------------------------

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

    # -- ingest idempotency ------------------------------------------------------------------

    def claim_batch(self, run_id: str, stream: str, seq: int, payload: dict[str, Any]) -> bool:
        """Record a batch as received; False when (run, stream, seq) was already received."""
        try:
            with self._session("claim batch") as session:
                self._run_row(session, run_id)
                session.add(IngestBatchRow(run_id=run_id, stream=stream, seq=seq, payload=payload))
        except StoreError as error:
            if isinstance(error.__cause__, IntegrityError):
                return False
            raise
        return True

    # -- service support: run locks, ordered batch processing, lifecycle ---------------------
    # (added for the monitoring service; the methods above keep their embedded-mode behaviour)

    @contextmanager
    def locked_run(self, run_id: str) -> Iterator[SqlStore]:
        """One transaction that holds the run's row lock; yields a store bound to it.

        Every write made through the yielded store commits together when the block ends, or not
        at all. On PostgreSQL the lock is ``SELECT ... FOR NO KEY UPDATE`` (it serialises the
        workers that process one run but, unlike FOR UPDATE, does not block other runs' or this
        run's foreign-key checks); on SQLite a no-op UPDATE takes the database write lock first
        thing, so the transaction never has to upgrade a stale read snapshot. Raises NotFound
        when the run does not exist.
        """
        transaction: Transaction
        if isinstance(self._bind, Engine):
            connection, own = self._bind.connect(), True
            transaction = connection.begin()
        else:
            connection, own = self._bind, False
            transaction = connection.begin_nested()
        try:
            try:
                if connection.dialect.name == "sqlite":
                    connection.execute(
                        update(RunRow)
                        .where(RunRow.id == run_id)
                        .values(processed_step=RunRow.processed_step)
                    )
                found = connection.execute(
                    select(
                        RunRow.id,
                        ProjectRow.name,
                        RunRow.name,
                        RunRow.status,
                        RunRow.mlflow_run_id,
                        RunRow.created_at,
                        RunRow.finished_at,
                        RunRow.config,
                    )
                    .join(ProjectRow, ProjectRow.id == RunRow.project_id)
                    .where(RunRow.id == run_id)
                    .with_for_update(of=RunRow, key_share=True)
                ).first()
                if found is None:
                    raise NotFound(f"no run with id {run_id!r}")
                locked = SqlStore(connection, savepoints=False)
                locked._run_cache[run_id] = RunInfo(
                    id=found[0],
                    project=found[1],
                    name=found[2],
                    status=found[3],
                    mlflow_run_id=found[4],
                    created_at=found[5],
                    finished_at=found[6],
                    config=dict(found[7] or {}),
                )
                yield locked
                transaction.commit()
            except BaseException:
                if transaction.is_active:
                    transaction.rollback()
                raise
        except SQLAlchemyError as error:
            raise StoreError(f"run {run_id!r}: database error ({error})") from error
        finally:
            if own:
                connection.close()

    def batch_received(self, run_id: str, stream: str, seq: int) -> bool:
        """Whether (run, stream, seq) was received before."""
        with self._session("read batch") as session:
            return session.get(IngestBatchRow, (run_id, stream, seq)) is not None

    def save_batch(
        self, run_id: str, stream: str, seq: int, payload: dict[str, Any] | None
    ) -> None:
        """Record a received batch.

        ``payload`` keeps it until its turn comes (see ``ready_batches``); None when the caller
        processes it in this same transaction.
        """
        with self._session(f"save batch {stream}/{seq}") as session:
            session.add(IngestBatchRow(run_id=run_id, stream=stream, seq=seq, payload=payload))

    def keep_batch_payload(
        self, run_id: str, stream: str, seq: int, payload: dict[str, Any]
    ) -> None:
        """Store the payload of a recorded batch that has to wait for its turn."""
        with self._session(f"keep batch {stream}/{seq}") as session:
            session.execute(
                update(IngestBatchRow)
                .where(
                    IngestBatchRow.run_id == run_id,
                    IngestBatchRow.stream == stream,
                    IngestBatchRow.seq == seq,
                )
                .values(payload=payload)
            )

    def ready_batches(
        self, run_id: str, include_gaps: bool = False
    ) -> list[tuple[str, int, dict[str, Any] | None]]:
        """Unprocessed batches whose turn has come, as (stream, seq, payload), in order.

        A batch's turn comes when every lower seq of its stream has been processed, so the
        plugins see a stream's records in the order the client sent them however the batches
        arrived. ``include_gaps`` (at the end of a run) returns every unprocessed batch in seq
        order, skipping seqs that never arrived.
        """
        with self._session("read pending batches") as session:
            done = dict(
                session.execute(
                    select(IngestBatchRow.stream, func.max(IngestBatchRow.seq))
                    .where(IngestBatchRow.run_id == run_id, IngestBatchRow.processed.is_(True))
                    .group_by(IngestBatchRow.stream)
                ).all()
            )
            pending = session.execute(
                select(IngestBatchRow.stream, IngestBatchRow.seq, IngestBatchRow.payload)
                .where(IngestBatchRow.run_id == run_id, IngestBatchRow.processed.is_(False))
                .order_by(IngestBatchRow.stream, IngestBatchRow.seq)
            ).all()
        ready: list[tuple[str, int, dict[str, Any] | None]] = []
        expected: dict[str, int] = {}
        for stream, seq, payload in pending:
            following = expected.get(stream, done.get(stream, -1) + 1)
            if seq != following and not include_gaps:
                expected[stream] = -1  # a gap: nothing later in this stream is ready yet
                continue
            expected[stream] = seq + 1
            ready.append((stream, seq, None if payload is None else dict(payload)))
        return ready

    def mark_batch_processed(self, run_id: str, stream: str, seq: int, last_step: int) -> None:
        """Mark a batch done, drop its payload, and advance the run's processed step."""
        with self._session(f"mark batch {stream}/{seq}") as session:
            marked = session.execute(
                update(IngestBatchRow)
                .where(
                    IngestBatchRow.run_id == run_id,
                    IngestBatchRow.stream == stream,
                    IngestBatchRow.seq == seq,
                )
                .values(processed=True, payload=None)
            )
            if marked.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"run {run_id!r} has no batch {stream}/{seq}")
            session.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.processed_step < last_step)
                .values(processed_step=last_step)
            )

    def pending_batch_count(self, run_id: str | None = None) -> int:
        """Received batches not yet processed (of one run, or of all runs)."""
        with self._session("count pending batches") as session:
            query = select(func.count()).where(IngestBatchRow.processed.is_(False))
            if run_id is not None:
                query = query.where(IngestBatchRow.run_id == run_id)
            return int(session.scalar(query.select_from(IngestBatchRow)) or 0)

    def runs_with_pending_batches(self) -> list[str]:
        """Ids of runs that have received batches not yet processed."""
        with self._session("list runs with pending batches") as session:
            return list(
                session.scalars(
                    select(IngestBatchRow.run_id)
                    .where(IngestBatchRow.processed.is_(False))
                    .distinct()
                )
            )

    def heartbeat(self, run_id: str) -> None:
        """Record that the run's client is alive."""
        with self._session("heartbeat") as session:
            self._run_row(session, run_id).heartbeat_at = utcnow()

    def record_error(self, run_id: str, source: str, step: int, error: str) -> None:
        """Record a processing failure (a plugin, or ``source`` such as the ingest itself)."""
        with self._session("record error") as session:
            session.add(PluginErrorRow(run_id=run_id, plugin=source, step=step, error=error))

    def errors(self, run_id: str) -> list[tuple[str, int, str]]:
        """Recorded processing failures of a run as (source, step, error), oldest first."""
        with self._session("read errors") as session:
            return [
                (r.plugin, r.step, r.error)
                for r in session.scalars(
                    select(PluginErrorRow)
                    .where(PluginErrorRow.run_id == run_id)
                    .order_by(PluginErrorRow.id)
                )
            ]

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


def _copy_states(states: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A deep copy of JSON-like plugin states (a pickle round trip: ~8x faster than deepcopy)."""
    copied: dict[str, dict[str, Any]] = pickle.loads(pickle.dumps(states, pickle.HIGHEST_PROTOCOL))
    return copied


def _insert_many(session: Session, model: type[Any], rows: list[dict[str, Any]]) -> None:
    """Insert many rows of one table in one statement.

    A step writes hundreds of measure rows. On PostgreSQL they go as one
    ``INSERT ... SELECT FROM unnest(arrays)``: one statement with one parameter per column,
    whose SQL text is the same every time (so the server and SQLAlchemy cache it); elsewhere an
    executemany.
    """
    if not rows:
        return
    dialect = session.get_bind().dialect
    if dialect.name != "postgresql":
        # The table's Core insert, not the ORM's bulk path: the same executemany for a
        # fraction of the Python work per row.
        session.execute(model.__table__.insert(), rows)
        return
    names = tuple(rows[0])
    table = model.__table__
    params: dict[str, Any] = {}
    for name in names:
        values = [row[name] for row in rows]
        # A JSON column goes as one JSON array: as elements of a text array every quote in
        # the documents would be escaped, one regex substitution each, on the client.
        params[name] = json.dumps(values) if isinstance(table.c[name].type, JSON) else values
    session.execute(_unnest_insert(table, names, dialect), params)


@functools.lru_cache(maxsize=64)
def _unnest_insert(table: Table, names: tuple[str, ...], dialect: Dialect) -> TextClause:
    """``INSERT ... SELECT FROM unnest(arrays)`` for these columns, built once.

    Scalar columns come as one array parameter each, JSON columns as one JSON array each, joined
    to the arrays on their position. Parsing the text for its bind parameters costs more than
    running the insert, hence the cache.
    """
    scalars = [n for n in names if not isinstance(table.c[n].type, JSON)]
    documents = [n for n in names if isinstance(table.c[n].type, JSON)]
    if not scalars:
        raise ValueError(f"{table.name}: a bulk insert needs a scalar column to number the rows")
    arrays = [f"CAST(:{n} AS {table.c[n].type.compile(dialect=dialect)}[])" for n in scalars]
    source = f"unnest({', '.join(arrays)}) WITH ORDINALITY AS t({', '.join(scalars)}, n)"
    selects = {n: f"t.{n}" for n in scalars}
    for n in documents:
        source += (
            f" JOIN json_array_elements(CAST(:{n} AS JSON)) WITH ORDINALITY AS j_{n}(value, n)"
            f" ON j_{n}.n = t.n"
        )
        # JSON null stands for SQL NULL, as a None value would have been stored
        selects[n] = f"CASE WHEN json_typeof(j_{n}.value) = 'null' THEN NULL ELSE j_{n}.value END"
    return text(
        f"INSERT INTO {table.name} ({', '.join(names)}) "
        f"SELECT {', '.join(selects[n] for n in names)} FROM {source}"
    )


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
