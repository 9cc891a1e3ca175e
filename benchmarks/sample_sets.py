"""Seed 002's findings on an MLP trained on scikit-learn's digits, measured through apmon.

Haasbroek & Davel train ReLU MLPs (bias on the first hidden layer only) on MNIST with Adam
(lr 1e-3, batches of 60, cross-entropy) and measure, on a held-out set at log-spaced points of
training, the per-layer averages of the activation fraction f_l, predictability p_l and
informativeness u_l (eqs. 16-17). Here: digits (1797 images of 8x8), 500 held out as the
labelled probe set, a 4 x 64 MLP of the same kind, 3 seeds, `watch(..., probe_set=(x, y))` with
a log-spaced probe schedule; the values are read back from the store the plugin wrote them to.

Checks of the findings that apply (Sec. 6 of the paper):
1. cluster sizes first grow, then shrink: per layer, f_l peaks after initialisation and ends
   below its peak;
2. first-layer clusters shrink faster than deeper ones: f_1 falls by more (peak to end, relative)
   than f_l of every deeper layer;
3. deeper units become more class-sensitive: p_l rises over training, and ends higher in the
   deepest layer than in the first.

    python benchmarks/sample_sets.py [--epochs 200] [--seeds 3] [--out benchmarks/sample_sets.png]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LAYERS = 4
WIDTH = 64
HELD_OUT = 500
BATCH = 60


class MLP(nn.Module):
    """Seed 002's architecture: ReLU hidden layers, bias on the first one only."""

    def __init__(self, layers: int = LAYERS, width: int = WIDTH) -> None:
        super().__init__()
        sizes = [64] + [width] * layers
        self.hidden = nn.ModuleList(
            nn.Linear(a, b, bias=(i == 0)) for i, (a, b) in enumerate(itertools.pairwise(sizes))
        )
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(layers))
        self.out = nn.Linear(width, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for linear, relu in zip(self.hidden, self.relus, strict=True):
            x = relu(linear(x))
        return self.out(x)


def log_steps(last: int, per_decade: int = 8) -> set[int]:
    """About ``per_decade`` log-spaced steps per factor of ten, from 0 to ``last``."""
    points = np.unique(np.round(np.logspace(0, np.log10(last + 1), per_decade * 4)).astype(int))
    return {0, last, *(int(p) - 1 for p in points if p - 1 <= last)}


def train(seed: int, epochs: int, database: str) -> tuple[str, float]:
    """Train one seed with the monitor on; returns the run id and the held-out accuracy."""
    from sklearn.datasets import load_digits

    from monitor.client.handle import watch
    from monitor.settings import Settings

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    held, train_index = order[:HELD_OUT], order[HELD_OUT:]
    torch.manual_seed(seed)
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps_per_epoch = (len(train_index) + BATCH - 1) // BATCH
    last = epochs * steps_per_epoch - 1
    probe_steps = log_steps(last)
    settings = Settings(database_url=database, mlflow_tracking_uri="")
    generator = torch.Generator().manual_seed(seed)
    with watch(
        model,
        optimizer,
        settings=settings,
        name=f"sample-sets-{seed}",
        every=lambda step: False,  # only the probe set is measured here
        probe_set=(x[held], y[held]),
        probe_every=lambda step: step in probe_steps,
        apd_rows=HELD_OUT,
    ) as monitor:
        for _ in range(epochs):
            shuffled = train_index[torch.randperm(len(train_index), generator=generator)]
            for start in range(0, len(shuffled), BATCH):
                batch = shuffled[start : start + BATCH]
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
    with torch.no_grad():
        accuracy = float((model(x[held]).argmax(1) == y[held]).float().mean())
    return monitor.run_id, accuracy


def series(store, run_id: str, name: str) -> dict[str, dict[int, float]]:
    """Per site: step -> value of one probe-set measure."""
    out: dict[str, dict[int, float]] = {}
    for point in store.measures(run_id, name=name):
        if point.site is not None and point.source == "probe_set":
            out.setdefault(point.site, {})[point.step] = point.value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/sample_sets.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from monitor.store import open_store

    tmp = Path(tempfile.mkdtemp(prefix="apmon-sample-sets-"))
    database = f"sqlite:///{tmp / 'apmon.db'}"
    started = time.perf_counter()
    runs = [train(seed, args.epochs, database) for seed in range(args.seeds)]
    store = open_store(database)
    sites = [f"relus.{i}#0" for i in range(LAYERS)]
    names = ("activation_fraction", "predictability", "informativeness")
    # values[name][seed][layer, step index]
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    steps: list[int] = []
    for run_id, _ in runs:
        for name in names:
            per_site = series(store, run_id, name)
            steps = sorted(per_site[sites[0]])
            values[name].append(np.array([[per_site[s][t] for t in steps] for s in sites]))
    mean = {name: np.mean(values[name], axis=0) for name in names}
    print(
        f"{args.seeds} seeds x {args.epochs} epochs in {time.perf_counter() - started:.0f} s; "
        f"held-out accuracy {', '.join(f'{a:.3f}' for _, a in runs)}"
    )
    print(f"steps measured: {steps}")
    print("\nlayer   f(0)    f(peak) at step   f(end)  drop   p(0)   p(end)  u(0)   u(end)")
    f, p, u = mean["activation_fraction"], mean["predictability"], mean["informativeness"]
    drops = []
    for layer in range(LAYERS):
        peak = int(np.argmax(f[layer]))
        drop = (f[layer, peak] - f[layer, -1]) / f[layer, peak]
        drops.append(drop)
        print(
            f"{layer + 1:>5}  {f[layer, 0]:.3f}  {f[layer, peak]:.3f} {steps[peak]:>8}  "
            f"{f[layer, -1]:.3f}  {drop:.3f}  {p[layer, 0]:.3f}  {p[layer, -1]:.3f}  "
            f"{u[layer, 0]:.3f}  {u[layer, -1]:.3f}"
        )
    grow_shrink = [
        bool(np.argmax(f[layer]) > 0 and f[layer, -1] < f[layer].max()) for layer in range(LAYERS)
    ]
    per_seed = [
        all(np.argmax(v[layer]) > 0 and v[layer, -1] < v[layer].max() for layer in range(LAYERS))
        for v in values["activation_fraction"]
    ]
    first_fastest = all(drops[0] > d for d in drops[1:])
    rises = [bool(p[layer, -1] > p[layer, 0]) for layer in range(LAYERS)]
    deeper_higher = bool(p[-1, -1] > p[0, -1])
    print("\nfindings (seed-mean curves):")
    print(
        f"1. clusters grow, then shrink, per layer: {grow_shrink} (per seed, all layers: "
        f"{per_seed})"
    )
    print(
        f"2. first layer shrinks fastest (relative drop from peak): {first_fastest} "
        f"({', '.join(f'{d:.3f}' for d in drops)})"
    )
    print(f"3. predictability rises per layer: {rises}; deepest ends above first: {deeper_higher}")
    plot(steps, mean, values, sites, Path(args.out))
    print(f"\nfigure: {args.out}")


def plot(steps, mean, values, sites, out: Path) -> None:
    """f_l, p_l, u_l per layer over steps (log axis), seed means with the seeds' range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array(steps) + 1
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    titles = {
        "activation_fraction": "activation fraction f_l",
        "predictability": "predictability p_l",
        "informativeness": "informativeness u_l",
    }
    for ax, (name, title) in zip(axes, titles.items(), strict=True):
        stack = np.array(values[name])
        for layer, site in enumerate(sites):
            line = ax.plot(x, mean[name][layer], label=f"layer {layer + 1} ({site})")[0]
            ax.fill_between(
                x,
                stack[:, layer].min(0),
                stack[:, layer].max(0),
                color=line.get_color(),
                alpha=0.15,
            )
        ax.set_xscale("log")
        ax.set_xlabel("step + 1")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    figure.suptitle("seed 002 measures on a 4 x 64 MLP trained on digits (500 held-out probes)")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


if __name__ == "__main__":
    main()
