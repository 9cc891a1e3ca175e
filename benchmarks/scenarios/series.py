"""Per-step series of a recorded run, for offline study of divergence signals.

    python benchmarks/scenarios/series.py DIR [--match KEY]   # one line per run: where each
                                                               # signal stood before divergence

``series(result)`` turns a recorded run (``run.py --record``) into arrays by step: the loss, the
learning rate (``lr/group0``), the APT change fraction D at the used rate (mean over sites), the
transition fit of each sweep (mean over sites), the preactivation RMS (mean over sites of
ln RMS) and the preactivation max |x| (mean over sites of ln max |x|). Steps without a value
hold NaN.
"""

from __future__ import annotations

import argparse
import gzip
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from driver import Result, diverged_at

from plugins.transition_fit import fit_transition


def load(folder: Path, match: str = "") -> list[Result]:
    """Every recorded run under ``folder`` whose key contains ``match``."""
    results = []
    for file in sorted(folder.glob("*.pkl.gz")):
        if match and match not in file.name:
            continue
        with gzip.open(file, "rb") as f:
            results.append(pickle.load(f))
    return results


def series(result: Result) -> dict[str, Any]:
    """Arrays by step of one recorded run (NaN where a step has no value)."""
    n = len(result.losses)
    out: dict[str, Any] = {
        name: np.full(n, np.nan) for name in ("lr", "apt_d", "apt_lr", "mu", "sigma", "rms", "max")
    }
    out["loss"] = np.array(result.losses, dtype=float)
    out["sweeps"] = {}
    for _, kind, payload in result.events:
        if kind == "summary" and payload.source == "train" and payload.step < n:
            rates = payload.scalars or {}
            if "lr/group0" in rates:
                out["lr"][payload.step] = rates["lr/group0"]
            logs = [
                0.5 * math.log(s.sumsq / s.rows)
                for s in payload.sites
                if s.sumsq and s.rows and math.isfinite(s.sumsq)
            ]
            if logs:
                out["rms"][payload.step] = float(np.mean(logs))
            tops = [
                math.log(s.max_abs) for s in payload.sites if s.max_abs and s.max_abs < math.inf
            ]
            if tops:
                out["max"][payload.step] = float(np.mean(tops))
        if kind != "probe" or payload.step >= n:
            continue
        if payload.kind == "apt":
            ds = [s.changed[0] / s.rows for s in payload.sites if s.rows and s.changed]
            if ds:
                out["apt_d"][payload.step] = float(np.mean(ds))
                out["apt_lr"][payload.step] = payload.lr
        else:
            by_eta: dict[float, list[float]] = {}
            for site in payload.sites:
                for eta, c in zip(site.etas, site.changed, strict=True):
                    by_eta.setdefault(eta, []).append(c / site.rows)
            etas = sorted(by_eta)
            means = [float(np.mean(by_eta[e])) for e in etas]
            out["sweeps"][payload.step] = (payload.lr, etas, means)
            fit = fit_transition(etas, means)
            if fit.ok:
                out["mu"][payload.step] = fit.mu
                out["sigma"][payload.step] = fit.sigma
    out["end"] = diverged_at(result.losses, result.classes, result.spec.corrupt)
    return out


def main() -> None:
    """Print, per run, the divergence step and the signals 20 and 5 steps before it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--match", default="")
    args = parser.parse_args()
    for result in load(args.folder, args.match):
        s = series(result)
        end = s["end"]
        print(result.spec.key, "end", end, "base", result.spec.base_lr)


if __name__ == "__main__":
    main()
