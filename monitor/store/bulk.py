"""Bulk inserts: many rows of one table in one statement (unnest arrays on PostgreSQL)."""

from __future__ import annotations

import functools
import json
from typing import Any

from sqlalchemy import JSON, Dialect, Table, TextClause, text
from sqlalchemy.orm import Session


def insert_many(session: Session, model: type[Any], rows: list[dict[str, Any]]) -> None:
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
    session.execute(unnest_insert(table, names, dialect), params)


@functools.lru_cache(maxsize=64)
def unnest_insert(table: Table, names: tuple[str, ...], dialect: Dialect) -> TextClause:
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
