"""The whole embedded path (capture -> summary -> plugin host -> SQLite) against brute force.

The reference counts patterns with a Python dict over tuples of ``preactivation > 0``, from
preactivations that independent hooks record during the same forward pass.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monitor.client import watch
from monitor.client.handle import DEFAULT_CAPTURE_ROWS
from monitor.settings import Settings
from monitor.store import open_store


class SmallMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(self.act(self.fc1(x)))))


class SmallCNN(nn.Module):
    """One ReLU module called twice: two sites, relu#0 and relu#1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def _brute_force(rows: torch.Tensor) -> dict[str, float]:
    patterns = Counter(tuple(bool(v) for v in row) for row in (rows > 0))
    n = sum(patterns.values())
    d = rows.shape[1]
    entropy = -sum((c / n) * math.log2(c / n) for c in patterns.values())
    return {
        "distinct": float(len(patterns)),
        "max_freq": max(patterns.values()) / n,
        "entropy": entropy,
        "rel_entropy": entropy / min(d, math.log2(n)),
        "spectrum": sorted(Counter(patterns.values()).items()),
    }


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


CASES = {
    "mlp": (SmallMLP, (64, 6), {"act#0": "fc1", "model#0": "fc2"}),
    "cnn": (SmallCNN, (4, 2, 5, 5), {"relu#0": "conv1", "relu#1": "conv2"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stored_entropy_family_equals_brute_force(case: str, tmp_path: Path) -> None:
    factory, shape, preactivation_of = CASES[case]
    torch.manual_seed(0)
    model = factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (shape[0],))
    recorded: dict[str, torch.Tensor] = {}
    for site, module_name in preactivation_of.items():
        module = getattr(model, module_name)
        module.register_forward_hook(
            lambda _m, _i, out, site=site: recorded.__setitem__(site, out.detach().clone())
        )
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", mlflow_tracking_uri="")
    with watch(model, optimizer, settings=settings, apt_every=None) as mon:  # no probe forward
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert set(mon.sites) == set(preactivation_of)
    store = open_store(settings.database_url)
    stored = {(m.site, m.name): m.value for m in store.measures(mon.run_id) if m.step == 0}
    (summary,) = list(store.step_summaries(mon.run_id, "train"))
    by_site = {s.site: s for s in summary.sites}
    for site in preactivation_of:
        rows = _as_rows(recorded[site][:DEFAULT_CAPTURE_ROWS])  # watch() summarises these
        expected = _brute_force(rows)
        assert stored[(site, "distinct")] == expected["distinct"]
        assert stored[(site, "max_freq")] == expected["max_freq"]
        assert stored[(site, "entropy")] == pytest.approx(expected["entropy"], rel=1e-12, abs=1e-12)
        assert stored[(site, "rel_entropy")] == pytest.approx(expected["rel_entropy"], rel=1e-12)
        assert sorted(by_site[site].spectrum) == expected["spectrum"]
        assert by_site[site].rows == rows.shape[0]
        assert by_site[site].unit_on == (rows > 0).sum(dim=0).tolist()
    assert mon.transport.failures == 0  # type: ignore[attr-defined]
