"""The monitor with APT probes and sweeps on does not change training by a single bit.

A model with dropout and batch norm trains 50 steps twice from the same seed, once plain and
once watched (pattern captures, APT probes and sensitivity sweeps every few steps, the embedded
transport writing to a real SQLite file); parameters, buffers, optimizer and scheduler state,
the loss sequence and the RNG state must be identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from monitor.client import watch
from monitor.settings import Settings
from monitor.store import open_store

STEPS = 50


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model trains fastest on one thread (and a busy 2-core machine stays usable)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Dropout2d(0.2),
            nn.MaxPool2d(2),
        )
        self.fc1 = nn.Linear(6 * 16, 24)
        self.bn = nn.BatchNorm1d(24)
        self.drop = nn.Dropout(0.4)
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1)
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(h)))))


Factory = Callable[[nn.Module], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Factory] = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
    "adamw-groups": lambda m: torch.optim.AdamW(
        [{"params": m.features.parameters(), "lr": 1e-2}, {"params": m.fc2.parameters()}],
        lr=3e-3,
        weight_decay=0.05,
    ),
}


def train(name: str, options: dict[str, Any] | None, db: Path | None) -> dict[str, Any]:
    """Train from seed 0; ``options`` None means plain, else ``watch(**options)``."""
    torch.manual_seed(0)
    model = Net()
    optimizer = OPTIMIZERS[name](model)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=STEPS
    )
    monitor = None
    if options is not None:
        assert db is not None
        settings = Settings(database_url=f"sqlite:///{db}", mlflow_tracking_uri="", plugins=[])
        monitor = watch(model, optimizer, settings=settings, **options)
    losses = []
    for _ in range(STEPS):
        x = torch.randn(16, 3, 8, 8)  # the global RNG: any stray draw by the monitor shows
        y = torch.randint(0, 4, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    if monitor is not None:
        monitor.close()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "losses": losses,
        "rng": torch.get_rng_state(),
        "monitor": monitor,
    }


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize(
    ("name", "probe_rows"), [("sgd", None), ("adam", 6), ("adamw-groups", None)]
)
def test_training_is_bit_identical_with_probes_and_sweeps(
    name: str, probe_rows: int | None, tmp_path: Path
) -> None:
    plain = train(name, None, None)
    options = {
        "every": 3,
        "apt_every": 2,
        "sweep_every": 7,
        "probe_rows": probe_rows,
        "name": "noninvasive",
    }
    watched = train(name, options, tmp_path / "apmon.db")
    for key in ("model", "optimizer", "scheduler", "losses", "rng"):
        assert_identical(plain[key], watched[key], key)

    # The monitor did its work: every scheduled probe is in the store, one row per (site, eta).
    monitor = watched["monitor"]
    store = open_store(f"sqlite:///{tmp_path / 'apmon.db'}")
    points = store.probes(monitor.run_id)
    sites = {p.site for p in points}
    assert sites == {"features.2#0", "model#0"}
    apt_steps = sorted({p.step for p in points if p.kind == "apt"})
    sweep_steps = sorted({p.step for p in points if p.kind == "sweep"})
    assert apt_steps == list(range(0, STEPS, 2))
    assert sweep_steps == list(range(0, STEPS, 7))
    assert len(points) == len(sites) * (len(apt_steps) + 16 * len(sweep_steps))
    assert any(p.changed > 0 for p in points if p.kind == "apt")
    rows = 16 if probe_rows is None else probe_rows
    assert {p.rows for p in points if p.site == "model#0"} == {rows}
    lrs = {p.step: p.lr for p in points if p.kind == "apt"}
    assert len(set(lrs.values())) > 1  # OneCycleLR moved the learning rate the probes report
