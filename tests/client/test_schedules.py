"""Schedules are plain step -> bool callables; each factory against its definition."""

from __future__ import annotations

import pytest

from monitor.client.schedules import as_schedule, every, linear_then_every, never


def test_every_with_offset() -> None:
    assert [s for s in range(20) if every(5, offset=2)(s)] == [2, 7, 12, 17]
    with pytest.raises(ValueError):
        every(0)


def test_linear_then_every() -> None:
    assert [s for s in range(30) if linear_then_every(4, 10)(s)] == [0, 1, 2, 3, 10, 20]


def test_as_schedule() -> None:
    assert [s for s in range(7) if as_schedule(3)(s)] == [0, 3, 6]
    assert not any(as_schedule(None)(s) for s in range(100))
    assert not any(never()(s) for s in range(100))
    odd = as_schedule(lambda s: s % 2 == 1)
    assert [s for s in range(6) if odd(s)] == [1, 3, 5]
