"""The CLI's way to the database: read-only opening, one-line errors, run-id prefixes, JSON.

Read-only commands never create a database: a SQLite file that is not there is an error that
says so, not an empty ``apmon.db`` followed by "run apmon db upgrade".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from monitor.store.entities import RunInfo
from monitor.store.store import SqlStore

DEFAULT_URL = "sqlite:///apmon.db"


class CliError(RuntimeError):
    """A problem the user can fix; printed as one line (the traceback only with -v)."""


def url_origin(args: argparse.Namespace) -> str:
    """Where the database URL came from, as the user wrote it: flag, variable or default."""
    if getattr(args, "database_url", None):
        return "--database-url"
    if os.environ.get("APMON_DATABASE_URL"):
        return "APMON_DATABASE_URL"
    return f"the default {DEFAULT_URL}"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for an in-memory database or another dialect)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def open_existing_store(url: str, origin: str) -> SqlStore:
    """Open the store at ``url`` for reading; CliError when it is missing, unreachable or old."""
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    from monitor.store import SchemaOutOfDate, make_engine, require_current_schema

    try:
        sqlite_file = sqlite_path(url)
    except ArgumentError as error:
        raise CliError(f"{url!r} from {origin} is not a database URL ({error})") from error
    if sqlite_file is not None and not sqlite_file.is_file():
        raise CliError(
            f"no apmon database at {sqlite_file.resolve()} (from {origin}); run a monitored job "
            "here first, or point --database-url or APMON_DATABASE_URL at its database"
        )
    try:
        engine = make_engine(url)
        require_current_schema(engine)
    except SchemaOutOfDate as error:
        raise CliError(schema_message(error, origin)) from error
    except ArgumentError as error:  # also a dialect or driver that is not installed
        raise CliError(f"{url!r} from {origin} is not a usable database URL ({error})") from error
    except SQLAlchemyError as error:
        raise CliError(
            f"cannot reach the apmon database {_where(url)} (from {origin}): "
            f"{_first_line(error)}; check that it runs and that {origin} is right"
        ) from error
    return SqlStore(engine)


def check_sqlite_folder(url: str, origin: str) -> None:
    """CliError when a SQLite URL names a file in a folder that does not exist."""
    from sqlalchemy.exc import ArgumentError

    try:
        sqlite_file = sqlite_path(url)
    except ArgumentError as error:
        raise CliError(f"{url!r} from {origin} is not a database URL ({error})") from error
    if sqlite_file is not None and not sqlite_file.parent.is_dir():
        raise CliError(
            f"the folder {sqlite_file.parent} of the SQLite database (from {origin}) does not "
            "exist; create it or choose another path"
        )


def schema_message(error: Exception, origin: str) -> str:
    """The out-of-date schema message, naming the flag or variable the user actually used."""
    text = str(error)
    if origin == "--database-url":
        return text.replace("with the same APMON_DATABASE_URL", "with the same --database-url")
    return text


def _where(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _first_line(error: Exception) -> str:
    cause = getattr(error, "orig", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[0] if lines else type(cause).__name__


def resolve_run(store: SqlStore, run_id: str) -> RunInfo:
    """The run whose id is ``run_id`` or, failing that, the one run whose id starts with it."""
    from monitor.store import NotFound

    try:
        return store.run(run_id)
    except NotFound:
        pass
    matches = [run for run in store.runs() if run.id.startswith(run_id)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CliError(f"no run {run_id!r} in this database (see `apmon runs list`)")
    shown = ", ".join(run.id[:12] for run in matches[:5])
    raise CliError(f"{len(matches)} runs start with {run_id!r} ({shown}...); give more of the id")


def print_json(value: Any) -> None:
    """Write ``value`` (dataclasses and datetimes included) as JSON to stdout."""

    def plain(item: Any) -> Any:
        if is_dataclass(item) and not isinstance(item, type):
            return asdict(item)
        if isinstance(item, datetime):
            return item.isoformat()
        return str(item)

    json.dump(value, sys.stdout, indent=1, default=plain)
    sys.stdout.write("\n")
