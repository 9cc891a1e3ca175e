"""The ``apmon`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from monitor.settings import Settings

if TYPE_CHECKING:
    from monitor.store import SqlStore, Store

logger = logging.getLogger(__name__)

DESCRIPTION = """\
apmon watches which ReLU units are on or off for each input while a PyTorch model trains,
and turns that into measures (pattern entropy, changes, APT temperature) and alerts.

Settings come from APMON_* environment variables (APMON_DATABASE_URL, APMON_SERVER_URL,
APMON_TOKEN, ...) and MLFLOW_TRACKING_URI; flags override them.
"""


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    if getattr(args, "mlflow_uri", None) is not None:
        overrides["mlflow_tracking_uri"] = args.mlflow_uri
    return Settings(**overrides)


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL of the apmon database "
        "(default: APMON_DATABASE_URL or sqlite:///apmon.db)",
    )


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _read_store(args: argparse.Namespace) -> SqlStore:
    """The existing database, for commands that only read it (never creates one)."""
    from monitor.cli_store import open_existing_store, url_origin

    return open_existing_store(_settings(args).database_url, url_origin(args))


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the demo CNN with the monitor on and print where the results are."""
    from monitor.demo import describe_location, run_demo
    from monitor.report import site_table
    from monitor.store import open_store

    settings = _settings(args)
    if not args.no_report:  # the demo renders the report itself, below, and attaches it
        settings = settings.model_copy(update={"mlflow_report": False})
    if "mlflow_start_delay_seconds" not in settings.model_fields_set:
        # The demo waits for MLflow at its end: started at once, MLflow's start overlaps the
        # training instead of following it (19.3 s against 20.7 s for the whole demo, once each)
        settings = settings.model_copy(update={"mlflow_start_delay_seconds": 0.0})
    result = run_demo(settings, steps=args.steps, seed=args.seed, progress=not args.quiet)
    print(f"\nTrained {result.steps} steps in {result.seconds:.1f} s", end="")
    print(f", final loss {result.final_loss:.3f}")
    print(f"apmon run:     {result.run_id}")
    print(f"SQLite file:   {describe_location(settings.database_url)}")
    if result.mlflow_run_id:
        print(f"MLflow run:    {result.mlflow_run_id}")
        print(f"MLflow store:  {settings.mlflow_tracking_uri}")
        print(f"Open the UI:   mlflow ui --backend-store-uri {settings.mlflow_tracking_uri}")
    store = open_store(settings.database_url)
    print()
    print(site_table(store.measures(result.run_id)))
    if not args.no_report:
        files = _render_and_attach(settings, store, result.run_id, Path(args.report_dir))
        pngs = sum(1 for path in files if path.suffix == ".png")
        print(f"\nFigures:       {files[0].parent.resolve()}/ ({pngs} PNG files", end="")
        print(" and report.html", end="")
        print(", also attached to the MLflow run)" if result.mlflow_run_id else ")")
    return 0


def _render_and_attach(settings: Settings, store: Store, run_id: str, out: Path) -> list[Path]:
    """Render a run's figures into OUT/RUN_ID and attach them to its MLflow run, if any."""
    from monitor.report import log_report_to_mlflow, render_report

    files = render_report(store, run_id, out / run_id)
    mlflow_run_id = store.run(run_id).mlflow_run_id
    if mlflow_run_id and settings.mlflow_tracking_uri:
        log_report_to_mlflow(settings.mlflow_tracking_uri, mlflow_run_id, files)
    return files


def cmd_report(args: argparse.Namespace) -> int:
    """Render a stored run's report (HTML page, PNGs, alerts.json) and attach it to MLflow."""
    from monitor.cli_store import resolve_run

    settings = _settings(args)
    if args.no_mlflow:
        settings = settings.model_copy(update={"mlflow_tracking_uri": ""})
    store = _read_store(args)
    if args.run_id is None:
        runs = store.runs()
        if not runs:
            print("apmon: no runs stored yet; train with monitor.watch(...) first", file=sys.stderr)
            return 1
        run_id = runs[0].id
    else:
        run_id = resolve_run(store, args.run_id).id
    mlflow_run_id = store.run(run_id).mlflow_run_id
    files = _render_and_attach(settings, store, run_id, Path(args.out))
    for path in files:
        print(path)
    if mlflow_run_id and settings.mlflow_tracking_uri:
        print(f"attached to MLflow run {mlflow_run_id} under apmon-report/")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Migrate the database to the current schema."""
    from monitor.cli_store import check_sqlite_folder, url_origin
    from monitor.store import make_engine, upgrade
    from monitor.store.migrate import current_revision

    settings = _settings(args)
    check_sqlite_folder(settings.database_url, url_origin(args))
    engine = make_engine(settings.database_url)
    before = current_revision(engine)
    upgrade(engine)
    after = current_revision(engine)
    where = engine.url.render_as_string(hide_password=True)
    if before == after:
        print(f"{where} is already at revision {after}")
    else:
        print(f"{where} upgraded from {before or 'an empty database'} to revision {after}")
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    """Print the database's schema revision and the one this apmon needs."""
    from monitor.cli_store import CliError, sqlite_path, url_origin
    from monitor.store import make_engine
    from monitor.store.migrate import current_revision, head_revision

    url = _settings(args).database_url
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise CliError(f"no apmon database at {path} (from {url_origin(args)})")
    engine = make_engine(url)
    current, head = current_revision(engine), head_revision()
    print(f"database: {current or 'empty'}; needed: {head}")
    return 0 if current == head else 1


def cmd_plugins(args: argparse.Namespace) -> int:
    """List the measure plugins that load from the entry-point group."""
    from monitor.cli_store import print_json
    from monitor.measures import load_plugins

    plugins = load_plugins().describe()
    if args.json:
        print_json(plugins)
        return 0
    for plugin in plugins:
        print(f"{plugin['name']:<20} {plugin['version']:<8} {plugin['origin']}")
    return 0


def cmd_runs_list(args: argparse.Namespace) -> int:
    """List stored runs."""
    from monitor.cli_store import print_json

    runs = _read_store(args).runs()
    if args.json:
        print_json(runs)
        return 0
    for run in runs:
        print(f"{run.id}  {run.status:<9} {run.created_at:%Y-%m-%d %H:%M}  {run.name}")
    return 0


def cmd_alerts(args: argparse.Namespace) -> int:
    """List a run's alerts in step order."""
    from monitor.cli_store import print_json, resolve_run

    store = _read_store(args)
    run = resolve_run(store, args.run_id)
    alerts = [a for a in store.alerts(run.id) if args.kind is None or a.kind == args.kind]
    alerts.sort(key=lambda a: (a.step, a.id))
    if args.json:
        print_json(alerts)
        return 0
    if not alerts:
        print(f"run {run.id}: no alerts")
        return 0
    for alert in alerts:
        site = f" [{alert.site}]" if alert.site else ""
        print(f"{alert.step:>7}  {alert.kind:<16} {alert.severity:<8}{site} {alert.message}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (every subcommand has its own --help)."""
    parser = argparse.ArgumentParser(
        prog="apmon", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits with the monitor on (embedded)",
        description="Train a small CNN on scikit-learn's digits (no download) with apmon "
        "watching, store results in a local SQLite file and MLflow store, and print a table "
        "of per-site measures.",
    )
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--no-report", action="store_true", help="do not render the figures")
    demo.add_argument(
        "--report-dir", default="apmon-report", help="where figures go (default apmon-report)"
    )
    demo.add_argument(
        "--mlflow-uri",
        help="MLflow tracking URI (default MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    _add_store_flags(demo)
    demo.set_defaults(func=cmd_demo)

    report = commands.add_parser(
        "report",
        help="render a run's figures (heat maps, phase diagram, fits, alerts) to PNG and MLflow",
        description="Render the figures of a stored run: layer x step heat maps, the "
        "learning-rate phase diagram with the used learning rate, mu/sigma of the transition "
        "fit, and the time line with alerts. Files go to OUT/RUN_ID/*.png and are attached to "
        "the run's MLflow run as artifacts.",
    )
    report.add_argument(
        "run_id", nargs="?", metavar="RUN", help="run id or unique prefix (default: the newest)"
    )
    report.add_argument(
        "--out", default="apmon-report", help="output folder (default apmon-report)"
    )
    report.add_argument("--no-mlflow", action="store_true", help="do not attach to MLflow")
    report.add_argument("--mlflow-uri", help="MLflow tracking URI")
    _add_store_flags(report)
    report.set_defaults(func=cmd_report)

    db = commands.add_parser("db", help="database schema: upgrade, current")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_commands.add_parser("upgrade", help="migrate the apmon database to the current schema")
    _add_store_flags(up)
    up.set_defaults(func=cmd_db_upgrade)
    current = db_commands.add_parser("current", help="show the schema revision (exit 1 if old)")
    _add_store_flags(current)
    current.set_defaults(func=cmd_db_current)

    plugins = commands.add_parser("plugins", help="list the measure plugins that load")
    _add_json_flag(plugins)
    plugins.set_defaults(func=cmd_plugins)

    alerts = commands.add_parser(
        "alerts",
        help="list a run's alerts (step, kind, severity, site, message)",
        description="List the alerts of a stored run in step order. RUN is a run id or a "
        "unique prefix of one.",
    )
    alerts.add_argument("run_id", metavar="RUN", help="run id or a unique prefix")
    alerts.add_argument("--kind", help="only alerts of this kind (e.g. bad_batch)")
    _add_json_flag(alerts)
    _add_store_flags(alerts)
    alerts.set_defaults(func=cmd_alerts)

    runs = commands.add_parser("runs", help="list, show and manage stored runs")
    runs_commands = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    listing = runs_commands.add_parser("list", help="list stored runs, newest first")
    _add_json_flag(listing)
    _add_store_flags(listing)
    listing.set_defaults(func=cmd_runs_list)
    _register_optional(commands, runs_commands)
    return parser


def _register_optional(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    runs_commands: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> None:
    """Subcommands that live with the parts they drive."""
    try:
        from monitor.runs_cli import register_runs_commands
    except ImportError:
        pass
    else:
        register_runs_commands(runs_commands)
    try:
        from monitor.service.cli import register_service_commands
    except ImportError:
        pass
    else:
        register_service_commands(commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apmon`` console script.

    Problems the user can fix (no database, an unreachable server, a bad URL, an old schema)
    are one line on stderr and exit status 2; ``-v`` adds the traceback.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from sqlalchemy.exc import SQLAlchemyError

    from monitor.cli_store import CliError, schema_message, url_origin
    from monitor.store import SchemaOutOfDate, StoreError

    try:
        return int(args.func(args))
    except (CliError, SchemaOutOfDate, StoreError, SQLAlchemyError) as error:
        if args.verbose:
            traceback.print_exc(file=sys.stderr)
        origin = url_origin(args)
        if isinstance(error, SchemaOutOfDate):
            message = schema_message(error, origin)
        elif isinstance(error, SQLAlchemyError):
            reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
            message = f"database error ({reason}); check the database that {origin} names"
        else:
            message = str(error)
        print(f"apmon: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `apmon ... | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
