"""Robust location and scale of a short series: median and scaled median absolute deviation."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

MAD_TO_SD = 1.4826  # MAD * 1.4826 estimates the standard deviation of normal data


def median_mad(values: Sequence[float]) -> tuple[float, float]:
    """(median, 1.4826 * median(|x - median|)) of a non-empty series (Hampel 1974)."""
    centre = statistics.median(values)
    return centre, MAD_TO_SD * statistics.median(abs(v - centre) for v in values)


def push(window: list[float], value: float, size: int) -> list[float]:
    """The window with ``value`` appended, keeping the newest ``size`` values (bounded state)."""
    window = [*window, value]
    return window[-size:]
