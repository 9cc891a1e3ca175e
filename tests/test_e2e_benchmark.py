"""benchmarks/e2e.py's worker and its command line, in fresh processes as the benchmark runs them.

The benchmark's figures are the README's headline; these check that a worker measures what it
says (its steps, the captured steps, the device) and that a GPU run asked of a machine without
one fails with a message instead of timing the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

E2E = Path(__file__).resolve().parents[1] / "benchmarks" / "e2e.py"


def _run(*args: str, device: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "APMON_E2E_DEVICE"}
    if device is not None:
        env["APMON_E2E_DEVICE"] = device
    return subprocess.run(
        [sys.executable, str(E2E), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )


def _worker(mode: str, steps: int, folder: Path) -> dict[str, object]:
    done = _run("--worker", "mlp_small", mode, "1", str(steps), str(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_plain_and_a_capture_worker_report_their_steps_on_the_cpu(tmp_path: Path) -> None:
    plain = _worker("plain", 7, tmp_path)
    assert (plain["steps"], plain["device"], plain["mode"]) == (7, "cpu", "plain")
    assert isinstance(plain["total_s"], float) and plain["total_s"] > 0
    captured = _worker("capture", 7, tmp_path)
    assert captured["device"] == "cpu"
    # watch()'s default schedule captures every step, so each timed step counts
    assert isinstance(captured["captured"], int) and captured["captured"] >= 7
    assert captured["dropped"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_a_gpu_run_without_a_gpu_fails_with_a_message() -> None:
    done = _run("--device", "cuda", "--models", "mlp_small", "--rounds", "1")
    assert done.returncode == 2
    assert "--device cuda: this torch sees no CUDA device" in done.stderr


def test_every_other_round_runs_the_modes_in_reverse() -> None:
    sys.path.insert(0, str(E2E.parent))
    from e2e import round_order

    modes = ["plain", "defaults", "capture"]
    assert round_order(modes, 0) == modes
    assert round_order(modes, 1) == ["capture", "defaults", "plain"]
    assert round_order(modes, 2) == modes
    assert modes == ["plain", "defaults", "capture"]  # the caller's list is left as it was
