"""Bulk inserts: SQLite's executemany path stores exactly what SQLAlchemy's Core insert stores."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from monitor.schema import RunStart
from monitor.store import SqlStore, make_engine, upgrade
from monitor.store.bulk import insert_many
from monitor.store.models import MeasureRow, StepRow


def test_sqlite_rows_are_those_of_a_core_insert(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    SqlStore(engine).create_run("p", RunStart(name="r", sites=[]), run_id="run")
    steps = [
        {"run_id": "run", "step": s, "source": "", "loss": loss, "sample_indices": indices}
        for s, (loss, indices) in enumerate([(0.5, [3, 1]), (None, None), (float("inf"), [])])
    ]
    measures = [
        {
            "run_id": "run",
            "site_id": None,
            "step": s,
            "source": "train",
            "name": "entropy_mean",
            "value": value,
            "plugin": "entropy",
            "plugin_version": "1.0",
        }
        for s, value in enumerate([0.25, -1e300, 7.0])
    ]
    with Session(engine) as session, session.begin():
        insert_many(session, StepRow, [{**row, "source": "fast"} for row in steps])
        session.execute(StepRow.__table__.insert(), [{**row, "source": "core"} for row in steps])
        insert_many(session, MeasureRow, [{**row, "source": "fast"} for row in measures])
        session.execute(
            MeasureRow.__table__.insert(), [{**row, "source": "core"} for row in measures]
        )
    with engine.connect() as connection:

        def stored(table: str, columns: str, source: str) -> list[tuple[object, ...]]:
            query = f"SELECT {columns} FROM {table} WHERE source = :s ORDER BY step"
            return [tuple(r) for r in connection.execute(text(query), {"s": source})]

        fast = stored("steps", "step, loss, sample_indices", "fast")
        assert fast == stored("steps", "step, loss, sample_indices", "core")
        assert fast == [(0, 0.5, "[3, 1]"), (1, None, "null"), (2, float("inf"), "[]")]
        columns = "step, site_id, name, value, plugin, plugin_version"
        fast = stored("measures", columns, "fast")
        assert fast == stored("measures", columns, "core") and len(fast) == 3
    engine.dispose()
