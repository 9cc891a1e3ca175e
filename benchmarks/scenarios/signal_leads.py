"""How early the network's own signals moved before each divergence (dense recordings).

    python benchmarks/scenarios/run.py --half held --apt-every 1 --sweep-every 5 --record DIR
    python benchmarks/scenarios/signal_leads.py DIR [--mads 3] [--smooth 1]

Per diverging run: the first step, from the step at which its learning rate began to rise, at
which any of the four signals the client measures of the network left the band of the
``BAND`` steps before that rise, upwards, by at least ``--mads`` scaled MADs (median and MAD of
the band; Hampel 1974), each signal taken as the median of its last ``--smooth`` values:
z = Phi^-1(D) of the APT probe at the used rate (a dense recording probes every step), ln loss,
ln RMS and ln max |x| of the preactivations (means over sites). The run's divergence step
(SPEC "What counts") minus that step is its **first-departure lead**: about what a detector on
those signals can reach when it alerts at the first sign, with a probe on every step and the
alert received within that step. It is a yardstick, not a proof: a rule with another
reference (the heat rule compares z with probes at steady, calm rates) can see a sign a step
or several earlier.

Beside it, the **rate's lead**: from the first step at which the rate was at least 3x its
median of the last 100 steps (the heat rules' rate condition) to the divergence.

A departure counts only if the same departures stay away from healthy runs: the script applies
them to every healthy run of the recording whose rate never rises (``constant``,
``step_decay``), over the same steps (from step 61 on), and prints how many departed. A
threshold at which they depart buys its lead with false alarms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from series import load, series

from monitor.rate_surge import SURGE_RATE, SURGE_WINDOW
from plugins._robust import median_mad

BAND = 40  # steps before the rate's rise that form each signal's band
SIGNALS = ("z", "loss", "rms", "max")
HEALTHY_FROM = 61  # the first step of the diverging schedules' ramps (jumps: 80)
CONTROLS = ("constant", "step_decay")  # healthy schedules whose rate never rises


def signals(s: dict[str, Any], smooth: int = 1) -> dict[str, np.ndarray]:
    """The four signals by step of a run's ``series`` (NaN where a step has none), and the rate."""
    d = np.clip(s["apt_d"], 0.01, 0.99)  # as the heat rule clips D before Phi^-1
    inv = statistics.NormalDist().inv_cdf
    z = np.array([inv(v) if np.isfinite(v) else np.nan for v in d])
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = np.log(np.where(s["loss"] > 0, s["loss"], np.nan))
    found = {"z": z, "loss": loss, "rms": s["rms"], "max": s["max"]}
    return {**{n: smoothed(v, smooth) for n, v in found.items()}, "lr": s["lr"]}


def smoothed(values: np.ndarray, last: int) -> np.ndarray:
    """Each step's median of the last ``last`` finite values up to it (NaN where none)."""
    if last <= 1:
        return values
    out = np.full(len(values), np.nan)
    for step in range(len(values)):
        window = values[max(0, step - last + 1) : step + 1]
        window = window[np.isfinite(window)]
        if len(window):
            out[step] = float(np.median(window))
    return out


def departure(values: np.ndarray, start: int, end: int, mads: float) -> int | None:
    """The first step in [start, end) at least ``mads`` scaled MADs above the band before start."""
    band = [v for v in values[max(0, start - BAND) : start] if np.isfinite(v)]
    if len(band) < BAND // 4:
        return None
    centre, mad = median_mad(band)
    spread = mad or 1e-9
    for step in range(start, min(end, len(values))):
        if np.isfinite(values[step]) and (values[step] - centre) / spread >= mads:
            return step
    return None


def rise_start(rates: np.ndarray) -> int | None:
    """The first step after step 20 whose rate is above the step before's."""
    for step in range(21, len(rates)):
        if rates[step] > rates[step - 1] * (1 + 1e-6):
            return step
    return None


def surge_start(rates: np.ndarray) -> int | None:
    """The first step after step 20 at SURGE_RATE x the median of its last SURGE_WINDOW steps."""
    for step in range(21, len(rates)):
        window = [r for r in rates[max(20, step - SURGE_WINDOW) : step] if np.isfinite(r)]
        if window and rates[step] >= SURGE_RATE * statistics.median(window):
            return step
    return None


def main() -> None:
    """Print each diverging run's first-departure lead and the rate's lead, then the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mads", type=float, default=3.0)
    parser.add_argument("--smooth", type=int, default=1, help="median of the last K values")
    args = parser.parse_args()
    departure_leads, rate_leads = [], []
    for result in load(args.folder, "-divergence-"):
        recorded = series(result)
        values, end = signals(recorded, args.smooth), recorded["end"]
        start = rise_start(values["lr"])
        if end is None or start is None:
            continue  # never diverged within the run (left out of the score as well)
        first = {n: departure(values[n], start, end, args.mads) for n in SIGNALS}
        moved = [s for s in first.values() if s is not None]
        lead = end - min(moved) if moved else 0  # nothing moved: no lead at all
        surge = surge_start(values["lr"])
        rate_lead = end - surge if surge is not None and surge < end else 0
        departure_leads.append(lead)
        rate_leads.append(rate_lead)
        where = ", ".join(f"{n} {s}" for n, s in first.items() if s is not None) or "none"
        print(
            f"{result.spec.key:50s} rise {start:3d} diverged {end:3d} | first departures: "
            f"{where} | first-departure lead {lead:3d} | rate's lead {rate_lead:3d}"
        )
    healthy = [r for name in CONTROLS for r in load(args.folder, f"-healthy-{name}-")]
    departed = []
    for result in healthy:
        values = signals(series(result), args.smooth)
        for name in SIGNALS:
            at = departure(values[name], HEALTHY_FROM, len(result.losses), args.mads)
            if at is not None:
                departed.append(f"{result.spec.key} {name}@{at}")
    if not departure_leads:
        print("no diverging run in this recording")
        return
    print(
        f"\n{len(departure_leads)} diverging runs: median first-departure lead "
        f"{statistics.median(departure_leads):g} ({sorted(departure_leads)}), "
        f"median rate's lead {statistics.median(rate_leads):g} ({sorted(rate_leads)})"
    )
    print(
        f"healthy runs without a rate rise departing at {args.mads:g} MADs from step "
        f"{HEALTHY_FROM}: "
        f"{len(departed)} of {len(healthy)} x {len(SIGNALS)} signals"
        + (f" ({'; '.join(departed)})" if departed else "")
    )


if __name__ == "__main__":
    main()
