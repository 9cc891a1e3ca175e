"""The suite's runs on the same CPU kernels on every x86-64 machine, so its figures compare.

torch picks its CPU kernels by the instruction sets the processor has: ATen's vectorised
kernels, MKL's matrix products and oneDNN's convolutions each have AVX2 and AVX-512 versions,
and they add in different orders. Some runs of the suite sit on an edge (a control whose loss
nearly passes the divergence truth, a corruption caught only by the loss), so the same commit
scored differently from one session's machine to the next. Measured on one machine (AVX-512 and
AMX), held-out half, the same code, 2026-12-04:

- its own kernels: divergence 13/13 in time, median lead 14, 0/34 false-alarm runs (a control
  diverged and left the score); bad batches P 0.967 R 0.906 F1 0.935;
- pinned to AVX2 as below: median lead 10, 0/35; P 0.968 R 0.938 F1 0.952.

Every x86-64 processor of the last decade has AVX2, so ``run.py`` pins its workers' kernels to
it by default (``--native-kernels`` leaves them as torch picks them). Elsewhere (an ARM
machine, an x86 one without AVX2) nothing is pinned and the report says so. The variables only
act on a process that has not used torch yet: ``run.py`` starts its workers fresh (``spawn``).
"""

from __future__ import annotations

import platform
from collections.abc import MutableMapping

# ATen's dispatch, MKL's conditional numerical reproducibility, oneDNN's highest instruction set.
AVX2_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def has_avx2(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this is an x86-64 machine whose processor has AVX2 (Linux's cpuinfo says)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open(cpuinfo) as info:
            return any(line.startswith("flags") and "avx2" in line.split() for line in info)
    except OSError:
        return False


def pin(environ: MutableMapping[str, str]) -> str:
    """Pin ``environ``'s CPU kernels to AVX2 where the machine has it; what the runs use, in words.

    A variable the user set already is kept (theirs decides).
    """
    if not has_avx2():
        return "torch's own choice (no AVX2 to pin to on this machine)"
    for name, value in AVX2_KERNELS.items():
        environ.setdefault(name, value)
    return "pinned: " + ", ".join(f"{name}={environ[name]}" for name in AVX2_KERNELS)
