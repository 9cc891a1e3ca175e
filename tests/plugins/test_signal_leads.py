"""``benchmarks/scenarios/signal_leads.py``: its first departures against brute force."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

SCENARIOS = Path(__file__).resolve().parents[2] / "benchmarks" / "scenarios"
sys.path.insert(0, str(SCENARIOS))

import signal_leads  # noqa: E402


def brute_departure(values: list[float], start: int, end: int, mads: float) -> int | None:
    band = [v for v in values[max(0, start - signal_leads.BAND) : start] if np.isfinite(v)]
    centre = float(np.median(band))
    spread = 1.4826 * float(np.median([abs(v - centre) for v in band]))
    for step in range(start, end):
        if np.isfinite(values[step]) and values[step] >= centre + mads * spread:
            return step
    return None


@pytest.mark.parametrize("seed", range(20))
def test_departure_matches_brute_force_on_noisy_ramps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    start = 60
    values = rng.normal(0.0, 1.0, 200)
    values[start:] += np.linspace(0.0, rng.uniform(0.0, 12.0), 200 - start)
    values[rng.integers(0, 200, 5)] = np.nan  # steps without a probe
    mads = float(rng.choice([2.0, 3.0, 4.0]))
    got = signal_leads.departure(values, start, 200, mads)
    assert got == brute_departure(list(values), start, 200, mads)


def test_departure_finds_the_first_step_past_the_band() -> None:
    values = np.array([0.0, 1.0, -1.0, 0.5, -0.5] * 10 + [0.0, 2.0, 5.0, 9.0])
    # band median 0, MAD 0.5 -> scaled 0.7413; 3 MADs = 2.22: step 52 (5.0) is the first above
    assert signal_leads.departure(values, 50, len(values), 3.0) == 52
    assert signal_leads.departure(values, 50, 52, 3.0) is None  # the divergence ends the search


def test_smoothed_is_the_median_of_the_last_values() -> None:
    values = np.array([1.0, 5.0, np.nan, 2.0, 8.0, 3.0])
    assert list(signal_leads.smoothed(values, 3)) == [1.0, 3.0, 3.0, 3.5, 5.0, 3.0]
    assert signal_leads.smoothed(values, 1) is values


def test_the_rate_rise_and_the_surge_of_a_jump_and_a_ramp() -> None:
    jump = np.array([0.1] * 80 + [1.0] * 20)
    assert signal_leads.rise_start(jump) == 80
    assert signal_leads.surge_start(jump) == 80
    ramp = np.array([0.1] * 60 + [0.1 * 1.08**k for k in range(1, 41)])
    assert signal_leads.rise_start(ramp) == 60
    # the first step whose rate is 3x the median of the steps before it since step 20
    brute = next(s for s in range(21, 100) if ramp[s] >= 3 * np.median(ramp[20:s]))
    assert signal_leads.surge_start(ramp) == brute
