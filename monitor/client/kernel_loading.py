"""Loads the capture's numba kernels on a thread of their own, off the training thread.

numba compiles ``cpu_kernels`` once and caches them on disk, but every process still pays
for its first call: numba sets up its typing context and loads each cached kernel, about 0.7 s
of CPU measured on this project's 2-core machines, which used to land in the first captured
step (ResNet-20's capture path alone paid 1.2 s once in a 10-s loop). ``load_in_background``
starts a thread at ``watch()`` that runs the capture's real code (``measure``, ``measure_scale``,
``to_wire``) on small tensors of each site kind, so that the kernels and signatures a CPU
float32 run uses are loaded. Until ``ready()``, the monitor counts no patterns and measures
the scale-only statistics with torch (``measure_scale(..., kernels=False)``: the same values),
so no step waits for numba. A probe that runs before then calls the kernels and waits for the
load (numba's compiler lock serialises them), as every step did before.
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)

_loaded = threading.Event()
_start_lock = threading.Lock()
_started = False

# (shape, site kind) of the warm-up tensors, one per counting path of ``summary``: dense rows
# of three words (hashed), narrow dense rows (a table of all patterns), narrow conv channels
# (packed and counted at once), 16,384 rows of 20 channels (radix-sorted, as ResNet-20's
# second stage at batch 128), a sequence.
WARM_UP = (
    ((64, 130), "dense"),
    ((64, 4), "dense"),
    ((4, 8, 6, 6), "conv"),
    ((4, 20, 64, 64), "conv"),
    ((8, 5, 20), "seq"),
)


def load_in_background() -> None:
    """Start loading the kernels on a thread of their own (once per process)."""
    global _started
    with _start_lock:
        if _started:
            return
        _started = True
    # Not a daemon: a process that ends during the load waits for it (a second at most) at
    # exit; a daemon thread still inside numba or torch when the interpreter finalises made
    # the process abort ("terminate called without an active exception"), seen here.
    threading.Thread(target=_load, name="apmon-kernels", daemon=False).start()


def ready() -> bool:
    """Whether the kernels are loaded (or their loading gave up: the caller may use them)."""
    return _loaded.is_set()


def wait(timeout: float | None = None) -> bool:
    """Wait until ``ready()``; whether it is."""
    return _loaded.wait(timeout)


def _load() -> None:
    from monitor.client.summary import measure, measure_scale, to_wire

    try:
        generator = torch.Generator().manual_seed(0)
        for shape, kind in WARM_UP:
            x = torch.randn(shape, generator=generator)
            to_wire("warm-up", measure(x, kind))  # type: ignore[arg-type]
            measure_scale(x, kind)  # type: ignore[arg-type]
    except Exception:
        logger.exception("apmon could not load its capture kernels ahead; the first step will")
    finally:
        _loaded.set()
