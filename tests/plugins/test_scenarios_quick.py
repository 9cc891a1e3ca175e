"""The quick scenario suite end to end: real training runs under ``watch()`` at its defaults,
alerts as ``on_alert`` got them, scored against the issue's detector targets."""

from __future__ import annotations

import gzip
import json
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCENARIOS = Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios"
RUNNER = SCENARIOS / "run.py"

pytestmark = pytest.mark.slow


def fraction(cell: str) -> tuple[int, int]:
    hits, total = cell.split("/")
    return int(hits), int(total)


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("scenarios") / "quick.json"
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| apmon |" in done.stdout and "| loss_spike |" in done.stdout
    return json.loads(out.read_text())["held"]


def test_no_false_divergence_alarm_and_fewer_than_the_loss_rules(figures: dict[str, Any]) -> None:
    ours = fraction(figures["divergence"]["apmon"]["false_alarm_runs"])
    spike = fraction(figures["divergence"]["loss_spike"]["false_alarm_runs"])
    assert ours[1] >= 3 and ours[0] == 0
    assert spike[0] > ours[0]


def test_bad_batches_precise_and_above_the_loss_spike_rule(figures: dict[str, Any]) -> None:
    ours, spike = figures["bad_batch"]["apmon"], figures["bad_batch"]["loss_spike"]
    assert ours["precision"] >= 0.9
    assert ours["f1"] > spike["f1"]


def test_bad_batch_recall_target(figures: dict[str, Any]) -> None:
    # The target (recall >= 0.9) is judged on the whole held-out half (32 corruptions, README).
    # Here are 8, and the runs' trajectories differ between CPUs (float summation order): the
    # sign-inverted batch at step 210 of the digits CNN, caught only through the loss, was hit
    # on one machine and missed on another, so one miss of the 8 is allowed, not two.
    assert figures["bad_batch"]["apmon"]["recall"] >= 7 / 8


def test_divergence_target_90_percent_in_time_with_median_lead_20(
    figures: dict[str, Any],
) -> None:
    """Met on the quick subset (its two slow ramps) since ``divergence`` 3.0 and the default
    probes; not on the whole held-out half (README)."""
    row = figures["divergence"]["apmon"]
    hits, total = fraction(row["in_time"])
    assert total >= 2 and hits >= 0.9 * total and row["median_lead"] >= 20


def test_a_recorded_run_replays_to_the_same_alerts(
    tmp_path: Path, benchmark_script: Callable[[str], ModuleType]
) -> None:
    """Record/replay: the events a real ``watch()`` run sent, fed through the host again, give
    the alerts that run's ``on_alert`` got (a constant image at step 40 is a strike)."""
    sys.path.insert(0, str(SCENARIOS))
    try:
        families, driver, run = (
            benchmark_script(f"scenarios/{name}.py") for name in ("families", "driver", "run")
        )
        spec = families.RunSpec(
            "bad_batch", "tiny", "mlp", "digits", "sgd", 0, "tune", steps=60,
            corrupt={40: "constant"},
        )  # fmt: skip
        trained = driver.train(spec, record=True)
        assert {kind for _, kind, _ in trained.events} == {"sites", "summary", "probe"}
        with gzip.open(tmp_path / f"{spec.key}.pkl.gz", "wb") as f:
            pickle.dump(trained, f)
        (replayed,) = run.replay(tmp_path, lambda _: None)
    finally:
        sys.path.remove(str(SCENARIOS))
    got = [(a.kind, a.step) for a in trained.received]
    assert ("bad_batch", 40) in got
    assert [(a.kind, a.step) for a in replayed.received] == got
