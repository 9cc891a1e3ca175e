"""When to load the compiled CPU kernels (``cpu_kernels``): when it costs nothing, or has paid.

Importing numba and loading the kernels from its disk cache costs about 0.9 s of CPU (measured
on a 2-core machine: 0.37 s for the import, 0.5 s for numba's first dispatch, half of that
scipy.linalg, which numba imports to look for a BLAS). Loaded on the first captured step, as
apmon did, that second was most of what a 10-second ResNet-20 run paid for its monitor. Loaded
on a thread of its own, it made training's steps queue for the GIL behind numba's Python (a
ResNet-20 run measured slower that way, not faster).

Until the kernels are loaded, ``summary`` computes the same statistics without them: the
scale-only statistics every captured step needs with numpy (``summary._scale_with_numpy``),
pattern counts and sites with a non-finite value with torch operations; it charges the seconds
they took (``charge``). Scale-only statistics per site, one thread (numpy / torch; the kernels
after them): 32x128 dense 31 / 59 us (19 us), 32x512 dense 48 / 93 us, 64x16x8x8 conv 137 /
182 us (69 us), 32x16x32x32 conv 0.74 / 1.03 ms. Loading costs memory too:
numba, LLVM and the kernels add about 100 MiB to the training process, once
(``python benchmarks/e2e.py --soak 10000`` prints the RSS every 500 steps). The kernels are
loaded

- once the training thread has waited ``WAITED_SECONDS`` in all for the embedded host (a small
  model's steps wait while the host catches up after its start, and whenever it is slower than
  training): such a run has the time to spare, and the host works through its backlog while
  the kernels load. A first rule, loading as soon as the host was 64 steps behind, fired on an
  MLP 3072 whose steps waited 0.04 s in the whole run (its job's CPU per step rose by 2.4 ms
  against the capture path alone);
- else once those seconds add up to ``LOAD_SECONDS`` (rent or buy): a short
  run of a large model never pays for the loading, and a run of any length pays at most about
  twice what loading at its start would have cost.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType

logger = logging.getLogger(__name__)

# The loading's measured cost (see above): the seconds without the kernels that buy them.
LOAD_SECONDS = 1.0
# Seconds the training thread has waited for its host when the kernels are loaded (see above).
WAITED_SECONDS = 0.5

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failed = False
_charged = 0.0


def kernels() -> ModuleType | None:
    """``cpu_kernels`` once it is loaded, else None (use the torch operations, and ``charge``)."""
    return _loaded


def charge(seconds: float) -> None:
    """Add seconds of torch operations that the kernels would have done (loads at LOAD_SECONDS)."""
    global _charged
    _charged += seconds
    if _charged >= LOAD_SECONDS and _loaded is None and not _failed:
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
