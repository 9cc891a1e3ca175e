"""The embedded host's storage: scale-only and thinned steps, the budget, the writer thread."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import select

from monitor.host_process import RunHost
from monitor.host_writer import MAX_STRIDE, StoreBudget, StoreWriter
from monitor.schema import RunStart, SiteInfo, SiteSummary, StepSummary
from monitor.settings import Settings
from monitor.store.models import StepRow

SITE = SiteInfo(name="fc#0", kind="dense", units=2)


def full_site() -> SiteSummary:
    return SiteSummary(
        site="fc#0", rows=4, distinct=2, spectrum=[(2, 2)], unit_on=[4, 0], sumsq=2.0, max_abs=1.0
    )


def scale_site() -> SiteSummary:
    return SiteSummary(
        site="fc#0", rows=4, distinct=0, unit_on=[4, 0], sumsq=2.0, max_abs=1.0, scale_only=True
    )


def host_of(tmp_path: Path, fraction: float = 0.0) -> RunHost:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'apmon.db'}",
        mlflow_tracking_uri="",
        plugins=["entropy", "dead_units", "strikes"],
        host_store_fraction=fraction,
    )
    return RunHost(settings, "run-1", RunStart(name="r", sites=[SITE]))


def losses(host: RunHost) -> dict[int, float | None]:
    with host.store._session("read steps") as session:
        return {row.step: row.loss for row in session.scalars(select(StepRow))}


def test_scale_only_steps_feed_the_plugins_but_store_no_site_summary(tmp_path: Path) -> None:
    host = host_of(tmp_path)
    host.handle(StepSummary(step=0, sites=[full_site()], loss=1.0))
    host.handle(StepSummary(step=1, sites=[scale_site()], loss=0.5))
    host.persist()
    store = host.store
    assert [s.step for s in store.step_summaries("run-1", "train")] == [0]
    assert [m.step for m in store.measures("run-1", name="entropy", site="fc#0")] == [0]
    dead = store.measures("run-1", name="dead", site="fc#0")
    assert [(m.step, m.value) for m in dead] == [(0, 0.5), (1, 0.5)]
    assert losses(host) == {0: 1.0, 1: 0.5}
    host.finish(1)


def test_thinned_steps_keep_loss_and_run_level_measures_and_are_counted(tmp_path: Path) -> None:
    host = host_of(tmp_path)
    host.budget.stride = 4  # as if storing every step had been found too dear
    for step in range(8):
        host.handle(StepSummary(step=step, sites=[full_site()], loss=1.0 + step))
    host.finish(7)
    store = host.store
    assert [s.step for s in store.step_summaries("run-1", "train")] == [0, 4]
    assert [m.step for m in store.measures("run-1", name="dead", site="fc#0")] == [0, 4]
    assert [m.step for m in store.measures("run-1", name="dead_mean")] == list(range(8))
    assert losses(host) == {step: 1.0 + step for step in range(8)}
    (thinned,) = store.measures("run-1", name="monitor/thinned_steps")
    assert thinned.value == 6


def test_store_budget_picks_the_smallest_power_of_two_that_fits() -> None:
    now = [0.0]
    budget = StoreBudget(0.15, clock=lambda: now[0])
    budget.note_written(full_steps=10, seconds=0.01)  # 1 ms a stored step
    kept = []
    for step in range(1001):  # 1000 steps a second: storing each needs 1.0 s/s > 0.15
        now[0] = step / 1000
        kept.append(budget.keep(step))
    assert budget.stride == 8  # 1000 * 1 ms / 0.15 = 6.7 -> 8
    now[0] = 1.5
    assert budget.keep(1001) is False and budget.keep(1008) is True
    assert budget.thinned == sum(1 for k in kept if not k) + 1
    now[0] = 0.0
    slow = StoreBudget(0.15, clock=lambda: now[0])
    slow.note_written(full_steps=1, seconds=10.0)
    for step in range(10):
        now[0] += 0.2
        slow.keep(step)
    assert slow.stride == MAX_STRIDE
    now[0] = 0.0
    off = StoreBudget(0.0, clock=lambda: now[0])
    off.note_written(full_steps=1, seconds=10.0)
    for step in range(10):
        now[0] += 0.2
        assert off.keep(step)


def test_writer_keeps_order_survives_a_failing_batch_and_applies_back_pressure() -> None:
    written: list[int] = []
    gate = threading.Event()

    def write(batch: int) -> None:
        gate.wait()
        if batch == 3:
            raise OSError("disk full")
        written.append(batch)

    writer = StoreWriter(write, limit=2)
    submitted = threading.Thread(target=lambda: [writer.submit(b) for b in range(6)])
    submitted.start()
    submitted.join(timeout=0.3)
    assert submitted.is_alive()  # the queue is full while the store does not move
    gate.set()
    submitted.join(timeout=10)
    writer.stop()
    assert written == [0, 1, 2, 4, 5] and writer.failures == 1
    assert writer.idle
