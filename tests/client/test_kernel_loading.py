"""The numba kernels load on a thread at ``watch()``; until then no step counts patterns.

Each test runs in a fresh interpreter: in this one, earlier tests have loaded the kernels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_warm_up_loads_every_kernel_the_capture_uses() -> None:
    result = _run(
        """
        import json
        from monitor.client import cpu_kernels, kernel_loading
        names = [n for n in dir(cpu_kernels) if hasattr(getattr(cpu_kernels, n), "signatures")]
        before = {n: len(getattr(cpu_kernels, n).signatures) for n in names}
        kernel_loading.load_in_background()
        loaded = kernel_loading.wait(240)
        after = {n: len(getattr(cpu_kernels, n).signatures) for n in names}
        print(json.dumps({"loaded": loaded, "before": before, "after": after}))
        """
    )
    assert result["loaded"] is True
    assert set(result["before"].values()) == {0}
    after: dict[str, int] = result["after"]
    used = {  # the kernels a float32 CPU run calls (summary.py)
        "pack_and_count_on",
        "pack_and_count_table",
        "count_on_rows",
        "count_table",
        "count_sorted32",
        "count_hashed",
        "sketch_and_spectrum",
    }
    assert {name for name, count in after.items() if count > 0} >= used, after


def test_steps_before_the_kernels_are_loaded_carry_the_scale_only() -> None:
    result = _run(
        """
        import json, torch
        from torch import nn
        from monitor.client import kernel_loading, watch
        from tests.client.memory_transport import ListTransport
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        transport = ListTransport()
        mon = watch(model, opt, transport=transport, capture_budget=None)
        armed_ready = []
        for step in range(100_000):
            armed_ready.append(mon._kernels)
            opt.zero_grad()
            model(torch.randn(16, 8)).square().mean().backward()
            opt.step()
            if kernel_loading.ready() and sum(armed_ready[-5:]) == 5:
                break
        mon.close()
        scale_only = {s.step: s.sites[0].scale_only for s in transport.summaries}
        print(json.dumps({"armed_ready": armed_ready, "scale_only": scale_only}))
        """
    )
    armed_ready: list[bool] = result["armed_ready"]
    scale_only = {int(k): v for k, v in result["scale_only"].items()}
    assert armed_ready[0] is False  # the first step never waits for numba
    assert armed_ready[-1] is True
    # Without a capture budget every step counts patterns, once the kernels are there.
    assert [scale_only[step] for step in range(len(armed_ready))] == [
        not ready for ready in armed_ready
    ]
