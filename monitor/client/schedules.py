"""Schedules: plain ``step -> bool`` callables made by small factories (as in Cockpit)."""

from __future__ import annotations

from collections.abc import Callable

Schedule = Callable[[int], bool]


def every(k: int, offset: int = 0) -> Schedule:
    """True on steps offset, offset + k, offset + 2k, ..."""
    if k < 1:
        raise ValueError(f"every(k) needs k >= 1, got {k}")

    def schedule(step: int) -> bool:
        return step >= offset and (step - offset) % k == 0

    return schedule


def never() -> Schedule:
    """Never true."""
    return lambda step: False


def linear_then_every(head: int, k: int) -> Schedule:
    """Every step for the first ``head`` steps (where patterns move fastest), then every k."""
    later = every(k)
    return lambda step: step < head or later(step)


def as_schedule(value: int | Schedule | None) -> Schedule:
    """An int k means every(k); None means never; a callable is taken as it is."""
    if value is None:
        return never()
    if isinstance(value, int):
        return every(value)
    return value
