"""Scenario suite: the detectors scored on runs whose truth is known, against two loss rules.

Every run trains a small ReLU net under ``monitor.watch(model, opt, on_alert=...)`` at its
defaults (``driver.py``); the alerts are those ``on_alert`` received, at the step it received
them. The tuning half and the held-out half (``families.py``) are printed side by side.

    python benchmarks/scenarios/run.py                 # both halves (88 runs)
    python benchmarks/scenarios/run.py --quick         # the CI subset (6 held-out runs)
    python benchmarks/scenarios/run.py --half tune --record DIR   # also keep the wire events
    python benchmarks/scenarios/run.py --replay DIR    # the plugins on kept events, no training

A replay feeds a recorded run's events, in the order the client sent them, through the real
``PluginHost`` and ``SqlStore``; an alert raised by an event sent during step t counts as received
at step t + 1 (the embedded pipeline's promise). It is for tuning; the figures come from training.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from driver import Received, Result, diverged_at, signal_of, train
from families import HALVES, RunSpec, quick_suite, suite
from pinned_kernels import pin
from score import score_all

DETECTORS = ["apt", "transition_fit", "divergence", "strikes"]


def _train(job: tuple[RunSpec, bool, dict[str, Any]]) -> Result:
    spec, record, options = job
    os.nice(10)
    logging.disable(logging.WARNING)
    return train(spec, record, options)


def run_specs(
    specs: list[RunSpec],
    jobs: int,
    record: Path | None,
    log: Any,
    options: dict[str, Any] | None = None,
) -> list[Result]:
    """Train every spec, ``jobs`` at a time; keep each result (with its events) under ``record``.

    ``options`` go to ``watch()``: for dense recordings only, the scored runs use none.
    """
    results = []
    jobs_list = [(s, record is not None, options or {}) for s in specs]
    # Fresh workers, not forks of this process: they read the kernel variables (pinned_kernels)
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        for result in pool.map(_train, jobs_list):
            log(line(result))
            if record is not None:
                record.mkdir(parents=True, exist_ok=True)
                with gzip.open(record / f"{result.spec.key}.pkl.gz", "wb", compresslevel=3) as f:
                    pickle.dump(result, f)
            result.events = []
            results.append(result)
    return results


def replay(folder: Path, log: Any) -> list[Result]:
    """Re-score recorded runs: their events through a fresh host and store each."""
    from monitor.host import PluginHost
    from monitor.measures import load_plugins
    from monitor.schema import RunStart
    from monitor.settings import Settings
    from monitor.store import open_store

    registry = load_plugins(only=DETECTORS)
    cooldown = Settings(mlflow_tracking_uri="").alert_cooldown_steps
    results = []
    for file in sorted(folder.glob("*.pkl.gz")):
        with gzip.open(file, "rb") as f:
            result: Result = pickle.load(f)
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(f"sqlite:///{tmp}/replay.db", auto_upgrade=True)
            host = PluginHost(registry, store, alert_cooldown_steps=cooldown)
            run_id = store.create_run("scenarios", RunStart(name=result.spec.key))
            received: list[Received] = []
            for at, kind, payload in result.events:
                if kind == "sites":
                    store.add_sites(run_id, payload)
                    continue
                handle = host.handle_summary if kind == "summary" else host.handle_probe
                outcome = handle(run_id, payload)
                for _, alert in outcome.alerts:
                    received.append(
                        Received(alert.kind, alert.step, at + 1, signal_of(alert), alert.message)
                    )
            last = len(result.losses) - 1
            for _, alert in host.finish(run_id, last).alerts:
                received.append(Received(alert.kind, alert.step, last, signal_of(alert), ""))
        result.received, result.events = received, []
        log(line(result))
        results.append(result)
    return results


def line(result: Result) -> str:
    """One run's outcome in a line."""
    alerts = [f"{a.kind[:3]}@{a.step}>{a.at}:{a.signal}" for a in result.received][:6]
    end = diverged_at(result.losses, result.classes, result.spec.corrupt)
    truth = "" if end is None else f" diverged@{end}"
    return (
        f"{result.spec.key:58s} {len(result.losses):4d} steps {result.seconds:5.1f}s"
        f"{truth} {alerts}"
    )


def tables(figures: dict[str, dict[str, Any]]) -> str:
    """Both halves side by side, as markdown."""
    halves = list(figures)
    out = ["| divergence | " + " | ".join(halves) + " |", "|---|" + "---|" * len(halves)]
    for rule in ("apmon", "loss_spike", "megatron"):
        cells = []
        for half in halves:
            row = figures[half]["divergence"][rule]
            cells.append(
                f"in time {row['in_time']}, median lead {row['median_lead']}, "
                f"false-alarm runs {row['false_alarm_runs']}"
            )
        out.append(f"| {rule} | " + " | ".join(cells) + " |")
    out += ["", "| bad batches | " + " | ".join(halves) + " |", "|---|" + "---|" * len(halves)]
    for rule in ("apmon", "loss_spike"):
        cells = []
        for half in halves:
            row = figures[half]["bad_batch"][rule]
            cells.append(
                f"P {row['precision']} R {row['recall']} F1 {row['f1']}, "
                f"labels {row['label_recall']}"
            )
        out.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run, score and print; ``--json`` also writes the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--half",
        choices=[*HALVES, "both"],
        default="both",
        help=(
            "which runs: a half, or both (tune and held; 'fresh', 'fourth', 'fifth' and 'sixth' "
            "only when asked for)"
        ),
    )
    parser.add_argument("--quick", action="store_true", help="the CI subset")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--record", type=Path)
    parser.add_argument("--replay", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--match", default="", help="only runs whose key contains this")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--native-kernels",
        action="store_true",
        help="train with the CPU kernels torch picks for this processor, not pinned to AVX2 "
        "(figures then differ between machines by a run or two: pinned_kernels.py)",
    )
    parser.add_argument("--apt-every", type=int, help="recording only: APT probe every k steps")
    parser.add_argument("--sweep-every", type=int, help="recording only: a sweep every k steps")
    parser.add_argument("--probe-rows", type=int, help="recording only: rows per probe")
    args = parser.parse_args(argv)
    options = {
        name: value
        for name, value in (
            ("apt_every", args.apt_every),
            ("sweep_every", args.sweep_every),
            ("probe_rows", args.probe_rows),
        )
        if value is not None
    }
    log = print if args.verbose else (lambda _: None)
    started = time.perf_counter()
    if args.replay is not None:
        kernels = "not used (a replay trains nothing)"
        results = replay(args.replay, log)
    else:
        kernels = "torch's own (--native-kernels)" if args.native_kernels else pin(os.environ)
        halves = ["tune", "held"] if args.half == "both" else [args.half]
        specs = quick_suite() if args.quick else [s for h in halves for s in suite(h)]
        specs = [s for s in specs if args.match in s.key]
        results = run_specs(specs, args.jobs, args.record, log, options)
    by_half: dict[str, list[Result]] = {}
    for result in results:
        by_half.setdefault(result.spec.half, []).append(result)
    figures = {half: score_all(by_half[half]) for half in HALVES if half in by_half}
    print(tables(figures))
    for half, figure in figures.items():
        print(half, json.dumps(figure))
    print(f"{len(results)} runs in {time.perf_counter() - started:.0f} s; CPU kernels {kernels}")
    if args.json is not None:
        args.json.write_text(json.dumps({**figures, "cpu_kernels": kernels}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
