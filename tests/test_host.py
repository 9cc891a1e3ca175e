"""The plugin host: results stored, a raising plugin recorded and skipped, alert cool-down."""

from __future__ import annotations

from typing import Any

from monitor.host import PluginHost
from monitor.measures import PluginRegistry, PluginResult
from monitor.schema import AlertValue, MeasureValue, RunStart, SiteInfo, SiteSummary, StepSummary
from monitor.store import SqlStore
from plugins.entropy import EntropyPlugin


class _Exploding:
    name, version, requires = "exploding", "0.1", ()

    def process(self, event: Any, context: Any, state: dict, upstream: Any) -> PluginResult:
        raise ZeroDivisionError("boom")


class _Counting:
    """Counts events in its state, alerts every step, and reads the entropy plugin's output."""

    name, version, requires = "counting", "0.1", ("entropy",)

    def process(self, event: Any, context: Any, state: dict, upstream: Any) -> PluginResult:
        state["n"] = state.get("n", 0) + 1
        distinct = [m.value for m in upstream["entropy"].measures if m.name == "distinct"]
        return PluginResult(
            measures=[MeasureValue(name="events", value=state["n"])],
            alerts=[AlertValue(kind="tick", step=event.step, message=f"seen {distinct}")],
        )


def _step(step: int) -> StepSummary:
    site = SiteSummary(site="s#0", rows=3, distinct=2, spectrum=[(1, 1), (2, 1)], unit_on=[3, 1])
    return StepSummary(step=step, sites=[site])


def test_host_runs_plugins_in_order_and_survives_a_failing_one(store: SqlStore) -> None:
    registry = PluginRegistry([_Counting(), _Exploding(), EntropyPlugin()])
    host = PluginHost(registry, store, alert_cooldown_steps=5)
    run_id = store.create_run("p", RunStart(sites=[SiteInfo(name="s#0", kind="dense", units=2)]))
    for step in range(12):
        outcome = host.handle_summary(run_id, _step(step))
        assert [name for name, _ in outcome.errors] == ["exploding"]
        assert "ZeroDivisionError" in outcome.errors[0][1]
    assert [m.value for m in store.measures(run_id, name="events")] == list(range(1, 13))
    assert [m.value for m in store.measures(run_id, name="distinct")] == [2.0] * 12
    # one alert per cool-down window of 5 steps: steps 0, 5, 10
    assert [a.step for a in store.alerts(run_id)] == [0, 5, 10]
    assert store.alerts(run_id)[0].message == "seen [2.0]"
    assert store.plugin_states(run_id)["counting"] == {"n": 12}
    host.finish(run_id, 11)
    assert store.run(run_id).status == "finished"
