"""Scenario suite: score the divergence and bad-batch detectors on runs whose truth is known.

Every run trains a small ReLU net (``driver.py``) and feeds the wire events it produces (APT
probes, learning-rate sweeps, step summaries with loss and sample indices) through the real plugin
host and SQL store (``PluginHost`` + ``SqlStore`` on a temporary SQLite file); the alerts read back
from the store are scored against the known truth.

    python benchmarks/scenarios/run.py            # full suite
    python benchmarks/scenarios/run.py --quick    # the small CI version
    python benchmarks/scenarios/run.py --record DIR  # also store the wire events of each run
    python benchmarks/scenarios/run.py --replay DIR  # score the plugins on them, no training

A replay feeds the very events a recorded run sent through the same host and store: another
detector version is scored on the same runs without training them again (about 1.7 min of CPU for
the full suite; the recording takes about 40 MB).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import pickle
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from driver import Corruption, RunSpec, StepEvents, train

from monitor.host import PluginHost
from monitor.measures import load_plugins
from monitor.schema import RunStart, SiteInfo
from monitor.store import open_store

PLUGINS = ["apt", "transition_fit", "divergence", "strikes"]
EXPLODE = 10.0  # "exploded": the loss exceeds 10x its running minimum
SMOOTH = 5  # ... where the loss is the mean of the last 5 batch losses (single batches are noisy)
AFTER = 20  # steps a run goes on after its loss exploded


@dataclass
class Outcome:
    """One run's truth and what the detectors said."""

    group: str
    scenario: str
    model: str
    data: str
    seed: int
    diverging: bool
    diverged_at: int | None = None
    alerts: dict[str, list[int]] = field(default_factory=dict)
    injected: list[int] = field(default_factory=list)
    corruption: str = ""
    loss_spikes: list[int] = field(default_factory=list)
    strike_indices_ok: bool = True
    seconds: float = 0.0


def ramp(base: float, start: int, rate: float, cap: float = math.inf) -> Callable[[int], float]:
    """Constant ``base`` until ``start``, then multiplied by ``rate`` every step, up to ``cap``."""
    return lambda s: min(cap, base * rate ** max(0, s - start))


def linear(base: float, start: int, per_step: float) -> Callable[[int], float]:
    """Constant ``base`` until ``start``, then growing by ``per_step`` every step."""
    return lambda s: base + per_step * max(0, s - start)


BASE = {"mlp": 0.1, "cnn": 0.1}
# Caps of the healthy ramps: rates at which each model trains on digits without the loss rule
# ever firing (the MLP at a cap of 0.3 already has loss bursts of 10x its tiny running minimum).
SAFE_CAP = {"mlp": 0.2, "cnn": 0.3}


def divergence_specs(quick: bool) -> list[tuple[str, bool, RunSpec]]:
    """(scenario, diverging, spec) for the divergence group.

    Every run first trains at a healthy rate for 100 steps (so the loss has a minimum to explode
    from), then the learning rate grows: without bound (diverging) or up to a safe cap (healthy).
    Jumps straight to an unstable rate are left out: the loss explodes within two steps of the
    jump, which leaves no time for any warning.
    """
    seeds = [0] if quick else [0, 1]
    steps = 450
    cases: list[tuple[str, bool, RunSpec]] = []
    models = [("mlp", "digits"), ("cnn", "digits")] + ([] if quick else [("cnn", "fake")])
    for model, data in models:
        base = BASE[model]
        for seed in seeds:
            cases += [
                (
                    "ramp x1.015/step",
                    True,
                    RunSpec(model, data, seed, steps, ramp(base, 100, 1.015)),
                ),
                ("ramp x1.03/step", True, RunSpec(model, data, seed, steps, ramp(base, 100, 1.03))),
                ("healthy constant", False, RunSpec(model, data, seed, steps, ramp(base, 0, 1.0))),
                (
                    "healthy capped ramp",
                    False,
                    RunSpec(model, data, seed, steps, ramp(base, 100, 1.015, SAFE_CAP[model])),
                ),
            ]
            if not quick:
                linear_ramp = linear(base, 100, base / 20)
                cases.append(("linear ramp", True, RunSpec(model, data, seed, steps, linear_ramp)))
    return cases


CORRUPTIONS = {
    "noise x10": Corruption("noise", 10.0),
    "constant image": Corruption("constant", 3.0),
    "labels shuffled": Corruption("labels"),
}


def bad_batch_specs(quick: bool) -> list[tuple[str, list[int], RunSpec]]:
    """(corruption, injected steps, spec) for the bad-batch group."""
    seeds = [0] if quick else [0, 1]
    steps = 240 if quick else 300
    injected = list(range(40, steps - 10, 25))
    cases = []
    for model in ("mlp", "cnn"):
        for seed in seeds:
            for name, corruption in CORRUPTIONS.items():
                spec = RunSpec(
                    model,
                    "digits",
                    seed,
                    steps,
                    ramp(BASE[model], 0, 1.0),
                    sweep_every=0,
                    corrupt={s: corruption for s in injected},
                )
                cases.append((name, injected, spec))
    return cases


class Events:
    """Where a run's events come from: training (``train``), optionally recording what it sent
    into ``record``, or a recording in ``replay`` (one gzipped pickle of StepEvents per run)."""

    def __init__(self, record: Path | None = None, replay: Path | None = None) -> None:
        self.record, self.replay = record, replay
        if record is not None:
            record.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(group: str, name: str, spec: RunSpec) -> str:
        """File name of a run: what identifies it in both suites (the quick suite's divergence
        runs are the full suite's seed-0 runs, so a full recording replays both)."""
        raw = f"{group}-{name}-{spec.model}-{spec.data}-{spec.seed}-{spec.steps}"
        return re.sub(r"[^A-Za-z0-9.]+", "_", raw) + ".pkl.gz"

    def __call__(self, group: str, name: str, spec: RunSpec) -> Iterator[StepEvents]:
        """The run's events, in the order it sent them."""
        file = self.key(group, name, spec)
        if self.replay is not None:
            with gzip.open(self.replay / file, "rb") as stream:
                yield from pickle.load(stream)
            return
        sent: list[StepEvents] = []
        try:
            for events in train(spec):
                sent.append(events)
                yield events
        finally:  # also when the consumer stops early and closes the generator
            if self.record is not None:
                with gzip.open(self.record / file, "wb", compresslevel=3) as stream:
                    pickle.dump(sent, stream)


def execute(
    host: PluginHost, store, events_of: Iterator[StepEvents], name: str
) -> tuple[list[float], dict[str, list[int]], dict[int, list[int]], dict[int, object]]:
    """Feed one run's events through the host; the losses, alert steps by kind, sample indices by
    step, and the bad-batch alerts' evidence by step."""
    run_id = store.create_run(
        "scenarios",
        RunStart(
            name=name, sites=[SiteInfo(name=f"site{i}", kind="dense", units=1) for i in range(3)]
        ),
    )
    losses: list[float] = []
    indices: dict[int, list[int]] = {}
    for events in events_of:
        losses.append(events.loss)
        for probe in events.probes:
            host.handle_probe(run_id, probe)
        host.handle_summary(run_id, events.summary)
        indices[events.step] = events.summary.sample_indices or []
        exploded = diverged_at(losses) if events.step % 10 == 0 else None
        if exploded is not None and events.step >= exploded + AFTER:
            break  # later alerts cannot change the score
    close = getattr(events_of, "close", None)
    if close is not None:
        close()  # a recording source stores what it sent when closed
    host.finish(run_id, len(losses) - 1)
    alerts: dict[str, list[int]] = {}
    evidence: dict[int, object] = {}
    for alert in store.alerts(run_id):
        alerts.setdefault(alert.kind, []).append(alert.step)
        if alert.kind == "bad_batch":
            evidence[alert.step] = alert.evidence.get("sample_indices")
    return losses, alerts, indices, evidence


def diverged_at(losses: list[float]) -> int | None:
    """First step whose loss is non-finite or whose 5-step mean exceeds 10x its running minimum."""
    best = math.inf
    for step, loss in enumerate(losses):
        if not math.isfinite(loss):
            return step
        window = losses[max(0, step - SMOOTH + 1) : step + 1]
        smooth = sum(window) / len(window)
        if len(window) == SMOOTH:
            if smooth > EXPLODE * best:
                return step
            best = min(best, smooth)
    return None


def loss_spikes(losses: list[float]) -> list[int]:
    """The loss-spike rule: steps whose loss exceeds 2x the mean of the previous 10 losses."""
    return [
        s
        for s in range(10, len(losses))
        if math.isfinite(losses[s]) and losses[s] > 2.0 * statistics.fmean(losses[s - 10 : s])
    ]


def run_suite(
    quick: bool, log: Callable[[str], None], source: Events | None = None
) -> list[Outcome]:
    """Every scenario, each in a fresh run of one store; events from ``source`` (default: train)."""
    source = source or Events()
    shm = "/dev/shm"
    with tempfile.TemporaryDirectory(dir=shm if os.path.isdir(shm) else None) as folder:
        # A tmpfs file when there is one: the SQLite store is the real one, only fsync is free.
        store = open_store(f"sqlite:///{folder}/scenarios.db", auto_upgrade=True)
        registry = load_plugins(only=PLUGINS)
        missing = set(PLUGINS) - {p["name"] for p in registry.describe()}
        if missing:
            raise SystemExit(f"plugins not installed: {sorted(missing)} (pip install -e .)")
        # Cool-down 0: every alert is stored, so each injected step can be scored.
        host = PluginHost(registry, store, alert_cooldown_steps=0)
        outcomes: list[Outcome] = []
        for scenario, diverging, spec in divergence_specs(quick):
            started = time.perf_counter()
            events = source("divergence", scenario, spec)
            losses, alerts, _, _ = execute(host, store, events, scenario)
            outcome = Outcome(
                "divergence",
                scenario,
                spec.model,
                spec.data,
                spec.seed,
                diverging,
                diverged_at=diverged_at(losses),
                alerts=alerts,
                seconds=time.perf_counter() - started,
            )
            outcomes.append(outcome)
            log(
                f"{scenario:28s} {spec.model} {spec.data} seed {spec.seed}: diverged at "
                f"{outcome.diverged_at}, divergence alerts {alerts.get('divergence', [])[:5]}"
            )
        for corruption, injected, spec in bad_batch_specs(quick):
            started = time.perf_counter()
            events = source("bad_batch", corruption, spec)
            losses, alerts, indices, evidence = execute(host, store, events, corruption)
            strikes = alerts.get("bad_batch", [])
            outcome = Outcome(
                "bad_batch",
                corruption,
                spec.model,
                spec.data,
                spec.seed,
                False,
                alerts=alerts,
                injected=injected,
                corruption=corruption,
                loss_spikes=loss_spikes(losses),
                strike_indices_ok=all(evidence.get(s) == indices.get(s) for s in strikes),
                seconds=time.perf_counter() - started,
            )
            outcomes.append(outcome)
            log(f"{corruption:28s} {spec.model} seed {spec.seed}: strikes {strikes}")
        return outcomes


def first_alert(outcome: Outcome) -> int | None:
    """Step of the run's first divergence alert."""
    steps = outcome.alerts.get("divergence", [])
    return min(steps) if steps else None


def divergence_rows(outcomes: list[Outcome]) -> tuple[list[list[str]], dict[str, float]]:
    """Table rows per divergence run, and the summary figures."""
    rows = []
    leads: list[int] = []
    caught = diverging = false_alarms = healthy = not_diverged = 0
    for o in outcomes:
        if o.group != "divergence":
            continue
        alert = first_alert(o)
        lead = "-"
        verdict = ""
        if o.diverging:
            if o.diverged_at is None:
                not_diverged += 1
                verdict = "did not diverge"
            else:
                diverging += 1
                if alert is not None and alert <= o.diverged_at:
                    caught += 1
                    leads.append(o.diverged_at - alert)
                    lead = str(o.diverged_at - alert)
                    verdict = "caught"
                else:
                    verdict = "missed" if alert is None else "late"
        else:
            healthy += 1
            if o.diverged_at is not None:
                verdict = "diverged!"
            if alert is not None:
                false_alarms += 1
                verdict = (verdict + " false alarm").strip()
            else:
                verdict = verdict or "quiet"
        rows.append(
            [
                o.scenario,
                o.model,
                o.data,
                str(o.seed),
                "-" if o.diverged_at is None else str(o.diverged_at),
                "-" if alert is None else str(alert),
                lead,
                verdict,
            ]
        )
    summary = {
        "diverging_runs": diverging,
        "caught": caught,
        "median_lead": statistics.median(leads) if leads else float("nan"),
        "min_lead": min(leads) if leads else float("nan"),
        "healthy_runs": healthy,
        "false_alarms": false_alarms,
        "scheduled_but_not_diverged": not_diverged,
    }
    return rows, summary


def precision_recall(hits: int, detected: int, injected: int) -> tuple[float, float]:
    """Precision and recall; precision of no detections is 1 (nothing claimed wrongly)."""
    return (hits / detected if detected else 1.0), (hits / injected if injected else float("nan"))


def bad_batch_rows(outcomes: list[Outcome]) -> tuple[list[list[str]], dict[str, dict[str, float]]]:
    """Table rows per corruption kind: precision/recall of the strike detector and the loss rule."""
    summary: dict[str, dict[str, float]] = {}
    rows = []
    for corruption in CORRUPTIONS:
        runs = [o for o in outcomes if o.group == "bad_batch" and o.corruption == corruption]
        if not runs:
            continue
        injected = sum(len(o.injected) for o in runs)
        figures: dict[str, float] = {"runs": len(runs), "injected": injected}
        cells = [corruption, str(len(runs)), str(injected)]
        for rule, steps_of in (
            ("strikes", lambda o: set(o.alerts.get("bad_batch", []))),
            ("loss_spike", lambda o: set(o.loss_spikes)),
        ):
            hits = sum(len(steps_of(o) & set(o.injected)) for o in runs)
            detected = sum(len(steps_of(o)) for o in runs)
            precision, recall = precision_recall(hits, detected, injected)
            figures[f"{rule}_precision"] = precision
            figures[f"{rule}_recall"] = recall
            cells += [f"{precision:.2f}", f"{recall:.2f}"]
        figures["indices_ok"] = float(all(o.strike_indices_ok for o in runs))
        cells.append("yes" if figures["indices_ok"] else "NO")
        rows.append(cells)
        summary[corruption] = figures
    return rows, summary


def table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the suite, print the tables, optionally write the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small CI version")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--verbose", action="store_true", help="print each run as it finishes")
    replay = parser.add_mutually_exclusive_group()
    replay.add_argument("--record", type=Path, help="store each run's wire events in this folder")
    replay.add_argument("--replay", type=Path, help="replay the events stored there, no training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # small nets: one thread is fastest and fair to a shared 2-core box
    started = time.perf_counter()
    log = (lambda text: print(text, flush=True)) if args.verbose else (lambda text: None)
    outcomes = run_suite(args.quick, log, Events(args.record, args.replay))
    elapsed = time.perf_counter() - started
    d_rows, d_summary = divergence_rows(outcomes)
    b_rows, b_summary = bad_batch_rows(outcomes)
    print("Divergence detector (lead = steps from the first alert to the loss exploding)")
    print(
        table(
            ["scenario", "model", "data", "seed", "diverged at", "first alert", "lead", "verdict"],
            d_rows,
        )
    )
    print()
    print(
        f"caught {d_summary['caught']}/{d_summary['diverging_runs']} diverging runs, median lead "
        f"{d_summary['median_lead']} steps (min {d_summary['min_lead']}); false alarms "
        f"{d_summary['false_alarms']}/{d_summary['healthy_runs']} healthy runs"
    )
    print()
    print(
        "Bad-batch strikes vs the loss-spike rule (loss > 2x mean of the last 10), "
        "at the injected steps"
    )
    print(
        table(
            [
                "corruption",
                "runs",
                "injected",
                "strike P",
                "strike R",
                "loss-rule P",
                "loss-rule R",
                "indices",
            ],
            b_rows,
        )
    )
    print(f"\n{len(outcomes)} runs in {elapsed:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "divergence": d_summary,
                    "bad_batch": b_summary,
                    "seconds": elapsed,
                    "runs": [asdict(o) for o in outcomes],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
