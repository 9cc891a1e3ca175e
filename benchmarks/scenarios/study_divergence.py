"""Divergence rules on dense recordings, thinned to the default probe schedule (tuning only).

    python benchmarks/scenarios/run.py --half tune --apt-every 1 --sweep-every 5 --record DIR
    python benchmarks/scenarios/study_divergence.py DIR [--every 25] [--rise 0.1] [--grid]

A recording made with an APT probe on every step holds every probe any schedule could have run
(probes never change training), so keeping only the steps ``RateTriggered`` would have chosen
gives exactly the events the default schedule sends. Those events go through the
``divergence`` plugin directly (no store, no host: the first alert of a run is what is scored,
and the alert cool-down does not change it), each alert counted as received one step after the
step whose events raised it, as the embedded pipeline promises; sweeps are left out. Prints
the divergence score of ``score.py`` for one setting, or for a grid of them (``--grid``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from driver import Received, Result
from score import DivergenceScore, detector_alerts, score_divergence
from series import load

from monitor.client.apt import DEFAULT_PROBE_BASELINE, DEFAULT_PROBE_RISE, RateTriggered
from monitor.measures import RunContext
from monitor.schema import ProbeRecord, StepSummary
from plugins.divergence import DivergenceDetector, DivergenceSettings


def thinned(result: Result, every: int, rise: float) -> list[tuple[int, Any]]:
    """The run's training summaries and the APT probes ``RateTriggered`` would have run."""
    rates: dict[int, float] = {}
    for _, kind, payload in result.events:
        if kind == "summary" and payload.scalars and "lr/group0" in payload.scalars:
            rates[payload.step] = payload.scalars["lr/group0"]
    schedule = RateTriggered(every=every, rise=rise)
    chosen: set[int] = set()
    for step in range(len(result.losses)):
        schedule(step)  # the client asks at the end of the step before, on the old rate
        if step in rates:  # and again as the step's forward starts, with the step's own rate
            schedule.reconsider(step, rates[step])
        if schedule(step):
            chosen.add(step)
            if step in rates:
                schedule.probed(step, rates[step])
        if step in rates:
            schedule.observe(step, rates[step])
    kept = []
    for at, kind, payload in result.events:
        summary = kind == "summary" and payload.source == "train"
        if summary or (kind == "probe" and payload.kind == "apt" and payload.step in chosen):
            kept.append((at, payload))
    return kept


def alerts_of(
    events: list[tuple[int, Any]], settings: DivergenceSettings, last: int
) -> list[Received]:
    """The divergence alerts of one run's events, as ``on_alert`` would have received them."""
    detector = DivergenceDetector(settings)
    state: dict[str, Any] = {}
    context = RunContext(run_id="study", sites={})
    received = []
    for at, event in events:
        assert isinstance(event, (StepSummary, ProbeRecord))
        for alert in detector.process(event, context, state, {}).alerts:
            signal = str((alert.evidence or {}).get("signal") or (alert.evidence or {}).get("sign"))
            received.append(Received(alert.kind, alert.step, min(at + 1, last), signal, ""))
    return received


def score(
    runs: list[tuple[Result, list[tuple[int, Any]]]], settings: DivergenceSettings
) -> DivergenceScore:
    """The divergence score of ``settings`` on thinned runs."""
    total = DivergenceScore()
    for result, events in runs:
        result.received = alerts_of(events, settings, len(result.losses) - 1)
        score_divergence(total, result, detector_alerts(result, "divergence"))
    return total


def main() -> None:
    """Score one setting (verbose, per run) or a grid."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    # the client's defaults (the rise was 0.2 here while the client's was 0.1)
    parser.add_argument("--every", type=int, default=DEFAULT_PROBE_BASELINE)
    parser.add_argument("--rise", type=float, default=DEFAULT_PROBE_RISE)
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], help="settings as name=value")
    args = parser.parse_args()
    results = load(args.folder)
    runs = [(r, thinned(r, args.every, args.rise)) for r in results]
    types = {f.name: f.type for f in dataclasses.fields(DivergenceSettings)}
    given: dict[str, str] = dict(x.split("=") for x in args.set)
    values: dict[str, Any] = {
        k: int(v) if types[k] in (int, "int") else float(v) for k, v in given.items()
    }
    base = DivergenceSettings(**values)
    if not args.grid:
        total = score(runs, base)
        for result, events in runs:
            probes = sum(isinstance(e, ProbeRecord) for _, e in events)
            first = [(a.step, a.at, a.signal) for a in result.received][:3]
            print(f"{result.spec.key:55s} probes {probes:3d} {first}")
        print(total.row())
        return
    grid: dict[str, list[Any]] = {
        "heat_rate": [2.0, 3.0, 4.0, 5.0],
        "heat_rise": [0.3, 0.5, 0.7, 1.0],
        "heat_reference": [2, 3],
        "hot_d": [0.8, 1.1],  # 1.1: the "hot" rule off
        "climb_for": [5, 8],
    }
    rows = []
    for combination in itertools.product(*grid.values()):
        chosen: dict[str, Any] = dict(zip(grid, combination, strict=True))
        settings = dataclasses.replace(base, **chosen)
        total = score(runs, settings)
        lead = statistics.median(total.leads) if total.leads else 0
        rows.append((total.in_time - 3 * total.false_alarms, lead, combination, total.row()))
    rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
    for row in rows[:25]:
        print(row[2], row[3]["in_time"], row[3]["median_lead"], row[3]["false_alarm_runs"])


if __name__ == "__main__":
    main()
