"""Conv1d sites: channels are the units and each position is a row, as for a conv site."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monitor.client.handle import Monitor
from tests.client.memory_transport import ListTransport


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 6, 3),
        nn.ReLU(),
        nn.Conv1d(6, 5, 3),
        nn.BatchNorm1d(5),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(5 * 6, 2),
    )


def preactivations(model: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, C, L) preactivations by plain tensor code (batch norm with batch statistics)."""
    with torch.no_grad():
        h1 = F.conv1d(x, model[0].weight, model[0].bias)
        h2 = F.conv1d(h1.clamp(min=0), model[2].weight, model[2].bias)
        bn = model[3]
        h2 = F.batch_norm(h2, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return {"1#0": h1, "4#0": h2}


def test_conv1d_units_are_channels_and_probes_agree() -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    transport = ListTransport()
    monitor = Monitor(model, optimizer, transport, every=1, apt_every=1)
    expected_on, expected_apt = [], []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 3, 10, generator=g), torch.randint(0, 2, (4,), generator=g)
        before = preactivations(model, x)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        after = preactivations(model, x)
        expected_on.append({k: (v > 0).sum(dim=(0, 2)).tolist() for k, v in before.items()})
        expected_apt.append(
            {k: int(((before[k] > 0) != (after[k] > 0)).any(dim=1).sum()) for k in before}
        )
    monitor.close()
    sites = {s.name: s for s in transport.sites}
    assert sites["1#0"].units == 6 and sites["4#0"].units == 5
    summaries = [s for s in transport.summaries if s.sites]
    assert [{s.site: s.rows for s in summary.sites} for summary in summaries] == [
        {"1#0": 4 * 8, "4#0": 4 * 6}
    ] * 3  # one row per sample and position
    assert [{s.site: list(s.unit_on) for s in summary.sites} for summary in summaries] == (
        expected_on
    )
    apt = [{s.site: s.changed[0] for s in p.sites} for p in transport.probes_of("apt")]
    assert apt == expected_apt
    first = transport.probes_of("apt")[0]
    assert {s.site: s.rows for s in first.sites} == {"1#0": 32, "4#0": 24}
