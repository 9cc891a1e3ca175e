"""The measure-plugin contract and the one registry that loads plugins from entry points."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

from monitor.schema import AlertValue, FitValue, MeasureValue, ProbeRecord, SiteInfo, StepSummary

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "apmon.plugins"


@dataclass(frozen=True)
class RunFinished:
    """The event a run's end produces.

    ``summaries(source)`` replays the stored step summaries of that source in step order, so a
    plugin can do end-of-run work (e.g. weighted Jaccard of every step against the final one)
    without holding the whole history in its state.
    """

    final_step: int
    summaries: Callable[[str], Iterator[StepSummary]]


Event = StepSummary | ProbeRecord | RunFinished


@dataclass
class PluginResult:
    """What one plugin produced for one event."""

    measures: list[MeasureValue] = field(default_factory=list)
    fits: list[FitValue] = field(default_factory=list)
    alerts: list[AlertValue] = field(default_factory=list)
    # Measures the plugin computed for earlier steps (end-of-run work), keyed by step.
    backfill: dict[int, list[MeasureValue]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunContext:
    """Read-only facts about the run an event belongs to."""

    run_id: str
    sites: Mapping[str, SiteInfo]


@runtime_checkable
class MeasurePlugin(Protocol):
    """A measure or detector. One instance serves every run; per-run memory lives in ``state``.

    In: one event of one run, in step order (``StepSummary`` for each training step or probe-set
    evaluation, ``ProbeRecord`` for each APT probe or sweep, ``RunFinished`` once at the end), the
    run's context, the plugin's JSON-serialisable ``state`` for that run (a dict it may mutate; the
    host persists it after every event, so keep it bounded), and the results of the plugins named
    in ``requires`` for this same event.

    Out: a ``PluginResult``. Returning an empty result is the normal answer to events the plugin
    does not use. Raising is recorded by the host and the plugin is skipped for that event; it
    never stops the host or the other plugins.
    """

    name: str
    version: str
    requires: tuple[str, ...]

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Turn one event into measures, fits and alerts."""
        ...


class PluginError(Exception):
    """A plugin could not be registered (duplicate name, missing dependency, bad object)."""


class PluginRegistry:
    """Plugins by name, in an order where every plugin comes after the ones it requires."""

    def __init__(self, plugins: Sequence[MeasurePlugin] = ()) -> None:
        self._plugins: dict[str, MeasurePlugin] = {}
        self._origin: dict[str, str] = {}
        for plugin in plugins:
            self.add(plugin, origin=type(plugin).__module__)

    def add(self, plugin: MeasurePlugin, origin: str) -> None:
        """Register one plugin; ``origin`` names where it came from for error messages."""
        if not isinstance(plugin, MeasurePlugin):
            raise PluginError(f"{origin}: object does not implement MeasurePlugin")
        if plugin.name in self._plugins:
            raise PluginError(
                f"duplicate plugin name {plugin.name!r}: from {origin}, "
                f"already registered from {self._origin[plugin.name]}"
            )
        self._plugins[plugin.name] = plugin
        self._origin[plugin.name] = origin

    def __contains__(self, name: object) -> bool:
        return name in self._plugins

    def __len__(self) -> int:
        return len(self._plugins)

    def get(self, name: str) -> MeasurePlugin:
        """The plugin registered under ``name``."""
        return self._plugins[name]

    def ordered(self) -> list[MeasurePlugin]:
        """Plugins in dependency order; a missing or cyclic requirement is a PluginError."""
        done: dict[str, MeasurePlugin] = {}
        visiting: set[str] = set()

        def visit(name: str, needed_by: str) -> None:
            if name in done:
                return
            if name not in self._plugins:
                raise PluginError(f"plugin {needed_by!r} requires {name!r}, which is not loaded")
            if name in visiting:
                raise PluginError(f"plugin requirements form a cycle through {name!r}")
            visiting.add(name)
            for dependency in self._plugins[name].requires:
                visit(dependency, name)
            visiting.discard(name)
            done[name] = self._plugins[name]

        for name in sorted(self._plugins):
            visit(name, name)
        return list(done.values())

    def describe(self) -> list[dict[str, str]]:
        """Name, version and origin of each plugin, for listings."""
        return [
            {"name": p.name, "version": p.version, "origin": self._origin[p.name]}
            for p in self.ordered()
        ]


def _instantiate(entry: EntryPoint) -> MeasurePlugin:
    loaded = entry.load()
    return loaded() if isinstance(loaded, type) else loaded


def load_plugins(
    group: str = ENTRY_POINT_GROUP, only: Sequence[str] | None = None
) -> PluginRegistry:
    """Load every plugin of the entry-point group, built-ins included.

    A plugin that fails to import or to construct is logged and skipped (as MLflow's and pluggy's
    registries do); a duplicate name is an error that names the offending entry point. ``only``
    restricts loading to the named entry points.
    """
    registry = PluginRegistry()
    for entry in sorted(entry_points(group=group), key=lambda e: e.name):
        if only is not None and entry.name not in only:
            continue
        origin = f"entry point {entry.name!r} ({entry.value})"
        try:
            plugin = _instantiate(entry)
        except Exception:
            logger.warning("skipping plugin %s: it failed to load", origin, exc_info=True)
            continue
        registry.add(plugin, origin)
    return registry
