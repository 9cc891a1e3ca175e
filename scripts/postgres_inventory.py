"""Print each schema, table and row count of the test PostgreSQL database, to diff them."""

from __future__ import annotations

import os
import sys

from sqlalchemy import create_engine, inspect, text

URL = os.environ.get("APMON_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def main() -> int:
    try:
        engine = create_engine(URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            inspector = inspect(connection)
            for schema in sorted(inspector.get_schema_names()):
                if schema in ("information_schema",) or schema.startswith("pg_"):
                    continue
                print(f"schema {schema}")
                for table in sorted(inspector.get_table_names(schema=schema)):
                    rows = connection.execute(text(f'SELECT count(*) FROM "{schema}"."{table}"'))
                    print(f"  {table}: {rows.scalar()} rows")
    except Exception as error:
        print(f"postgres unavailable: {type(error).__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
