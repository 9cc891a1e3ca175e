"""When to load the compiled CPU kernels (``cpu_kernels``): once they have paid.

Importing numba and loading the kernels from its disk cache costs about 0.9 s of CPU (measured
on a 2-core machine: 0.37 s for the import, 0.5 s for numba's first dispatch, half of that
scipy.linalg, which numba imports to look for a BLAS). Loaded on the first captured step, as
apmon did, that second was most of what a 10-second ResNet-20 run paid for its monitor. Loaded
on a thread of its own, it made training's steps queue for the GIL behind numba's Python (a
ResNet-20 run measured slower that way, not faster).

Until the kernels are loaded, ``summary`` computes the same statistics without them: the
scale-only statistics every captured step needs with numpy (``summary._scale_with_numpy``),
pattern counts and sites with a non-finite value with torch operations. Loading costs memory
too: numba, LLVM and the kernels add about 100 MiB to the training process's RSS, once (the
small MLP's ``python benchmarks/e2e.py --soak 10000``: +104 MiB, of which 36 MiB private
memory and the rest numba's and LLVM's shared libraries mapped from disk).

So the kernels are loaded as rent or buy: once the seconds they would have saved add up to
``BUY_SECONDS``, their price: the loading's ``LOAD_SECONDS`` and their memory, valued at
``MEMORY_PRICE_SECONDS``. Counted in that currency (seconds, and memory at its price), a short
run never pays for them and a run of any length pays at most about twice the better choice; in
seconds alone, a run pays at most about 6 s more than loading them at its start would have
cost. The rent is the share of the seconds spent without the kernels that the kernels would
have saved (``charge``). Measured per site, one thread (without / with the kernels):

- scale statistics, numpy / kernels (2026-12-04): 64x128 dense 20 / 7 us, 64x64 16 / 6 us,
  128x512 81 / 22 us, 64x16x8x8 conv 86 / 25 us, 128x64x8x8 490 / 150 us, 128x16x32x32
  1,500-1,730 / 480-730 us: about 70% saved (``SCALE_SAVING``), a little less on the largest
  conv sites;
- pattern counts, torch / kernels, the same sites (2026-12-04): 322 / 24, 213 / 21, 841 / 52,
  511 / 61, 1,692 / 234, 6,331 / 775 us: about 90% (``COUNT_SAVING``).

Why memory has a price: the issue that set apmon's costs allows the small MLP's job at most 50
MiB more RSS over 10,000 steps, and the kernels' 100 MiB, once, broke that. With the loading's
second alone as the price, the small MLP of ``python benchmarks/e2e.py --soak 10000`` (0.1 to
0.24 ms of rent a step: each site's scale statistics, and a pattern count every 64th step)
bought them at step 4,261 on a slow day of a 2-core machine and near step 10,000 on a fast one.
At 4 s for their memory it buys them after about 20,000 steps on the slow day and 48,000 on
the fast one. Every model of ``e2e.py`` still buys them after one to five minutes of training
(rent per second of training, fast day: digits CNN 0.07 s, small MLP 0.08 s, ResNet-20 0.03 s,
MLP 3072-512x3 0.02 s), and the kernels save each of them 2-8% of its monitored step from
then on.

A site with a non-finite value goes to the torch operations with or without the kernels: no
rent. An earlier rule also loaded the kernels once training had waited 0.5 s for its embedded
host (a small model's steps wait while the host catches up after its start), as time the run
had to spare. Side by side (``python benchmarks/e2e_ab.py --model mlp_small --steps 10000
--rounds 4 --threads 1``), the small MLP's whole run took 2.460x plain with that rule and
2.418x without the kernels at all: they saved it nothing, and cost it about 100 MiB.

A user chooses otherwise with the setting ``compiled_kernels`` (``APMON_COMPILED_KERNELS``;
``set_policy``): ``"never"`` keeps numba out of the process (a job whose memory is tight, or
many ranks on one host: each pays its own private part), ``"always"`` loads the kernels in
``watch()`` (a long run pays the second up front instead of the rent first).
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import get_args

from monitor.settings import KernelPolicy

logger = logging.getLogger(__name__)

# The loading's measured cost in time (see above).
LOAD_SECONDS = 1.0
# What the kernels' memory (about 100 MiB of RSS, once) is worth in seconds (see above).
MEMORY_PRICE_SECONDS = 4.0
# The seconds the kernels would have saved that buy them under "auto".
BUY_SECONDS = LOAD_SECONDS + MEMORY_PRICE_SECONDS
# Shares of the seconds spent without the kernels that they save (measured: see above).
SCALE_SAVING = 0.7
COUNT_SAVING = 0.9

POLICIES: tuple[str, ...] = get_args(KernelPolicy)

_lock = threading.Lock()
_policy: KernelPolicy = "auto"
_loaded: ModuleType | None = None
_failed = False
_charged = 0.0


def kernels() -> ModuleType | None:
    """``cpu_kernels`` once it is loaded, else None (use the torch operations, and ``charge``)."""
    return _loaded


def set_policy(policy: KernelPolicy) -> None:
    """Set when this process loads the kernels.

    ``"auto"``: rent or buy (``charge``); ``"always"``: now; ``"never"``: not (kernels already
    loaded stay in use: their memory is spent).
    """
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"compiled_kernels must be one of {', '.join(POLICIES)}; got {policy!r}")
    _policy = policy
    if policy == "always":
        load_kernels()


def would_have_saved() -> float:
    """Seconds the kernels would have saved so far, by the rent (see ``charge``)."""
    return _charged


def log_forgone_saving() -> None:
    """Under ``"never"``, log at a run's end what the kernels would have saved.

    Only once that is more than their loading costs: the user's trade, in seconds.
    """
    if _policy == "never" and _loaded is None and _charged >= LOAD_SECONDS:
        logger.info(
            "apmon's compiled CPU kernels would have saved this process about %.1f s so far, "
            "against about %.0f s to load them (APMON_COMPILED_KERNELS=never keeps them out)",
            _charged,
            LOAD_SECONDS,
        )


def charge(seconds: float, saving: float) -> None:
    """Add the rent of ``seconds`` spent without the kernels, of which they save ``saving``.

    Under the ``"auto"`` policy the kernels load once the rent adds up to BUY_SECONDS.
    """
    global _charged
    _charged += seconds * saving
    if _charged >= BUY_SECONDS and _policy == "auto" and _loaded is None and not _failed:
        # A user who sees the job's memory step up once mid-run finds why in the log
        logger.info(
            "apmon loads its compiled CPU kernels: they would have saved %.2f s so far "
            "(numba and LLVM add about 100 MiB to this process, once)",
            _charged,
        )
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
