"""The monitor's own time on the training thread under two capture budgets, side by side.

``monitor.client.budget`` counts patterns on every k-th captured step, k the smallest power of
two that keeps the monitor's own time within ``capture_budget`` of the plain step. This script
shows what a budget buys and costs on one model: one warm process trains it under
``watch(model, opt)`` with a transport that drops every record and APT probes off (the
statistics alone), and alternates blocks of steps under each budget. Per budget it prints the
monitor's own time per step (what the budget measures: capture and summary work, timed by the
monitor itself, so far less noisy than step times), the steps that counted patterns and the
stride, and the running costs of a full and of a scale-only step.

    python benchmarks/budget_own.py --model resnet20 --steps 32 --blocks 2
    python benchmarks/budget_own.py --model mlp3072 --budgets 0.05 0.03 0.02
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import MODELS, DropTransport, round_order, training


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="resnet20")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.03])
    parser.add_argument("--blocks", type=int, default=2, help="blocks of each budget, alternated")
    parser.add_argument("--steps", type=int, default=32, help="steps per block")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: its default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from monitor.client import handle

    own: list[tuple[bool, float]] = []  # (counted patterns, own seconds) per step
    note_cost = handle.Monitor._note_cost

    def noted(monitor: handle.Monitor, began: float) -> None:
        own.append((monitor._full, monitor._own + time.perf_counter() - began))
        note_cost(monitor, began)

    handle.Monitor._note_cost = noted  # type: ignore[method-assign,assignment]
    model, opt, step = training(args.model)
    mon = handle.watch(model, opt, transport=DropTransport(), apt_every=None)
    per_step: dict[float, list[float]] = {b: [] for b in args.budgets}
    full: dict[float, int] = dict.fromkeys(args.budgets, 0)
    strides: dict[float, set[int]] = {b: set() for b in args.budgets}
    with mon:
        for _ in range(4):  # the first steps measure a full and a scale-only step
            step()
        budget = mon.capture_budget
        for block in range(args.blocks):
            for fraction in round_order(args.budgets, block):
                budget.fraction = fraction
                budget._adjust()  # the stride for this budget from the running costs
                for _ in range(2):
                    step()
                own.clear()
                for _ in range(args.steps):
                    step()
                per_step[fraction].append(statistics.mean(s for _, s in own))
                full[fraction] += sum(1 for counted, _ in own if counted)
                strides[fraction].add(budget.stride)
    handle.Monitor._note_cost = note_cost  # type: ignore[method-assign]
    print(f"{args.model}, torch threads {torch.get_num_threads()}, probes off:")
    for fraction in args.budgets:
        mean_ms = statistics.mean(per_step[fraction]) * 1e3
        print(
            f"  budget {fraction:g}: own {mean_ms:.1f} ms a step, "
            f"patterns on {full[fraction]} of {args.blocks * args.steps} steps "
            f"(stride {', '.join(map(str, sorted(strides[fraction])))})"
        )
    if budget._cost_full is not None and budget._cost_scale is not None and budget._plain:
        print(
            f"  running costs: full step {budget._cost_full * 1e3:.1f} ms, scale-only "
            f"{budget._cost_scale * 1e3:.1f} ms, plain step {budget._plain * 1e3:.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
