"""What the default APT probes cost: ``watch()`` at defaults against ``watch(apt_every=None)``.

    python benchmarks/scenarios/probe_cost.py [--steps 300] [--cnn-steps 1500] [--rounds 5] [--ramp]

Per model, alternating rounds of the same training loop (plain, monitored with probes off,
monitored at defaults), one thread; prints the median seconds per step of each and the probes'
share of a plain step: (defaults - probes off) / plain, and that share from the fastest round of
each mode (the least disturbed on a shared machine). Timing starts once the embedded host
process has started (its start-up, seconds of imports, would otherwise land in the timed loop of
whichever mode it overlaps). The default schedule (``RateTriggered``)
probes every 25 steps while the learning rate holds; ``--ramp`` makes the rate rise 4% per step
(a saw-tooth, back to the start every 50 steps): a probe every third step while the rate climbs
past the last probe's, about one in six steps overall, the cost while a rate climbs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from driver import wait_for_host
from torch import nn

import monitor
from monitor.settings import Settings


def mlp() -> tuple[nn.Module, torch.Tensor]:
    """The issue's MLP 3072-512x3 on CIFAR-shaped inputs, batch 128."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = 3 * 32 * 32
    for _ in range(3):
        layers += [nn.Linear(width, 512), nn.ReLU()]
        width = 512
    return nn.Sequential(*layers, nn.Linear(512, 10)), torch.randn(128, 3, 32, 32)


def digits_cnn() -> tuple[nn.Module, torch.Tensor]:
    """A small CNN on 8x8 digits-shaped inputs, batch 64."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(256, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    return model, torch.randn(64, 1, 8, 8)


def seconds_per_step(
    build: Callable[[], tuple[nn.Module, torch.Tensor]],
    steps: int,
    options: dict | None,
    ramp: bool = False,
) -> float:
    """One timed loop of ``steps`` steps; ``options`` None: no monitor."""
    torch.manual_seed(0)
    model, x = build()
    y = torch.randint(0, 10, (x.shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with tempfile.TemporaryDirectory() as folder:
        mon = None
        if options is not None:
            settings = Settings(database_url=f"sqlite:///{folder}/a.db", mlflow_tracking_uri="")
            mon = monitor.watch(model, opt, settings=settings, **options)
            wait_for_host(mon.transport)
        for _ in range(10):  # warm-up, not timed
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        started = time.perf_counter()
        for step in range(steps):
            if ramp:
                for group in opt.param_groups:
                    group["lr"] = 0.001 * 1.04 ** (step % 50)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if mon is not None:
                mon.record_loss(loss)
        elapsed = time.perf_counter() - started
        if mon is not None:
            mon.close()
    return elapsed / steps


def main() -> None:
    """Print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps of the MLP")
    parser.add_argument("--cnn-steps", type=int, default=1500, help="timed steps of the CNN")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ramp", action="store_true", help="a rising learning rate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    modes: dict[str, dict | None] = {
        "plain": None,
        "probes off": {"apt_every": None},
        "defaults": {},
    }
    for name, build, steps in (
        ("mlp 3072-512x3", mlp, args.steps),
        ("digits cnn", digits_cnn, args.cnn_steps),
    ):
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, options in modes.items():
                times[mode].append(seconds_per_step(build, steps, options, args.ramp))
        median = {m: statistics.median(t) for m, t in times.items()}
        share = (median["defaults"] - median["probes off"]) / median["plain"]
        cells = ", ".join(f"{m} {1e3 * v:.2f} ms" for m, v in median.items())
        # The fastest round of each mode: the least disturbed by other jobs on a shared machine.
        fastest = {m: min(t) for m, t in times.items()}
        low = (fastest["defaults"] - fastest["probes off"]) / fastest["plain"]
        print(
            f"{name}: {cells}; probes add {100 * share:.1f}% of a plain step "
            f"(fastest rounds: {100 * low:.1f}%, plain {1e3 * fastest['plain']:.2f} ms)"
        )


if __name__ == "__main__":
    main()
