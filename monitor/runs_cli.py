"""``apmon runs show RUN`` and ``apmon runs finish RUN`` (end-of-run work of an unfinished run)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from monitor.settings import Settings
from monitor.store import SqlStore

logger = logging.getLogger(__name__)


def last_step(store: SqlStore, run_id: str) -> int:
    """The largest step stored for the run (summaries of either source, probes); -1 if none."""
    steps = [p.step for p in store.probes(run_id)]
    for source in ("train", "probe_set"):
        steps += [s.step for s in store.step_summaries(run_id, source)]
    return max(steps, default=-1)


def cmd_runs_finish(args: argparse.Namespace) -> int:
    """Finish a run: end-of-run plugins (e.g. Jaccard against the final step), status finished."""
    from monitor.cli_store import open_existing_store, resolve_run, url_origin
    from monitor.host import PluginHost
    from monitor.measures import load_plugins

    overrides: dict[str, object] = {}
    if args.database_url:
        overrides["database_url"] = args.database_url
    if args.mlflow_uri is not None:
        overrides["mlflow_tracking_uri"] = args.mlflow_uri
    settings = Settings(**overrides)  # type: ignore[arg-type]
    store = open_existing_store(settings.database_url, url_origin(args))
    run = resolve_run(store, args.run_id)
    if run.status == "finished" and not args.force:
        print(f"run {run.id} is already finished (use --force to run the end-of-run work again)")
        return 1
    final = args.final_step if args.final_step is not None else last_step(store, run.id)
    if final < 0:
        print(f"run {run.id} has no stored steps; marking it finished")
        store.finish_run(run.id)
        return 0
    listeners = []
    sink = None
    if run.mlflow_run_id and settings.mlflow_tracking_uri:
        try:
            from monitor.sinks.mlflow_sink import MlflowSink

            sink = MlflowSink(
                settings.mlflow_tracking_uri,
                settings.mlflow_experiment,
                run.name,
                mlflow_run_id=run.mlflow_run_id,
            )
            sink.alerts.add(store.alerts(run.id))  # tags count the run's earlier alerts too
            listeners.append(sink)
        except Exception:
            logger.exception("MLflow is unavailable; the results go to SQL only")
    host = PluginHost(load_plugins(only=settings.plugins), store, listeners=listeners)
    outcome = host.finish(run.id, final)
    if sink is not None:
        sink.close()
    backfilled = len(outcome.backfill)
    print(
        f"run {run.id} finished at step {final}: {len(outcome.measures)} measures, "
        f"{backfilled} back-filled measures, {len(outcome.alerts)} alerts"
    )
    for plugin, error in outcome.errors:
        print(f"plugin {plugin} failed: {error.splitlines()[-1]}")
    return 0 if not outcome.errors else 1


def run_overview(store: SqlStore, run_id: str) -> dict[str, Any]:
    """What ``apmon runs show`` prints: the run, its steps, sites, measures and alert counts."""
    run = store.run(run_id)
    steps = {
        source: [s.step for s in store.step_summaries(run_id, source)]
        for source in ("train", "probe_set")
    }
    measures: dict[str, int] = {}
    for point in store.measures(run_id):
        key = f"{point.name} ({point.source})"
        measures[key] = measures.get(key, 0) + 1
    alerts: dict[str, int] = {}
    for alert in store.alerts(run_id):
        alerts[alert.kind] = alerts.get(alert.kind, 0) + 1
    return {
        "id": run.id,
        "name": run.name,
        "project": run.project,
        "status": run.status,
        "created_at": run.created_at.isoformat(timespec="seconds"),
        "finished_at": run.finished_at.isoformat(timespec="seconds") if run.finished_at else None,
        "mlflow_run_id": run.mlflow_run_id,
        "steps": {
            source: {"count": len(found), "first": min(found), "last": max(found)}
            for source, found in steps.items()
            if found
        },
        "sites": list(store.sites(run_id)),
        "measures": dict(sorted(measures.items())),
        "alerts": dict(sorted(alerts.items())),
        "config": run.config,
    }


def cmd_runs_show(args: argparse.Namespace) -> int:
    """Print one run's overview (a table, or JSON with --json)."""
    from monitor.cli_store import open_existing_store, print_json, resolve_run, url_origin

    url = args.database_url or Settings().database_url
    store = open_existing_store(url, url_origin(args))
    overview = run_overview(store, resolve_run(store, args.run_id).id)
    if args.json:
        print_json(overview)
        return 0
    for key in ("id", "name", "project", "status", "created_at", "finished_at", "mlflow_run_id"):
        print(f"{key + ':':<15}{overview[key] if overview[key] not in ('', None) else '-'}")
    steps = overview["steps"]
    spans = [f"{s['count']} {source} ({s['first']}..{s['last']})" for source, s in steps.items()]
    print(f"{'steps:':<15}{', '.join(spans) or 'none'}")
    sites = overview["sites"]
    print(f"{'sites:':<15}{len(sites)}: {', '.join(sites)}")
    measures = overview["measures"]
    print(f"{'measures:':<15}{len(measures)} names")
    for name, count in measures.items():
        print(f"  {name:<40} {count:>8} values")
    alerts = overview["alerts"]
    summary = ", ".join(f"{kind} {count}" for kind, count in alerts.items())
    print(f"{'alerts:':<15}{summary or 'none'}")
    return 0


def register_runs_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``show`` and ``finish`` to the ``apmon runs`` subcommands."""
    show = subparsers.add_parser(
        "show",
        help="one run: status, steps, sites, measures, alert counts, MLflow run",
        description="Show a stored run: its status, steps per source, sites, measure names "
        "with their counts, alert counts per kind and its MLflow run. RUN is a run id or a "
        "unique prefix of one.",
    )
    show.add_argument("run_id", metavar="RUN", help="run id or a unique prefix")
    show.add_argument("--json", action="store_true", help="print JSON instead of a table")
    show.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the apmon database (default: APMON_DATABASE_URL or sqlite:///apmon.db)",
    )
    show.set_defaults(func=cmd_runs_show)
    finish = subparsers.add_parser(
        "finish",
        help="finish a run that never finished: end-of-run measures, status 'finished'",
        description="Run the end-of-run work of every plugin for a stored run whose training "
        "process never closed it (weighted Jaccard of every probe-set step against the final "
        "one, back-filled), mirror the results to the run's MLflow run when it has one, and "
        "mark the run finished.",
    )
    finish.add_argument("run_id", metavar="RUN", help="run id or a unique prefix")
    finish.add_argument(
        "--final-step", type=int, help="step to treat as the last (default: the last stored)"
    )
    finish.add_argument(
        "--force", action="store_true", help="run the end-of-run work even if already finished"
    )
    finish.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the apmon database (default: APMON_DATABASE_URL or sqlite:///apmon.db)",
    )
    finish.add_argument("--mlflow-uri", help="MLflow tracking URI ('' for none)")
    finish.set_defaults(func=cmd_runs_finish)
