"""Ingest: validate a batch, keep it once, and feed every batch whose turn has come to plugins.

All of it happens in one transaction that holds the run's row lock.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from monitor.host import PluginHost
from monitor.measures import PluginRegistry
from monitor.schema import AlertValue, IngestBatch, ProbeRecord, SiteInfo, StepSummary
from monitor.store import NotFound, SqlStore, StoreError
from monitor.store.store import PluginOutcome

logger = logging.getLogger(__name__)

INGEST_SOURCE = "apmon.ingest"  # how ingest failures are named among plugin errors


class BadBatch(ValueError):
    """The batch contradicts what the service knows (unknown site, repeated step, ...)."""


class RunClosed(RuntimeError):
    """The run is finished and takes no more records."""


class _Poisoned(Exception):
    """A batch that waited for its turn cannot be stored; its transaction is rolled back."""

    def __init__(self, stream: str, seq: int, step: int, error: StoreError) -> None:
        super().__init__(f"batch {stream}/{seq}: {error}")
        self.stream, self.seq, self.step, self.error = stream, seq, step, error


MAX_POISONED = 1000  # bound on set-aside batches per request (each costs one transaction)


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
        """Run ``attempt``, setting aside waiting batches that turn out unstorable.

        Such a batch is recorded as an ingest error and marked processed in a transaction of its
        own, and the attempt is made again.
        """
        for _ in range(MAX_POISONED):
            try:
                return attempt()
            except _Poisoned as poisoned:
                logger.warning("run %s: %s; set aside", run_id, poisoned)
                with self._store.locked_run(run_id) as locked:
                    locked.record_error(
                        run_id,
                        INGEST_SOURCE,
                        poisoned.step,
                        "".join(traceback.format_exception(poisoned.error)),
                    )
                    locked.mark_batch_processed(run_id, poisoned.stream, poisoned.seq, -1)
        raise StoreError(f"run {run_id!r}: too many unstorable batches")

    def _ingest(self, project: str, run_id: str, batch: IngestBatch) -> IngestResult:
        with self._store.locked_run(run_id) as locked:
            info = locked.run(run_id)
            if info.project != project:
                raise NotFound(f"no run with id {run_id!r}")
            duplicate = locked.batch_received(run_id, batch.stream, batch.seq)
            if not duplicate:
                if info.status != "running":
                    raise RunClosed(f"run {run_id!r} is {info.status}; it takes no more batches")
                _check_sites(locked.sites(run_id), batch)
                if batch.sites:
                    locked.add_sites(run_id, batch.sites)
                locked.save_batch(run_id, batch.stream, batch.seq, payload=None)
            processed = Processed(run_id, info.mlflow_run_id)
            own = None if duplicate else batch
            self._drain(locked, processed, own=own, include_gaps=False)
            pending = locked.pending_batch_count(run_id)
        self._committed(processed)
        return IngestResult(duplicate=duplicate, processed=processed, pending=pending)

    def finish(self, project: str, run_id: str, final_step: int) -> Processed:
        """Process every waiting batch, run the end-of-run plugins and close the run.

        Seqs that never came are skipped. Finishing a finished run does nothing.
        """
        return self._retrying(run_id, lambda: self._finish(project, run_id, final_step))

    def _finish(self, project: str, run_id: str, final_step: int) -> Processed:
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
            if (stream, seq) == own_key and own is not None:
                batch = own
            else:
                batch = IngestBatch.model_validate(payload or {"seq": seq, "stream": stream})
            records = _in_step_order(batch)
            last_step = max((r.step for r in records), default=-1)
            outcomes: list[tuple[int, PluginOutcome]] = []
            try:
                for record in records:
                    if isinstance(record, StepSummary):
                        outcomes.append((record.step, host.handle_summary(run_id, record)))
                    else:
                        outcomes.append((record.step, host.handle_probe(run_id, record)))
            except StoreError as error:
                # The store has rolled the whole transaction back by now.
                if (stream, seq) == own_key:
                    raise BadBatch(f"batch {stream}/{seq} cannot be stored: {error}") from error
                # A batch that waited for its turn and then fails is set aside, not retried
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


def _check_sites(known: dict[str, SiteInfo], batch: IngestBatch) -> None:
    """Refuse a batch that names sites nobody announced, redefines a site, or repeats a step."""
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
            if site_probe.site not in sites:
                raise BadBatch(
                    f"probe at step {probe.step} names site {site_probe.site!r}, which was "
                    "never announced"
                )
