"""``apmon runs finish RUN_ID``: run the end-of-run plugins for a run that never finished."""

from __future__ import annotations

import argparse
import logging

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
    from monitor.host import PluginHost
    from monitor.measures import load_plugins
    from monitor.store import open_store

    overrides: dict[str, object] = {}
    if args.database_url:
        overrides["database_url"] = args.database_url
    if args.mlflow_uri is not None:
        overrides["mlflow_tracking_uri"] = args.mlflow_uri
    settings = Settings(**overrides)  # type: ignore[arg-type]
    store = open_store(settings.database_url)
    run = store.run(args.run_id)
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


def register_runs_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``finish`` to the ``apmon runs`` subcommands."""
    finish = subparsers.add_parser(
        "finish",
        help="finish a run that never finished: end-of-run measures, status 'finished'",
        description="Run the end-of-run work of every plugin for a stored run whose training "
        "process never closed it (weighted Jaccard of every probe-set step against the final "
        "one, back-filled), mirror the results to the run's MLflow run when it has one, and "
        "mark the run finished.",
    )
    finish.add_argument("run_id", help="the run's id (see `apmon runs list`)")
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
