"""The quick scenario suite end to end: real training runs through the real host and store,
scored against the issue's detector targets."""

from __future__ import annotations

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
