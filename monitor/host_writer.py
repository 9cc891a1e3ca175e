"""The embedded host's storage: a writer thread, and the budget that thins what it stores.

The host process answers the training job (plugins, alerts, marks) on its main thread; SQL and
MLflow writes run on ``StoreWriter``'s thread, so a transaction never holds up an answer.
``StoreBudget`` keeps the writes from taking a core away from training: the host stores every
step's site summaries and measures while that costs at most ``fraction`` of wall time, and
every k-th step's beyond (k a power of two, the smallest that fits). A thinned step keeps its
loss, sample indices and alerts; the plugins (detectors included) saw it in full.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

# How often the budget re-estimates the arrival rate and the cost of a stored step.
BUDGET_HORIZON_SECONDS = 1.0
# Largest stride: at least one step in 64 keeps its summaries and measures.
MAX_STRIDE = 64


class StoreBudget:
    """Decides which steps are stored in full: every ``stride``-th (``step % stride == 0``).

    Every ``BUDGET_HORIZON_SECONDS`` the stride becomes the smallest power of two k with
    rate x cost / k <= fraction, where rate is the training summaries that arrived per second
    and cost the writer's measured seconds per fully stored step (smoothed). ``fraction`` 0
    turns thinning off (every step stored).
    """

    def __init__(self, fraction: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.fraction = fraction
        self.stride = 1
        self.thinned = 0  # steps stored without their summaries and measures
        self._clock = clock
        self._since = clock()
        self._arrivals = 0
        self._cost: float | None = None

    def note_written(self, full_steps: int, seconds: float) -> None:
        """The writer's report: ``seconds`` spent on a slice holding ``full_steps`` full steps."""
        if full_steps <= 0:
            return
        cost = seconds / full_steps
        self._cost = cost if self._cost is None else 0.7 * self._cost + 0.3 * cost

    def keep(self, step: int) -> bool:
        """Whether this training step's summaries and measures are stored (counts a thinned one)."""
        self._arrivals += 1
        now = self._clock()
        if now - self._since >= BUDGET_HORIZON_SECONDS:
            self._update(self._arrivals / (now - self._since))
            self._since, self._arrivals = now, 0
        kept = step % self.stride == 0
        self.thinned += not kept
        return kept

    def _update(self, rate: float) -> None:
        if self.fraction <= 0 or self._cost is None:
            return
        need = rate * self._cost / self.fraction
        stride = 1 if need <= 1 else 2 ** math.ceil(math.log2(need))
        stride = min(stride, MAX_STRIDE)
        if stride != self.stride:
            logger.info(
                "apmon host: storing every %d-th step's summaries (%.0f steps/s, %.2g ms each)",
                stride,
                rate,
                1e3 * self._cost,
            )
        self.stride = stride


class StoreWriter:
    """Runs ``write(batch)`` for each submitted batch, in order, on a thread of its own.

    ``submit`` never waits unless ``limit`` batches are already queued (back-pressure on a
    store that stopped keeping up); ``drain`` waits until everything submitted is written.
    A ``write`` that raises is logged and counted in ``failures``; the next batch goes on.
    """

    def __init__(
        self,
        write: Callable[[Any], None],
        limit: int = 16,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self._write = write
        self._on_start = on_start
        self._limit = limit
        self._queue: list[Any] = []
        self._busy = False
        self._stopped = False
        self._cond = threading.Condition()
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="apmon-writer", daemon=True)
        self._thread.start()

    def submit(self, batch: Any) -> None:
        """Queue a batch for writing."""
        with self._cond:
            while len(self._queue) >= self._limit and not self._stopped:
                self._cond.wait()
            self._queue.append(batch)
            self._cond.notify_all()

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being written."""
        with self._cond:
            return not self._queue and not self._busy

    def drain(self) -> None:
        """Wait until every submitted batch is written."""
        with self._cond:
            while self._queue or self._busy:
                self._cond.wait()

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        self.drain()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()  # e.g. lower this thread's priority
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = self._queue.pop(0)
                self._busy = True
                self._cond.notify_all()
            try:
                self._write(batch)
            except Exception:
                self.failures += 1
                logger.exception("apmon host could not write a batch")
            with self._cond:
                self._busy = False
                self._cond.notify_all()
