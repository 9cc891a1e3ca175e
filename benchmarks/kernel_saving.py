"""What the compiled kernels save inside a training loop, against the rent that buys them.

``monitor.client.kernel_loader`` loads the numba kernels once the seconds they *would have
saved* add up to their loading's cost; the shares it charges (``SCALE_SAVING``,
``COUNT_SAVING``) were measured per site, each call alone. This script checks them where they
apply: one warm process trains a model under ``watch(model, opt)`` with a transport that drops
every record (the capture path alone, the least noisy), the kernels loaded, and alternates
blocks of steps with the kernels in use and with them held off (numpy and torch count, and
the rent is charged as it would be before loading). It prints the step's time both ways, the
saving, and the rent charged per step: a rent well above the saving buys the kernels (and
their 100 MiB) too early.

    python benchmarks/kernel_saving.py --model mlp_small
    python benchmarks/kernel_saving.py --model digits_cnn --blocks 12 --steps 400
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import MODELS, DropTransport, training


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mlp_small")
    parser.add_argument("--blocks", type=int, default=10, help="blocks of each kind, alternated")
    parser.add_argument("--steps", type=int, default=1000, help="steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: its default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import monitor
    from monitor.client import kernel_loader

    kernels = kernel_loader.load_kernels()
    if kernels is None:
        raise SystemExit("the compiled kernels did not load: nothing to compare")
    model, opt, plain_step = training(args.model)
    mon = monitor.watch(model, opt, transport=DropTransport())
    step = mon(plain_step)
    for _ in range(args.steps):  # warm: every path compiled and cached, the budget settled
        step()
    with_kernels: list[float] = []
    without: list[float] = []
    rent: list[float] = []
    for block in range(2 * args.blocks):
        held_off = block % 2 == 1
        # Held off, ``summary`` takes the numpy and torch paths and charges their rent; the
        # policy keeps the rent from loading the kernels again meanwhile.
        kernel_loader.set_policy("never" if held_off else "auto")
        kernel_loader._loaded = None if held_off else kernels
        charged = kernel_loader.would_have_saved()
        began = time.perf_counter()
        for _ in range(args.steps):
            step()
        per_step = (time.perf_counter() - began) / args.steps
        (without if held_off else with_kernels).append(per_step)
        if held_off:
            rent.append((kernel_loader.would_have_saved() - charged) / args.steps)
    kernel_loader._loaded = kernels
    mon.close()
    on, off, charged = (statistics.median(v) * 1e3 for v in (with_kernels, without, rent))
    # Each held-off block against the block before it: the machine's drift hits both alike
    savings = sorted(1e3 * (b - a) for a, b in zip(with_kernels, without, strict=True))
    print(
        f"{args.model}, torch threads {torch.get_num_threads()}, {args.blocks} blocks of "
        f"{args.steps} steps each way (capture path; patterns counted every "
        f"{mon.capture_budget.stride}-th step):"
    )
    print(f"  with the kernels   {on:.3f} ms/step")
    print(f"  without them       {off:.3f} ms/step")
    print(
        f"  saving             {statistics.median(savings):+.3f} ms/step (median of the pairs; "
        f"{savings[0]:+.3f}..{savings[-1]:+.3f})"
    )
    print(f"  rent charged       {charged:.3f} ms/step (what the loader counts as saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
