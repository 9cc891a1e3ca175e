"""A ``torch.compile``d model: unprefixed site names, the eager run's summaries, a quiet log.

Captured and probed steps run the wrapped module eagerly; the others run the compiled graph (a
counting backend checks that they do).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from monitor.client.handle import Monitor
from tests.client.memory_transport import ListTransport
from tests.client.test_step_semantics import changed, data, mlp, oracle_masks, unit_on


def train(compiled: bool, steps: int = 8) -> tuple[ListTransport, dict[str, int], list[Any]]:
    torch.manual_seed(0)
    net = mlp()
    calls = {"compiles": 0, "runs": 0}

    def counting(graph: torch.fx.GraphModule, _inputs: Any) -> Any:
        calls["compiles"] += 1

        def run(*args: Any) -> Any:
            calls["runs"] += 1
            return graph.forward(*args)

        return run

    model = torch.compile(net, backend=counting) if compiled else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    transport = ListTransport()
    monitor = Monitor(model, optimizer, transport, every=2, apt_every=2, sweep_every=4)
    oracle = []
    for step in range(steps):
        x, y = data(step)
        before = oracle_masks(net, x)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        oracle.append((before, changed(before, oracle_masks(net, x))))
    monitor.close()
    return transport, calls, oracle


def test_compiled_model_matches_the_eager_run(caplog: pytest.LogCaptureFixture) -> None:
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING):
        compiled, calls, oracle = train(compiled=True)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no dynamo noise
    eager, _, _ = train(compiled=False)
    assert calls["runs"] == 4  # steps 1, 3, 5, 7 ran the compiled graph
    steps = [s.step for s in compiled.summaries]
    assert steps == [0, 2, 4, 6]
    assert compiled.summaries == eager.summaries
    assert compiled.probes == eager.probes
    assert {site.site for s in compiled.summaries for site in s.sites} == {"1#0", "3#0"}
    for summary in compiled.summaries:
        before, _ = oracle[summary.step]
        assert unit_on(summary) == {site: mask.sum(0).tolist() for site, mask in before.items()}
    apt = [{s.site: s.changed[0] for s in p.sites} for p in compiled.probes_of("apt")]
    assert apt == [oracle[step][1] for step in steps]
    assert [p.step for p in compiled.probes_of("sweep")] == [0, 4]
