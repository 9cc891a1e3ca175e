"""``apmon demo``: a small CNN trained on scikit-learn's digits with the monitor on, embedded."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from monitor.settings import Settings

logger = logging.getLogger(__name__)


class DigitsCNN(nn.Module):
    """Two conv sites and one dense site (the last through ``F.relu`` in ``forward``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.hidden = nn.Linear(32 * 4 * 4, 64)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of 8x8 digit images."""
        x = self.features(x).flatten(1)
        return self.classifier(F.relu(self.hidden(x)))


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (shipped with the package, no download), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.int64)


@dataclass
class DemoResult:
    """Where the demo's results went."""

    run_id: str
    mlflow_run_id: str | None
    steps: int
    seconds: float
    final_loss: float


def run_demo(
    settings: Settings,
    steps: int = 300,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Train the demo model for ``steps`` steps with the monitor on; return where results are."""
    from monitor.client.handle import watch

    torch.manual_seed(seed)
    images, labels = load_digits_tensors()
    model = DigitsCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    loss_value = float("nan")
    # A fixed, labelled probe set (the same 256 digits each time) is what Jaccard and changes
    # compare; its labels give the sample-set measures of seed 002 and the activation pattern
    # diagrams (of all 256 digits, at evaluations 0, 1, 2, 4, 8 and at the end).
    # Its own generator: choosing it leaves the training batches as they are without it.
    chosen = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    probe = (images[chosen[:256]], labels[chosen[:256]])
    options: dict[str, Any] = {
        "apt_every": 8,  # APT probe every 8 steps, the thesis default (Table A.1)
        "sweep_every": 25,  # learning-rate sensitivity sweep over 16 trial rates
        "probe_set": probe,
        "probe_every": 25,
        "config": {"steps": steps, "batch_size": batch_size, "lr": 0.05},
    }
    with watch(model, optimizer, settings=settings, name="apmon-demo", **options) as mon:

        @mon
        def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return loss.detach()

        bar = tqdm(range(steps), desc="apmon demo", unit="step", disable=not progress)
        for _ in bar:
            index = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
            loss_value = float(train_step(images[index], labels[index]))
            bar.set_postfix(loss=f"{loss_value:.3f}")
    mlflow_run_id = mon.wait_for_mlflow()  # its figures go to MLflow next
    return DemoResult(
        run_id=mon.run_id,
        mlflow_run_id=mlflow_run_id,
        steps=steps,
        seconds=time.perf_counter() - started,
        final_loss=loss_value,
    )


def describe_location(url: str) -> str:
    """A SQLite URL as the file path a person can find; other URLs as they are."""
    prefix = "sqlite:///"
    if url.startswith(prefix):
        return str(Path(url[len(prefix) :]).resolve())
    return url
