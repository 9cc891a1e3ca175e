#!/bin/sh
# apmon service start-up: wait for the database, then run the migrations (one-off step) or serve.
#
#   start.sh migrate   wait for the database, `apmon db upgrade`, exit
#   start.sh serve     wait for the database, `apmon serve` (refuses an out-of-date schema)
#   start.sh all       both, for a single-container setup
#
# Settings come from the environment: APMON_DATABASE_URL (required), APMON_HOST (0.0.0.0),
# APMON_PORT (8000), APMON_WORKERS (2), APMON_DB_WAIT_SECONDS (60), MLFLOW_TRACKING_URI, and
# every other APMON_* setting of monitor/settings.py.
set -eu

: "${APMON_DATABASE_URL:?APMON_DATABASE_URL must name the apmon database}"
PYTHON="${APMON_PYTHON:-python}"

wait_for_database() {
    "$PYTHON" - <<'PY'
import logging, os, sys, time
from sqlalchemy import text
from monitor.store import make_engine

deadline = time.monotonic() + float(os.environ.get("APMON_DB_WAIT_SECONDS", "60"))
engine = make_engine(os.environ["APMON_DATABASE_URL"])
where = engine.url.render_as_string(hide_password=True)
while True:
    try:
        with engine.connect() as connection:
            connection.execute(text("select 1"))
        break
    except Exception as error:
        if time.monotonic() > deadline:
            sys.exit(f"start.sh: database {where} not reachable: {error}")
        time.sleep(1)
print(f"start.sh: database {where} is up", file=sys.stderr)
PY
}

serve() {
    exec "$PYTHON" -m monitor.cli serve \
        --host "${APMON_HOST:-0.0.0.0}" \
        --port "${APMON_PORT:-8000}" \
        --workers "${APMON_WORKERS:-2}"
}

case "${1:-serve}" in
    migrate)
        wait_for_database
        "$PYTHON" -m monitor.cli db upgrade
        ;;
    serve)
        wait_for_database
        serve
        ;;
    all)
        wait_for_database
        "$PYTHON" -m monitor.cli db upgrade
        serve
        ;;
    *)
        echo "usage: start.sh [migrate|serve|all]" >&2
        exit 64
        ;;
esac
