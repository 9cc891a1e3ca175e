"""The ingest queue: received batches, their order, and the run lock that serialises processing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, Transaction, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from typing_extensions import Self

from monitor.store.contract import NotFound, StoreError
from monitor.store.entities import RunInfo
from monitor.store.models import IngestBatchRow, ProjectRow, RunRow
from monitor.store.session import SqlBase


class IngestQueue(SqlBase):
    """Received batches: once per (run, stream, seq), waiting for their turn."""

    def claim_batch(self, run_id: str, stream: str, seq: int, payload: dict[str, Any]) -> bool:
        """Record a batch as received; False when (run, stream, seq) was already received."""
        try:
            with self._session("claim batch") as session:
                self._run_row(session, run_id)
                session.add(IngestBatchRow(run_id=run_id, stream=stream, seq=seq, payload=payload))
        except StoreError as error:
            if isinstance(error.__cause__, IntegrityError):
                return False
            raise
        return True

    @contextmanager
    def locked_run(self, run_id: str) -> Iterator[Self]:
        """One transaction that holds the run's row lock; yields a store bound to it.

        Every write made through the yielded store commits together when the block ends, or not
        at all. On PostgreSQL the lock is ``SELECT ... FOR NO KEY UPDATE`` (it serialises the
        workers that process one run but, unlike FOR UPDATE, does not block other runs' or this
        run's foreign-key checks); on SQLite a no-op UPDATE takes the database write lock first
        thing, so the transaction never has to upgrade a stale read snapshot. Raises NotFound
        when the run does not exist.
        """
        transaction: Transaction
        if isinstance(self._bind, Engine):
            connection, own = self._bind.connect(), True
            transaction = connection.begin()
        else:
            connection, own = self._bind, False
            transaction = connection.begin_nested()
        try:
            try:
                if connection.dialect.name == "sqlite":
                    connection.execute(
                        update(RunRow)
                        .where(RunRow.id == run_id)
                        .values(processed_step=RunRow.processed_step)
                    )
                found = connection.execute(
                    select(
                        RunRow.id,
                        ProjectRow.name,
                        RunRow.name,
                        RunRow.status,
                        RunRow.mlflow_run_id,
                        RunRow.created_at,
                        RunRow.finished_at,
                        RunRow.config,
                    )
                    .join(ProjectRow, ProjectRow.id == RunRow.project_id)
                    .where(RunRow.id == run_id)
                    .with_for_update(of=RunRow, key_share=True)
                ).first()
                if found is None:
                    raise NotFound(f"no run with id {run_id!r}")
                locked = type(self)(connection, savepoints=False)
                locked._run_cache[run_id] = RunInfo(
                    id=found[0],
                    project=found[1],
                    name=found[2],
                    status=found[3],
                    mlflow_run_id=found[4],
                    created_at=found[5],
                    finished_at=found[6],
                    config=dict(found[7] or {}),
                )
                yield locked
                transaction.commit()
            except BaseException:
                if transaction.is_active:
                    transaction.rollback()
                raise
        except SQLAlchemyError as error:
            raise StoreError(f"run {run_id!r}: database error ({error})") from error
        finally:
            if own:
                connection.close()

    def batch_received(self, run_id: str, stream: str, seq: int) -> bool:
        """Whether (run, stream, seq) was received before."""
        with self._session("read batch") as session:
            return session.get(IngestBatchRow, (run_id, stream, seq)) is not None

    def batch_digest(self, run_id: str, stream: str, seq: int) -> str | None:
        """The digest (run, stream, seq) was received with; None if unknown or never recorded."""
        with self._session("read batch digest") as session:
            return session.scalar(
                select(IngestBatchRow.digest).where(
                    IngestBatchRow.run_id == run_id,
                    IngestBatchRow.stream == stream,
                    IngestBatchRow.seq == seq,
                )
            )

    def save_batch(
        self,
        run_id: str,
        stream: str,
        seq: int,
        payload: dict[str, Any] | None,
        digest: str | None = None,
    ) -> None:
        """Record a received batch.

        ``payload`` keeps it until its turn comes (see ``ready_batches``); None when the caller
        processes it in this same transaction. ``digest`` identifies its content, so that a later
        batch under the same seq can be told a retry or a conflict.
        """
        with self._session(f"save batch {stream}/{seq}") as session:
            session.add(
                IngestBatchRow(
                    run_id=run_id, stream=stream, seq=seq, payload=payload, digest=digest
                )
            )

    def keep_batch_payload(
        self, run_id: str, stream: str, seq: int, payload: dict[str, Any]
    ) -> None:
        """Store the payload of a recorded batch that has to wait for its turn."""
        with self._session(f"keep batch {stream}/{seq}") as session:
            session.execute(
                update(IngestBatchRow)
                .where(
                    IngestBatchRow.run_id == run_id,
                    IngestBatchRow.stream == stream,
                    IngestBatchRow.seq == seq,
                )
                .values(payload=payload)
            )

    def ready_batches(
        self, run_id: str, include_gaps: bool = False
    ) -> list[tuple[str, int, dict[str, Any] | None]]:
        """Unprocessed batches whose turn has come, as (stream, seq, payload), in order.

        A batch's turn comes when every lower seq of its stream has been processed, so the
        plugins see a stream's records in the order the client sent them however the batches
        arrived. ``include_gaps`` (at the end of a run) returns every unprocessed batch in seq
        order, skipping seqs that never arrived.
        """
        with self._session("read pending batches") as session:
            done = dict(
                session.execute(
                    select(IngestBatchRow.stream, func.max(IngestBatchRow.seq))
                    .where(IngestBatchRow.run_id == run_id, IngestBatchRow.processed.is_(True))
                    .group_by(IngestBatchRow.stream)
                ).all()
            )
            pending = session.execute(
                select(IngestBatchRow.stream, IngestBatchRow.seq, IngestBatchRow.payload)
                .where(IngestBatchRow.run_id == run_id, IngestBatchRow.processed.is_(False))
                .order_by(IngestBatchRow.stream, IngestBatchRow.seq)
            ).all()
            first: dict[str, int] = {}
            for stream, seq, _ in pending:
                first.setdefault(stream, seq)
            # Per stream with waiting batches: whether every seq below its first waiting one is
            # done, and which seqs above it are (quarantined out of turn, usually none). When
            # the highest done seq is not right below, the count is not needed.
            done_below: dict[str, bool] = {}
            done_above: dict[str, set[int]] = {}
            for stream, seq in first.items():
                top = done.get(stream, -1)
                if seq > top + 1:
                    done_below[stream], done_above[stream] = False, set()
                    continue
                processed = (
                    IngestBatchRow.run_id == run_id,
                    IngestBatchRow.stream == stream,
                    IngestBatchRow.processed.is_(True),
                )
                below = session.scalar(
                    select(func.count())
                    .select_from(IngestBatchRow)
                    .where(*processed, IngestBatchRow.seq < seq)
                )
                done_below[stream] = below == seq
                done_above[stream] = (
                    set()
                    if seq > top
                    else set(
                        session.scalars(
                            select(IngestBatchRow.seq).where(*processed, IngestBatchRow.seq > seq)
                        )
                    )
                )
        ready: list[tuple[str, int, dict[str, Any] | None]] = []
        expected: dict[str, int | None] = {
            stream: seq if done_below[stream] else None for stream, seq in first.items()
        }
        for stream, seq, payload in pending:
            following = expected[stream]
            if following is not None:
                while following in done_above[stream]:
                    following += 1
            if following != seq and not include_gaps:
                expected[stream] = None  # a gap: nothing later in this stream is ready yet
                continue
            expected[stream] = seq + 1
            ready.append((stream, seq, None if payload is None else dict(payload)))
        return ready

    def mark_batch_processed(self, run_id: str, stream: str, seq: int, last_step: int) -> None:
        """Mark a batch done, drop its payload, and advance the run's processed step."""
        with self._session(f"mark batch {stream}/{seq}") as session:
            marked = session.execute(
                update(IngestBatchRow)
                .where(
                    IngestBatchRow.run_id == run_id,
                    IngestBatchRow.stream == stream,
                    IngestBatchRow.seq == seq,
                )
                .values(processed=True, payload=None)
            )
            if marked.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFound(f"run {run_id!r} has no batch {stream}/{seq}")
            session.execute(
                update(RunRow)
                .where(RunRow.id == run_id, RunRow.processed_step < last_step)
                .values(processed_step=last_step)
            )

    def pending_batch_count(self, run_id: str | None = None) -> int:
        """Received batches not yet processed (of one run, or of all runs)."""
        with self._session("count pending batches") as session:
            query = select(func.count()).where(IngestBatchRow.processed.is_(False))
            if run_id is not None:
                query = query.where(IngestBatchRow.run_id == run_id)
            return int(session.scalar(query.select_from(IngestBatchRow)) or 0)

    def runs_with_pending_batches(self) -> list[str]:
        """Ids of runs that have received batches not yet processed."""
        with self._session("list runs with pending batches") as session:
            return list(
                session.scalars(
                    select(IngestBatchRow.run_id)
                    .where(IngestBatchRow.processed.is_(False))
                    .distinct()
                )
            )
