"""``Monitor.record_scalars``: step numbers reach the store as measures of their own step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from monitor.client import watch
from monitor.settings import Settings
from monitor.store import open_store


def test_scalars_are_stored_at_the_step_that_just_ended(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", mlflow_tracking_uri="")
    mon = watch(model, opt, settings=settings, every=2)
    for step in range(4):
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        # step 1 and 3 are not captured: their scalars still make a (site-less) summary
        mon.record_scalars({"lr": 0.1 * (step + 1), "nan_left_out": float("nan")})
    with pytest.raises(ValueError, match="scalar name"):
        mon.record_scalars({"bad name": 1.0})
    mon.close()
    store = open_store(settings.database_url)
    points = store.measures(mon.run_id, name="lr")
    assert [(p.step, round(p.value, 6)) for p in points] == [(0, 0.1), (1, 0.2), (2, 0.3), (3, 0.4)]
    assert store.measures(mon.run_id, name="nan_left_out") == []
