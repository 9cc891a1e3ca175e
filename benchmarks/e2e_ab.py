"""Two versions of apmon side by side: ``e2e.py``'s whole-run measurement, interleaved.

On a noisy machine two separate ``e2e.py`` runs minutes apart can differ by more than a change
does (a plain 10-s ResNet-20 loop took 8.2 to 11.7 s within minutes on the 2-core machine). This
script runs, in each round, a plain process and ``watch()`` at its defaults from this checkout
and from a second one (``--baseline``: e.g. ``git worktree add /some/where <commit>``), one
after another in fresh processes, the order reversed every other round, and prints each
version's median whole-run ratio to plain with every round's figure.

    python benchmarks/e2e_ab.py --baseline ../apmon-before --model resnet20 --rounds 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from e2e import MODELS, prepare_stores, round_order, spawn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout")
    parser.add_argument("--model", choices=MODELS, default="mlp_small")
    parser.add_argument("--steps", type=int, default=1000, help="steps per loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: its default)")
    args = parser.parse_args(argv)
    if not (args.baseline / "benchmarks" / "e2e.py").is_file():
        parser.error(f"{args.baseline} is not an apmon checkout (no benchmarks/e2e.py)")
    versions = {"baseline": args.baseline.resolve(), "current": HERE.parent}
    totals: dict[str, list[float]] = {"plain": [], "baseline": [], "current": []}
    with tempfile.TemporaryDirectory(prefix="apmon-e2e-ab-") as folder:
        prepare_stores(Path(folder))
        for round_no in range(args.rounds):
            for name in round_order(["plain", "baseline", "current"], round_no):
                checkout = versions.get(name, HERE.parent)
                mode = "plain" if name == "plain" else "defaults"
                run = [args.model, mode, str(args.threads), str(args.steps), folder]
                totals[name].append(spawn(run, checkout)["total_s"])
            figures = ", ".join(f"{name} {values[-1]:.2f} s" for name, values in totals.items())
            print(f"round {round_no + 1}/{args.rounds}: {figures}", flush=True)
    for name in ("baseline", "current"):
        ratios = [run / plain for run, plain in zip(totals[name], totals["plain"], strict=True)]
        rounds = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"{name}: median {statistics.median(ratios):.3f}x of plain (rounds: {rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
