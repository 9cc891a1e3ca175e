#!/usr/bin/env bash
# The test command: set up (idempotent), run the suite, check PostgreSQL is left clean, lint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
before="$(python scripts/postgres_inventory.py)"
python -m pytest -q -p no:cacheprovider "$@"
after="$(python scripts/postgres_inventory.py)"
if [ "$before" != "$after" ]; then
    echo "the test run left tables or rows behind in PostgreSQL:" >&2
    diff <(echo "$before") <(echo "$after") >&2 || true
    exit 1
fi
ruff check .
mypy
