"""Ingest: validate a batch, keep it once, and feed every batch whose turn has come to plugins.

All of it happens in one transaction that holds the run's row lock.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import DataError, IntegrityError

from monitor.host import PluginHost
from monitor.measures import PluginRegistry
from monitor.schema import AlertValue, IngestBatch, ProbeRecord, SiteInfo, StepSummary
from monitor.store import NotFound, SqlStore, StoreError
from monitor.store.store import PluginOutcome

logger = logging.getLogger(__name__)

INGEST_SOURCE = "apmon.ingest"  # how ingest failures are named among plugin errors
CLIENT_SOURCE = "apmon.client"  # losses the client reported


class BadBatch(ValueError):
    """The batch contradicts what the service knows (unknown site, repeated step, ...)."""


class RunClosed(RuntimeError):
    """The run is finished and takes no more records."""


class Conflict(ValueError):
    """A batch under a (run, stream, seq) that was received before with other content."""


class _Poisoned(Exception):
    """A batch that waited for its turn cannot be processed; its transaction is rolled back."""

    def __init__(self, stream: str, seq: int, step: int, error: Exception) -> None:
        super().__init__(f"batch {stream}/{seq} cannot be processed: {error}")
        self.stream, self.seq, self.step, self.error = stream, seq, step, error


MAX_POISONED = 1000  # bound on set-aside batches per request (each costs one transaction)


def batch_digest(batch: IngestBatch) -> str:
    """SHA-256 of the batch as parsed: a resend of the same batch has the same digest."""
    return hashlib.sha256(batch.model_dump_json().encode()).hexdigest()


def _input_fault(error: Exception) -> bool:
    """Whether processing failed because of the batch, not because the database is away.

    Validation and consistency errors, and the database refusing a value or a duplicate, are the
    input's; a lost connection or any other database error is the server's (a retry may pass).
    """
    if isinstance(error, (BadBatch, ValidationError, NotFound)):
        return True
    return isinstance(error, StoreError) and isinstance(
        error.__cause__, (IntegrityError, DataError)
    )


@dataclass
class Processed:
    """What one locked transaction did; handed to the sinks once it has committed."""

    run_id: str
    mlflow_run_id: str | None
    outcomes: list[tuple[int, PluginOutcome]] = field(default_factory=list)
    batches: list[tuple[str, int]] = field(default_factory=list)
    site_summaries: int = 0
    step_summaries: int = 0
    finished: bool = False

    @property
    def alerts(self) -> list[AlertValue]:
        """Alerts the plugins raised (after cool-down), in processing order."""
        return [alert for _, outcome in self.outcomes for _, alert in outcome.alerts]


@dataclass
class IngestResult:
    """The answer to one ingest call."""

    duplicate: bool
    processed: Processed
    pending: int


Committed = Callable[[Processed], None]
_T = TypeVar("_T")


class Ingestor:
    """Runs the ingest protocol against a store; knows nothing about HTTP.

    A batch is stored and processed in the same transaction, so a worker killed mid-ingest leaves
    nothing behind and the client's retry does the work again. Batches that arrive ahead of their
    turn wait in ``ingest_batches`` until the missing ones come (or the run finishes), so plugins
    see each stream's records in the order the client sent them.
    """

    def __init__(
        self,
        store: SqlStore,
        registry: PluginRegistry,
        alert_cooldown_steps: int,
        on_committed: Sequence[Committed] = (),
    ) -> None:
        self._store = store
        self._registry = registry
        self._cooldown = alert_cooldown_steps
        self._on_committed = list(on_committed)

    def ingest(self, project: str, run_id: str, batch: IngestBatch) -> IngestResult:
        """Keep the batch once per (run, stream, seq) and process every batch that is ready.

        Raises NotFound (unknown run or another project's), RunClosed, or BadBatch; on any of
        them nothing is stored.
        """
        return self._retrying(run_id, lambda: self._ingest(project, run_id, batch))

    def _retrying(self, run_id: str, attempt: Callable[[], _T]) -> _T:
        """Run ``attempt``, quarantining waiting batches that turn out unprocessable.

        Such a batch is marked done with its error (its payload kept) and the error is listed
        among the run's errors, in a transaction of its own; then the attempt is made again, so
        one bad batch never holds up the batches after it.
        """
        for _ in range(MAX_POISONED):
            try:
                return attempt()
            except _Poisoned as poisoned:
                message = f"{poisoned}; quarantined, the run goes on without it"
                logger.warning("run %s: %s", run_id, message)
                with self._store.locked_run(run_id) as locked:
                    locked.quarantine_batch(run_id, poisoned.stream, poisoned.seq, message)
                    locked.record_error(run_id, INGEST_SOURCE, poisoned.step, message)
        raise StoreError(f"run {run_id!r}: too many unprocessable batches")

    def _ingest(self, project: str, run_id: str, batch: IngestBatch) -> IngestResult:
        digest = batch_digest(batch)
        with self._store.locked_run(run_id) as locked:
            info = locked.run(run_id)
            if info.project != project:
                raise NotFound(f"no run with id {run_id!r}")
            duplicate = locked.batch_received(run_id, batch.stream, batch.seq)
            if duplicate:
                stored = locked.batch_digest(run_id, batch.stream, batch.seq)
                if stored is not None and stored != digest:
                    raise Conflict(
                        f"batch {batch.stream}/{batch.seq} was received before with other "
                        "content; a seq names one batch (send new records under a new seq)"
                    )
            else:
                if info.status != "running":
                    raise RunClosed(f"run {run_id!r} is {info.status}; it takes no more batches")
                _check_sites(locked.sites(run_id), batch, complete=False)
                locked.save_batch(run_id, batch.stream, batch.seq, payload=None, digest=digest)
            processed = Processed(run_id, info.mlflow_run_id)
            own = None if duplicate else batch
            self._drain(locked, processed, own=own, include_gaps=False)
            pending = locked.pending_batch_count(run_id)
        self._committed(processed)
        return IngestResult(duplicate=duplicate, processed=processed, pending=pending)

    def finish(
        self, project: str, run_id: str, final_step: int, dropped_records: int = 0
    ) -> Processed:
        """Process every waiting batch, run the end-of-run plugins and close the run.

        Seqs that never came are skipped. ``dropped_records``, the client's count of records it
        had to drop (its spool was full), is listed among the run's errors. Finishing a finished
        run does nothing.
        """
        return self._retrying(
            run_id, lambda: self._finish(project, run_id, final_step, dropped_records)
        )

    def _finish(
        self, project: str, run_id: str, final_step: int, dropped_records: int
    ) -> Processed:
        with self._store.locked_run(run_id) as locked:
            info = locked.run(run_id)
            if info.project != project:
                raise NotFound(f"no run with id {run_id!r}")
            processed = Processed(run_id, info.mlflow_run_id)
            if info.status != "running":
                return processed
            self._drain(locked, processed, own=None, include_gaps=True)
            host = self._host(locked)
            processed.outcomes.append((final_step, host.finish(run_id, final_step)))
            if dropped_records:
                locked.record_error(
                    run_id,
                    CLIENT_SOURCE,
                    final_step,
                    f"the client dropped {dropped_records} records: its spool directory could "
                    "not be written and its memory buffer was full",
                )
            processed.finished = True
        self._committed(processed)
        return processed

    def drain(self, run_id: str) -> Processed:
        """Process whatever batches of the run are ready (a sweep after a worker died)."""
        return self._retrying(run_id, lambda: self._drain_only(run_id))

    def _drain_only(self, run_id: str) -> Processed:
        with self._store.locked_run(run_id) as locked:
            processed = Processed(run_id, locked.run(run_id).mlflow_run_id)
            self._drain(locked, processed, own=None, include_gaps=False)
        self._committed(processed)
        return processed

    def _host(self, locked: SqlStore) -> PluginHost:
        return PluginHost(self._registry, locked, alert_cooldown_steps=self._cooldown)

    def _drain(
        self,
        locked: SqlStore,
        processed: Processed,
        own: IngestBatch | None,
        include_gaps: bool,
    ) -> None:
        """Process every batch whose turn has come, in order.

        ``own`` is this request's new batch, recorded without its payload: processed from memory
        when its turn has come, else its payload is stored to wait. One pass suffices: the ready
        batches are contiguous, so nothing else can become ready within this transaction.
        """
        run_id = processed.run_id
        host = self._host(locked)
        ready = locked.ready_batches(run_id, include_gaps=include_gaps)
        own_key = None if own is None else (own.stream, own.seq)
        if own is not None and own_key not in {(stream, seq) for stream, seq, _ in ready}:
            locked.keep_batch_payload(run_id, own.stream, own.seq, own.model_dump(mode="json"))
        for stream, seq, payload in ready:
            is_own = (stream, seq) == own_key
            last_step = -1
            try:
                if is_own and own is not None:
                    batch = own
                else:
                    batch = IngestBatch.model_validate(payload or {"seq": seq, "stream": stream})
                records = _in_step_order(batch)
                last_step = max((r.step for r in records), default=-1)
                # Sites are checked and announced when the batch's turn comes, so a batch that
                # arrives before the one announcing its sites waits like any early batch.
                _check_sites(locked.sites(run_id), batch, complete=True)
                if batch.sites:
                    locked.add_sites(run_id, batch.sites)
                outcomes: list[tuple[int, PluginOutcome]] = []
                for record in records:
                    if isinstance(record, StepSummary):
                        outcomes.append((record.step, host.handle_summary(run_id, record)))
                    else:
                        outcomes.append((record.step, host.handle_probe(run_id, record)))
            except Exception as error:
                # A store error has rolled the whole transaction back by now.
                if not _input_fault(error):
                    raise
                if is_own:
                    if isinstance(error, BadBatch):
                        raise
                    raise BadBatch(f"batch {stream}/{seq} cannot be stored: {error}") from error
                # A batch that waited for its turn and then fails is quarantined, not retried
                # forever: it would block every later batch of its stream.
                raise _Poisoned(stream, seq, max(last_step, 0), error) from error
            locked.mark_batch_processed(run_id, stream, seq, last_step)
            processed.outcomes += outcomes
            processed.batches.append((stream, seq))
            processed.step_summaries += len(batch.summaries)
            processed.site_summaries += sum(len(s.sites) for s in batch.summaries)

    def _committed(self, processed: Processed) -> None:
        for listener in self._on_committed:
            try:
                listener(processed)
            except Exception:
                logger.exception("post-commit listener %r failed", listener)


def _in_step_order(batch: IngestBatch) -> list[StepSummary | ProbeRecord]:
    """Records in step order; at one step the summary comes before the probes."""
    keyed: list[tuple[int, int, int, StepSummary | ProbeRecord]] = [
        (s.step, 0, i, s) for i, s in enumerate(batch.summaries)
    ] + [(p.step, 1, i, p) for i, p in enumerate(batch.probes)]
    return [record for *_, record in sorted(keyed, key=lambda k: k[:3])]


def _check_sites(known: dict[str, SiteInfo], batch: IngestBatch, complete: bool) -> None:
    """Refuse a batch that redefines a site, repeats a step or lists a site twice in a step.

    With ``complete`` (when the batch's turn has come, so every site it may use has been
    announced) also one that names a site nobody announced or whose ``unit_on`` does not match
    its site; on arrival, sites not yet known are left for then.
    """
    sites = dict(known)
    for site in batch.sites:
        old = sites.get(site.name)
        if old is not None and old != site:
            raise BadBatch(
                f"site {site.name!r} was announced as {old.kind}/{old.mode} with {old.units} "
                f"units; this batch says {site.kind}/{site.mode} with {site.units}"
            )
        sites[site.name] = site
    seen: set[tuple[str, int]] = set()
    for summary in batch.summaries:
        if (summary.source, summary.step) in seen:
            raise BadBatch(f"step {summary.step} ({summary.source}) appears twice in the batch")
        seen.add((summary.source, summary.step))
        names = [s.site for s in summary.sites]
        if len(set(names)) != len(names):
            raise BadBatch(f"step {summary.step} lists a site twice")
        for site_summary in summary.sites:
            info = sites.get(site_summary.site)
            if info is None:
                if not complete:
                    continue
                raise BadBatch(
                    f"step {summary.step} names site {site_summary.site!r}, which was never "
                    "announced (send it in this batch's 'sites' or at run start)"
                )
            if site_summary.unit_on and len(site_summary.unit_on) != info.units:
                raise BadBatch(
                    f"step {summary.step} site {site_summary.site!r}: unit_on has "
                    f"{len(site_summary.unit_on)} entries for {info.units} units"
                )
    for probe in batch.probes:
        for site_probe in probe.sites:
            if complete and site_probe.site not in sites:
                raise BadBatch(
                    f"probe at step {probe.step} names site {site_probe.site!r}, which was "
                    "never announced"
                )
