"""Bulk inserts: many rows of one table in one statement.

PostgreSQL: unnest arrays; SQLite: the DB-API's executemany on tuples.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Callable
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
    table = model.__table__
    names = tuple(rows[0])
    if dialect.name == "sqlite":
        # The DB-API's executemany on tuples, with the columns' own bind processors (JSON,
        # dates): SQLAlchemy's per-row parameter handling cost more than SQLite's insert, about
        # 10 us of the embedded host's time per row, a dozen rows per training step.
        sql, processors = sqlite_insert(table, names, dialect)
        get = operator.itemgetter(*names)
        values = [get(row) for row in rows] if len(names) > 1 else [(get(r),) for r in rows]
        if processors:
            values = [_processed(row, processors) for row in values]
        session.connection().exec_driver_sql(sql, values)
        return
    if dialect.name != "postgresql":
        # The table's Core insert, not the ORM's bulk path: the same executemany for a
        # fraction of the Python work per row.
        session.execute(table.insert(), rows)
        return
    params: dict[str, Any] = {}
    for name in names:
        values = [row[name] for row in rows]
        # A JSON column goes as one JSON array: as elements of a text array every quote in
        # the documents would be escaped, one regex substitution each, on the client.
        params[name] = json.dumps(values) if isinstance(table.c[name].type, JSON) else values
    session.execute(unnest_insert(table, names, dialect), params)


Processors = tuple[tuple[int, Callable[[Any], Any]], ...]


@functools.lru_cache(maxsize=64)
def sqlite_insert(table: Table, names: tuple[str, ...], dialect: Dialect) -> tuple[str, Processors]:
    """``INSERT INTO t (names) VALUES (?, ...)`` and the columns' bind processors, built once.

    Only the columns that have a processor (JSON, dates) are listed, by position.
    """
    columns = ", ".join(names)
    marks = ", ".join("?" for _ in names)
    processors = tuple(
        (i, processor)
        for i, name in enumerate(names)
        if (processor := table.c[name].type.bind_processor(dialect)) is not None
    )
    return f"INSERT INTO {table.name} ({columns}) VALUES ({marks})", processors


def _processed(row: tuple[Any, ...], processors: Processors) -> tuple[Any, ...]:
    values = list(row)
    for i, processor in processors:
        values[i] = processor(values[i])  # None too: JSON stores it as 'null', as Core does
    return tuple(values)


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
