"""The quick scenario suite end to end: real training runs through the real host and store,
scored against the issue's detector targets."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios" / "run.py"
INPUT_CORRUPTIONS = ("noise x10", "constant image")

pytestmark = pytest.mark.slow


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
    assert "| scenario" in done.stdout and "| corruption" in done.stdout
    return json.loads(out.read_text())


def test_no_alert_on_any_healthy_run_of_the_quick_suite(figures: dict[str, Any]) -> None:
    assert figures["divergence"]["healthy_runs"] >= 4
    assert figures["divergence"]["false_alarms"] == 0


def test_strikes_are_precise_and_carry_the_batch_indices(figures: dict[str, Any]) -> None:
    for corruption in INPUT_CORRUPTIONS:
        row = figures["bad_batch"][corruption]
        assert row["strikes_precision"] >= 0.9, corruption
        assert row["indices_ok"] == 1.0


@pytest.mark.xfail(strict=True, reason="not met yet: see the scenario table in the README")
def test_divergence_target_every_diverging_run_alerted_with_median_lead_20(
    figures: dict[str, Any],
) -> None:
    d = figures["divergence"]
    assert d["caught"] == d["diverging_runs"] and d["median_lead"] >= 20


def test_strike_target_recall_09_and_better_than_the_loss_spike_rule(
    figures: dict[str, Any],
) -> None:
    for corruption in INPUT_CORRUPTIONS:
        row = figures["bad_batch"][corruption]
        assert row["strikes_recall"] >= 0.9, corruption
        assert row["strikes_recall"] >= row["loss_spike_recall"], corruption


def test_a_recorded_run_replays_the_events_it_sent(tmp_path: Path) -> None:
    """Record/replay: a replay yields exactly the events the recorded run sent, also when the
    consumer stopped early (as the suite does 20 steps after the loss exploded)."""
    spec_ = importlib.util.spec_from_file_location("scenario_run", RUNNER)
    assert spec_ is not None and spec_.loader is not None
    runner = importlib.util.module_from_spec(spec_)
    sys.modules["scenario_run"] = runner  # dataclasses look their module up there
    spec_.loader.exec_module(runner)
    spec = runner.RunSpec("mlp", "digits", 0, 8, runner.ramp(0.1, 0, 1.0))
    recording = runner.Events(record=tmp_path)("divergence", "tiny", spec)
    sent = [next(recording) for _ in range(6)]
    recording.close()
    replayed = list(runner.Events(replay=tmp_path)("divergence", "tiny", spec))
    assert [e.step for e in replayed] == list(range(6))
    for a, b in zip(sent, replayed, strict=True):
        assert a.loss == b.loss and a.summary == b.summary and a.probes == b.probes
    assert {p.kind for e in replayed for p in e.probes} == {"apt", "sweep"}
