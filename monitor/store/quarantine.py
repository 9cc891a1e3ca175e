"""Failures of a run: batches set aside (quarantined) and errors of plugins, ingest and client."""

from __future__ import annotations

from sqlalchemy import select, update

from monitor.schema import MAX_INT
from monitor.store.contract import NotFound
from monitor.store.models import IngestBatchRow, PluginErrorRow
from monitor.store.session import SqlBase


class Quarantine(SqlBase):
    """Quarantined batches and recorded processing failures."""

    def record_error(self, run_id: str, source: str, step: int, error: str) -> None:
        """Record a processing failure (a plugin, or ``source`` such as the ingest itself).

        The step is clamped into the column's range and the text made storable, so recording a
        failure caused by bad input cannot fail on that same input.
        """
        step = min(max(step, -1), MAX_INT)
        with self._session("record error") as session:
            session.add(
                PluginErrorRow(
                    run_id=run_id, plugin=source[:128], step=step, error=storable_text(error)
                )
            )

    def quarantine_batch(self, run_id: str, stream: str, seq: int, error: str) -> None:
        """Set a batch aside: done, never processed, its payload kept and ``error`` saying why."""
        with self._session(f"quarantine batch {stream}/{seq}") as session:
            marked = session.execute(
                update(IngestBatchRow)
                .where(
                    IngestBatchRow.run_id == run_id,
                    IngestBatchRow.stream == stream,
                    IngestBatchRow.seq == seq,
                )
                .values(processed=True, error=storable_text(error))
            )
            if marked.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"run {run_id!r} has no batch {stream}/{seq}")

    def quarantined_batches(self, run_id: str) -> list[tuple[str, int, str]]:
        """The run's quarantined batches as (stream, seq, error), in stream and seq order."""
        with self._session("read quarantined batches") as session:
            return [
                (stream, seq, error or "")
                for stream, seq, error in session.execute(
                    select(IngestBatchRow.stream, IngestBatchRow.seq, IngestBatchRow.error)
                    .where(IngestBatchRow.run_id == run_id, IngestBatchRow.error.is_not(None))
                    .order_by(IngestBatchRow.stream, IngestBatchRow.seq)
                )
            ]

    def errors(self, run_id: str) -> list[tuple[str, int, str]]:
        """Recorded processing failures of a run as (source, step, error), oldest first."""
        with self._session("read errors") as session:
            return [
                (r.plugin, r.step, r.error)
                for r in session.scalars(
                    select(PluginErrorRow)
                    .where(PluginErrorRow.run_id == run_id)
                    .order_by(PluginErrorRow.id)
                )
            ]


def storable_text(text: str) -> str:
    """``text`` with what a database cannot keep (NUL, lone surrogates) replaced."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
