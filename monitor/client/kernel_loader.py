"""When to load the compiled CPU kernels (``cpu_kernels``): once they have paid for themselves.

Importing numba and loading the kernels from its disk cache costs about 0.9 s of CPU (measured
on a 2-core machine: 0.37 s for the import, 0.5 s for numba's first dispatch, half of that
scipy.linalg, which numba imports to look for a BLAS). Loaded on the first captured step, that
second was most of what a 10-second ResNet-20 or MLP 3072 run paid for its monitor, and loaded
on a thread of its own it made training's steps queue for the GIL behind numba's Python (a
ResNet-20 run measured slower that way, not faster).

So it is rent or buy. Until the kernels are loaded, ``summary`` computes the same statistics
with torch operations, which take 2-5x the kernels' time (per captured step, one thread:
ResNet-20 17 vs 10 ms, MLP 3072 0.36 vs 0.12 ms, digits CNN 0.38 vs 0.13 ms, MLP 32-128-128-64
0.25 vs 0.05 ms), and charges the seconds they took (``charge``). Once those add up to
``LOAD_SECONDS``, the kernels are loaded on the thread that charged the last of it. A short run
never pays for the loading; a run of any length pays at most about twice what loading at its
start would have cost. Renting is for the runs where the torch operations are a small share
of the time (ResNet-20 1.8% of a step, MLP 3072 1.4%); where they take more than
``LOAD_SHARE`` of the time that has passed since ``SHARE_AFTER`` seconds after the first charge
(the first second holds the run's first step, which counts patterns in full, a cost the run
does not pay again), for at least ``SHARE_WINDOW`` seconds, the kernels are loaded at once
(the small MLP's 24%, the digits CNN's 6.4%).
"""

from __future__ import annotations

import logging
import threading
import time
from types import ModuleType

from monitor.client.budget import DEFAULT_CAPTURE_BUDGET

logger = logging.getLogger(__name__)

# The loading's measured cost (see above): the torch operations' seconds that buy the kernels.
LOAD_SECONDS = 1.0
# The share of the time above which the torch operations are not rented (``watch()``'s capture
# budget), and when and for how long it is measured.
LOAD_SHARE = DEFAULT_CAPTURE_BUDGET
SHARE_AFTER = 1.0
SHARE_WINDOW = 0.5

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failed = False


class _Rent:
    """What the torch operations have cost so far, in all and in the window after SHARE_AFTER."""

    def __init__(self) -> None:
        self.total = 0.0
        self.first: float | None = None  # when the first charge came
        self.window_start: float | None = None
        self.window_total = 0.0

    def add(self, seconds: float, now: float) -> bool:
        """Charge ``seconds`` ending at ``now``; whether the kernels have paid off."""
        self.total += seconds
        if self.first is None:
            self.first = now
        if now - self.first < SHARE_AFTER:
            return self.total >= LOAD_SECONDS
        if self.window_start is None:
            self.window_start = now
            return self.total >= LOAD_SECONDS
        self.window_total += seconds
        window = now - self.window_start
        expensive = window >= SHARE_WINDOW and self.window_total > LOAD_SHARE * window
        return expensive or self.total >= LOAD_SECONDS


_rent = _Rent()


def kernels() -> ModuleType | None:
    """``cpu_kernels`` once it is loaded, else None (use the torch operations, and ``charge``)."""
    return _loaded


def charge(seconds: float, now: float | None = None) -> None:
    """Add seconds of torch operations that the kernels would have done; loads them if they paid.

    ``now``: when those seconds ended (a ``time.perf_counter()`` reading; default: now).
    """
    paid = _rent.add(seconds, time.perf_counter() if now is None else now)
    if paid and _loaded is None and not _failed:
        load_kernels()


def load_kernels() -> ModuleType | None:
    """Load the kernels now (if not yet); the module, or None if they cannot be loaded."""
    global _loaded, _failed
    with _lock:
        if _loaded is None and not _failed:
            try:
                from monitor.client import cpu_kernels
            except Exception:
                _failed = True
                # The torch operations compute the same statistics; only slower.
                logger.exception("apmon could not load its CPU kernels; it counts with torch")
            else:
                _loaded = cpu_kernels
    return _loaded
