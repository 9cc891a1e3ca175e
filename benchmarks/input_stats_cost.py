"""What the input statistics (``input/rms``, ``input/max_abs``) add to a captured step.

Per model of ``benchmarks/e2e.py`` (the digits CNN, batch 64; the MLP 3072-512x3, batch 128):
the median time of ``InputStats.add`` on the step's input batch (its first 32 rows, the default
``capture_rows``) plus ``take`` (the step's scalars), against the median time of a plain training
step (forward, backward, SGD step) of the same model and batch. Medians over ``--rounds``
rounds of ``--calls`` calls, one thread unless ``--threads``; ``--device cuda`` times both on the
GPU (synchronised after each call).

    python benchmarks/input_stats_cost.py
    python benchmarks/input_stats_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import build

from monitor.client.handle import DEFAULT_CAPTURE_ROWS
from monitor.client.input_stats import InputStats


def median_us(
    call: Callable[[], object], calls: int, rounds: int, sync: Callable[[], None]
) -> float:
    """Median over rounds of the mean time of one call, in microseconds."""
    for _ in range(max(3, calls // 10)):
        call()
    sync()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            call()
            sync()
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def row(
    name: str, device: torch.device, calls: int, rounds: int, sync: Callable[[], None]
) -> tuple[tuple[int, ...], float, float]:
    """(batch shape, plain step us, input statistics us) of one model."""
    model, x, y = build(name)
    model, x, y = model.to(device), x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    stats = InputStats()

    def measure() -> None:
        stats.add((x,), {}, DEFAULT_CAPTURE_ROWS)
        stats.take()

    return (
        tuple(x.shape),
        median_us(step, calls, rounds, sync),
        median_us(measure, calls, rounds, sync),
    )


def main(argv: list[str] | None = None) -> int:
    """Print one row per model: plain step, input statistics, their share of the step."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {device}")
    print("| model | batch | plain step | input statistics | share of a plain step |")
    print("|---|---|---|---|---|")
    for name in ("digits_cnn", "mlp3072"):
        shape, plain, extra = row(name, device, args.calls, args.rounds, sync)
        print(
            f"| {name} | {shape} | {plain:.0f} us | {extra:.1f} us | {100 * extra / plain:.2f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
