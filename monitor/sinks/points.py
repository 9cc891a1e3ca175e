"""Which measures become MLflow metric points, without importing MLflow."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from monitor.sinks.keys import metric_key, plugin_metric_key

Point = tuple[str, float, int, int]  # an MLflow metric point: key, value, time (ms), step

if TYPE_CHECKING:
    from monitor.store.store import PluginOutcome


class PointFilter:
    """Which measures become MLflow points, and how often each key gets one.

    Plain tuples, no MLflow import: the embedded host filters here and sends the points to its
    MLflow process (``mlflow_process``). ``keys`` "summary": run-level measures only (site
    means, fits of the mean, step scalars), a number of keys that does not grow with the model;
    "all": every site's too. A key gets a new point only ``min_interval_seconds`` after its last
    one (0: every step); its newest point meanwhile is held and ``held`` returns it at the end.
    MLflow's charts sample long series anyway; the apmon database keeps every step.
    """

    def __init__(self, keys: str = "all", min_interval_seconds: float = 0.0) -> None:
        self._all_sites = keys == "all"
        self._min_interval = min_interval_seconds
        self._last_logged: dict[str, float] = {}
        self._held: dict[str, Point] = {}

    def outcome_points(self, step: int, outcome: PluginOutcome) -> list[Point]:
        """The points of an outcome's measures (and its back-filled ones, never held back)."""
        now = int(time.time() * 1000)
        clock = time.monotonic()
        points: list[Point] = []
        for plugin, _, measure in outcome.measures:
            if self._all_sites or measure.site is None:
                key = plugin_metric_key(plugin, measure)
                points += self._due((key, measure.value, now, step), clock)
        for _, _, at_step, measure in outcome.backfill:
            if self._all_sites or measure.site is None:
                points.append((metric_key(measure), measure.value, now, at_step))
        return points

    def point(self, key: str, value: float, step: int) -> list[Point]:
        """One metric that is not a plugin measure (e.g. the training loss), if it is due."""
        return self._due((key, value, int(time.time() * 1000), step), time.monotonic())

    def _due(self, point: Point, clock: float) -> list[Point]:
        if self._min_interval > 0:
            key = point[0]
            last = self._last_logged.get(key)
            if last is not None and clock - last < self._min_interval:
                self._held[key] = point
                return []
            self._last_logged[key] = clock
            self._held.pop(key, None)
        return [point]

    def held(self) -> list[Point]:
        """Each key's newest point that was held back (then forgotten): sent at the end."""
        points = list(self._held.values())
        self._held.clear()
        return points
