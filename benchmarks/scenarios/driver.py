"""Trains a small ReLU net and produces the wire events a monitored run sends: step summaries
(loss, sample indices) and APT probes / learning-rate sweeps, measured here directly."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from monitor.client.summary import measure, to_wire
from monitor.schema import ProbeRecord, SiteProbe, SiteSummary, StepSummary


class MLP(nn.Module):
    """Three ReLU layers; ``forward`` returns the logits and each site's pre-activations."""

    def __init__(self, inputs: int, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(inputs, width), nn.Linear(width, width), nn.Linear(width, width)]
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pre: list[torch.Tensor] = []
        h = x.flatten(1)
        for layer in self.layers:
            z = layer(h)
            pre.append(z)
            h = torch.relu(z)
        return self.head(h), pre


class CNN(nn.Module):
    """Two 3x3 conv ReLU sites and one dense ReLU site, no normalisation."""

    def __init__(self, channels: int, side: int, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(16 * 16, 32)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z1 = self.conv1(x)
        z2 = self.conv2(torch.relu(z1))
        z3 = self.fc(self.pool(torch.relu(z2)).flatten(1))
        return self.head(torch.relu(z3)), [z1, z2, z3]


SITE_NAMES = ("site0", "site1", "site2")


def rows_of(z: torch.Tensor) -> torch.Tensor:
    """(rows, units): a row per sample (dense) or per sample and position (conv, channels)."""
    if z.dim() == 4:
        return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    return z


def site_summaries(pre: list[torch.Tensor]) -> list[SiteSummary]:
    """What the client sends for the training forward: each site's pattern summary (rows,
    distinct, spectrum, per-unit on counts, sketch), measured by the client's own code."""
    return [
        to_wire(SITE_NAMES[i], measure(z, "conv" if z.dim() == 4 else "dense"))
        for i, z in enumerate(pre)
    ]


def changed_rows(before: list[torch.Tensor], after: list[torch.Tensor]) -> list[int]:
    """Per site, how many rows' patterns (pre-activation > 0) differ."""
    return [
        int(((rows_of(a) > 0) != (rows_of(b) > 0)).any(dim=1).sum())
        for a, b in zip(before, after, strict=True)
    ]


@dataclass
class Corruption:
    """Replace a batch: ``kind`` in noise (inputs ~ N(0, scale^2)), constant (one constant image),
    labels (labels shuffled)."""

    kind: str
    scale: float = 10.0


@dataclass
class RunSpec:
    """One training run."""

    model: str  # "mlp" or "cnn"
    data: str  # "digits" or "fake"
    seed: int
    steps: int
    lr: Callable[[int], float]
    optimizer: str = "sgd"
    batch: int = 64
    apt_every: int = 1
    sweep_every: int = 5
    sweep_etas: tuple[float, ...] = tuple(float(e) for e in np.logspace(-3, 2, 16))
    corrupt: dict[int, Corruption] = field(default_factory=dict)
    stop_after_divergence: int = 3


@dataclass
class StepEvents:
    """What one training step produced."""

    step: int
    loss: float
    summary: StepSummary
    probes: list[ProbeRecord]


def load_data(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised scikit-learn digits as 1x8x8 images, or FakeData-shaped random 3x16x16 images
    with random labels (torchvision FakeData's recipe, generated here to stay small and fast)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32)
        x = (x - x.mean()) / x.std()
        return x.reshape(-1, 1, 8, 8), torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(1024, 3, 16, 16, generator=generator)
    y = torch.randint(0, 10, (1024,), generator=generator)
    return x, y


def build(spec: RunSpec, x: torch.Tensor) -> nn.Module:
    """The spec's model for inputs shaped like ``x``."""
    if spec.model == "mlp":
        return MLP(int(x[0].numel()))
    return CNN(int(x.shape[1]), int(x.shape[2]))


def _corrupt(
    c: Corruption, xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if c.kind == "noise":
        return torch.randn(xb.shape, generator=g) * c.scale, yb
    if c.kind == "constant":
        return torch.full_like(xb, c.scale), yb
    return xb, yb[torch.randperm(len(yb), generator=g)]


def train(spec: RunSpec) -> Iterator[StepEvents]:
    """Run the spec; yield each step's events. Stops ``stop_after_divergence`` steps after the loss
    turns non-finite."""
    torch.manual_seed(spec.seed)
    x, y = load_data(spec.data, spec.seed)
    model = build(spec, x)
    params = list(model.parameters())
    lr0 = spec.lr(0)
    if spec.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr0)
    else:
        opt = torch.optim.SGD(params, lr=lr0, momentum=0.9 if spec.optimizer == "momentum" else 0)
    g = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(x), generator=g)
    cursor = 0
    nonfinite_since: int | None = None
    for step in range(spec.steps):
        if cursor + spec.batch > len(x):
            order, cursor = torch.randperm(len(x), generator=g), 0
        idx = order[cursor : cursor + spec.batch]
        cursor += spec.batch
        xb, yb = x[idx], y[idx]
        if step in spec.corrupt:
            xb, yb = _corrupt(spec.corrupt[step], xb, yb, g)
        lr = spec.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr
        logits, before = model(xb)
        loss = nn.functional.cross_entropy(logits, yb)
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            before = [b.detach() for b in before]
            start = [p.detach().clone() for p in params]
            opt.step()
            end = [p.detach().clone() for p in params]
            probes: list[ProbeRecord] = []
            nonfinite = not all(bool(torch.isfinite(b).all()) for b in before)
            if step % spec.apt_every == 0:
                _, after = model(xb)
                nonfinite = nonfinite or not all(bool(torch.isfinite(a).all()) for a in after)
                probes.append(
                    _probe(step, "apt", lr, [lr], before, [changed_rows(before, after)], nonfinite)
                )
            if spec.sweep_every and step % spec.sweep_every == 0 and math.isfinite(loss.item()):
                table = []
                for eta in spec.sweep_etas:
                    for p, a, b in zip(params, start, end, strict=True):
                        p.copy_(a + (b - a) * (eta / lr))
                    _, trial = model(xb)
                    table.append(changed_rows(before, trial))
                for p, b in zip(params, end, strict=True):
                    p.copy_(b)
                probes.append(
                    _probe(step, "sweep", lr, list(spec.sweep_etas), before, table, nonfinite)
                )
        value = float(loss.item())
        summary = StepSummary(
            step=step,
            source="train",
            sites=site_summaries(before),
            loss=value if math.isfinite(value) else None,
            sample_indices=[int(i) for i in idx],
        )
        yield StepEvents(step, value, summary, probes)
        if not math.isfinite(value):
            nonfinite_since = step if nonfinite_since is None else nonfinite_since
            if step - nonfinite_since >= spec.stop_after_divergence:
                return


def _probe(
    step: int,
    kind: str,
    lr: float,
    etas: list[float],
    before: list[torch.Tensor],
    table: list[list[int]],
    nonfinite: bool,
) -> ProbeRecord:
    sites = [
        SiteProbe(
            site=SITE_NAMES[i],
            rows=int(rows_of(before[i]).shape[0]),
            etas=etas,
            changed=[row[i] for row in table],
        )
        for i in range(len(before))
    ]
    return ProbeRecord(step=step, kind=kind, lr=lr, sites=sites, nonfinite=nonfinite)  # type: ignore[arg-type]
