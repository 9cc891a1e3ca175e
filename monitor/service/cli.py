"""``apmon serve`` and ``apmon tokens create``: the service's subcommands of the apmon CLI."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from monitor.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    if getattr(args, "database_url", None):
        # Workers build their own Settings from the environment: pass the flag on through it.
        os.environ["APMON_DATABASE_URL"] = args.database_url
    return Settings()


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the service under uvicorn with ``--workers`` processes."""
    import uvicorn

    from monitor.store import make_engine, require_current_schema

    settings = _settings(args)
    # Refuse an out-of-date schema here, once, with the command that fixes it.
    engine = make_engine(settings.database_url)
    require_current_schema(engine)
    engine.dispose()
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers must share metric files so that any of them reports the service's totals.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="apmon-metrics-")
    # The service has its own MLflow retry loop; MLflow's long built-in one would only delay it.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uvicorn.run(
        "monitor.service.app:app_from_environment",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
    )
    return 0


def cmd_tokens_create(args: argparse.Namespace) -> int:
    """Create an API token for a project (the project is created when new); print it once."""
    from monitor.store import open_store

    store = open_store(_settings(args).database_url)
    token = store.create_token(args.project, label=args.label)
    print(token)
    print(
        f"token for project {args.project!r}: it is shown once and stored only as a hash",
        file=sys.stderr,
    )
    return 0


def cmd_errors(args: argparse.Namespace) -> int:
    """Print a run's recorded failures and its quarantined batches; exit 1 when there are any."""
    from monitor.cli_store import open_existing_store, resolve_run, url_origin

    store = open_existing_store(_settings(args).database_url, url_origin(args))  # never creates
    run_id = resolve_run(store, args.run_id).id  # a unique prefix will do; unknown: exit 2
    errors = store.errors(run_id)
    quarantined = store.quarantined_batches(run_id)
    for source, step, error in errors:
        last_line = (
            error.strip().splitlines()[-1] if error.strip() else ""
        )  # a traceback ends in its message
        print(f"step {step:>8}  {source:<24} {last_line}")
    for stream, seq, _ in quarantined:
        print(f"quarantined batch {stream}/{seq} (its payload is kept in ingest_batches)")
    if not errors and not quarantined:
        print(f"run {run_id}: no errors", file=sys.stderr)
    return 1 if errors or quarantined else 0


def register_service_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> None:
    """Add ``serve`` and ``tokens create`` to the apmon command's subparsers."""
    serve = commands.add_parser(
        "serve",
        help="run the monitoring service (FastAPI under uvicorn)",
        description="Serve the apmon REST API (/api/v1, docs at /docs) on the database of "
        "APMON_DATABASE_URL, which must be at the current schema (apmon db upgrade).",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    serve.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--database-url", help="SQLAlchemy URL (default APMON_DATABASE_URL)")
    serve.set_defaults(func=cmd_serve)

    tokens = commands.add_parser("tokens", help="API tokens of the service")
    actions = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="create a token for a project and print it")
    create.add_argument("--project", required=True, help="project name (created when new)")
    create.add_argument("--label", default="", help="a note on what the token is for")
    create.add_argument("--database-url", help="SQLAlchemy URL (default APMON_DATABASE_URL)")
    create.set_defaults(func=cmd_tokens_create)

    errors = commands.add_parser(
        "errors",
        help="a run's recorded failures: plugins that raised, quarantined batches, client losses",
        description="List what went wrong in a run: plugin errors, ingest batches that could "
        "not be processed when their turn came (quarantined: the run went on without them) and "
        "records the client reported dropped. Exit status 1 when there is any.",
    )
    errors.add_argument("run_id", help="run id")
    errors.add_argument("--database-url", help="SQLAlchemy URL (default APMON_DATABASE_URL)")
    errors.set_defaults(func=cmd_errors)
