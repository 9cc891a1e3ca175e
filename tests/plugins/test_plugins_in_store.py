"""Every registered plugin through the real host and store (SQLite and PostgreSQL), and
``apmon runs finish`` on a run that never finished."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_fixtures import summary_of

from monitor.cli import main
from monitor.host import PluginHost
from monitor.measures import load_plugins
from monitor.schema import ProbeRecord, RunStart, SiteInfo, SiteProbe, StepSummary
from monitor.sinks.mlflow_sink import metric_key
from monitor.store import SqlStore, make_engine, upgrade

PLUGINS = {
    "apt",
    "changes",
    "dead_units",
    "divergence",
    "entropy",
    "jaccard",
    "strikes",
    "transition_fit",
}
ETAS = [0.001, 0.01, 0.1, 1.0, 10.0]
PROBE_SETS = [[1, 1, 2, 3], [1, 2, 2, 4], [2, 4, 4, 5]]


def test_every_plugin_is_registered_with_name_version_and_doc() -> None:
    registry = load_plugins()
    described = {p["name"]: p for p in registry.describe()}
    assert set(described) >= PLUGINS
    for name in PLUGINS:
        plugin = registry.get(name)
        assert plugin.version and "entry point" in described[name]["origin"]
        doc = type(plugin).__doc__ or ""
        assert "Source" in doc or "source" in doc, name
    assert registry.get("divergence").requires == ("transition_fit", "strikes")


def _feed(store: SqlStore, finish: bool) -> str:
    run_id = store.create_run(
        "p", RunStart(sites=[SiteInfo(name="s#0", kind="dense", units=4)], name="t")
    )
    host = PluginHost(load_plugins(only=sorted(PLUGINS)), store)
    for step, rows in enumerate(PROBE_SETS):
        host.handle_summary(
            run_id, StepSummary(step=step, source="probe_set", sites=[summary_of("s#0", rows)])
        )
        host.handle_summary(
            run_id, StepSummary(step=step, sites=[summary_of("s#0", rows)], loss=1.0)
        )
        host.handle_probe(
            run_id,
            ProbeRecord(
                step=step,
                kind="sweep",
                lr=0.1,
                sites=[SiteProbe(site="s#0", rows=100, etas=ETAS, changed=[2, 16, 50, 84, 98])],
            ),
        )
        host.handle_probe(
            run_id,
            ProbeRecord(
                step=step,
                kind="apt",
                lr=0.1,
                sites=[SiteProbe(site="s#0", rows=100, etas=[0.1], changed=[50])],
            ),
        )
    if finish:
        host.finish(run_id, len(PROBE_SETS) - 1)
    return run_id


def brute_jaccard(x: list[int], y: list[int]) -> float:
    keys = set(x) | set(y)
    return sum(min(x.count(k), y.count(k)) for k in keys) / sum(
        max(x.count(k), y.count(k)) for k in keys
    )


def test_results_are_stored_under_their_keys(store: SqlStore) -> None:
    run_id = _feed(store, finish=True)
    final = [m for m in store.measures(run_id, name="jaccard_final", site="s#0")]
    assert [m.step for m in final] == [0, 1, 2]
    for m, rows in zip(final, PROBE_SETS, strict=True):
        assert m.value == pytest.approx(brute_jaccard(rows, PROBE_SETS[-1]))
    changes = store.measures(run_id, name="appeared", site="s#0")
    assert [m.value for m in changes] == [pytest.approx(1 / 3), pytest.approx(1 / 3)]
    d = store.measures(run_id, name="D", site="s#0")
    assert {m.source for m in d} == {"apt"} and [m.value for m in d] == [0.5] * 3
    assert metric_key(_as_value(d[0])) == "apt/D/s:0"
    fits = [f for f in store.fits(run_id) if f.site is None]
    assert len(fits) == 3 and all(f.ok for f in fits)
    assert fits[0].mu == pytest.approx(math.log(0.1), abs=0.05)
    assert store.alerts(run_id) == []
    assert store.run(run_id).status == "finished"


def _as_value(point):  # a stored MeasurePoint back as the wire value the MLflow sink keys
    from monitor.schema import MeasureValue

    return MeasureValue(name=point.name, value=point.value, site=point.site, source=point.source)


def test_runs_finish_command_backfills_a_run_that_never_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'apmon.db'}"
    engine = make_engine(url)
    upgrade(engine)
    store = SqlStore(engine)
    run_id = _feed(store, finish=False)
    assert store.measures(run_id, name="jaccard_final") == []
    flags = ["--database-url", url, "--mlflow-uri", ""]
    assert main(["runs", "finish", run_id, *flags]) == 0
    assert "finished at step 2" in capsys.readouterr().out
    assert [m.step for m in store.measures(run_id, name="jaccard_final", site="s#0")] == [0, 1, 2]
    assert store.run(run_id).status == "finished"
    assert main(["runs", "finish", run_id, *flags]) == 1
    assert "already finished" in capsys.readouterr().out
    assert main(["runs", "finish", "no-such-run", *flags]) == 2
    assert "no run" in capsys.readouterr().err


def test_runs_finish_is_wired_into_the_console_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "monitor.cli", "runs", "finish", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and "--final-step" in done.stdout
