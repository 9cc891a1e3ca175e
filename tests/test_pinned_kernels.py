"""The scenario suite's kernel pinning (``benchmarks/scenarios/pinned_kernels.py``): the variables
it sets, a user's own kept, and a fresh torch that really runs its AVX2 kernels under them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

LoadScript = Callable[[str], ModuleType]


def test_pin_sets_the_avx2_kernels_and_keeps_a_users_own_choice(
    benchmark_script: LoadScript,
) -> None:
    module = benchmark_script("scenarios/pinned_kernels.py")
    environ = {"MKL_CBWR": "COMPATIBLE"}
    words = module.pin(environ)
    if module.has_avx2():
        assert environ == {
            "ATEN_CPU_CAPABILITY": "avx2",
            "MKL_CBWR": "COMPATIBLE",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
        }
        assert "MKL_CBWR=COMPATIBLE" in words and "ATEN_CPU_CAPABILITY=avx2" in words
    else:
        assert environ == {"MKL_CBWR": "COMPATIBLE"} and "no AVX2" in words


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="cpuinfo flags are x86's"
)
def test_avx2_is_read_from_the_processors_flags(
    tmp_path: Path, benchmark_script: LoadScript
) -> None:
    module = benchmark_script("scenarios/pinned_kernels.py")
    without = tmp_path / "without"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx\n")
    with_avx2 = tmp_path / "with"
    with_avx2.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
    look_alike = tmp_path / "look_alike"
    look_alike.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2_like\n")
    assert not module.has_avx2(str(without))
    assert not module.has_avx2(str(look_alike))
    assert module.has_avx2(str(with_avx2))
    assert not module.has_avx2(str(tmp_path / "missing"))


def test_a_fresh_torch_runs_the_pinned_kernels(benchmark_script: LoadScript) -> None:
    module = benchmark_script("scenarios/pinned_kernels.py")
    if not module.has_avx2():
        pytest.skip("no AVX2 on this machine: nothing is pinned")
    environ = {k: v for k, v in os.environ.items() if k not in module.AVX2_KERNELS}
    module.pin(environ)
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True
    )
    assert done.stdout.strip() == "AVX2"
