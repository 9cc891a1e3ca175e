"""`apmon demo` and the CLI, run as a user runs them: a subprocess in a fresh directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from monitor.store import open_store

DEMO_SITES = {"features.1#0", "features.3#0", "model#0"}


def _apmon(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_leaves_rows_and_mlflow_metrics_for_every_site(tmp_path: Path) -> None:
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        # Every step's site rows are checked below: on a loaded machine the storage budget
        # would thin them (stored as monitor/thinned_steps; test_host_writer covers that).
        "APMON_HOST_STORE_FRACTION": "0",
    }
    env.pop("APMON_DATABASE_URL", None)
    done = _apmon("demo", "--steps", "40", "--quiet", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "SQLite file:" in done.stdout and str(tmp_path / "apmon.db") in done.stdout
    run_id = re.search(r"apmon run:\s+(\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    mlflow_run_id = re.search(r"MLflow run:\s+(\S+)", done.stdout).group(1)  # type: ignore[union-attr]
    for site in DEMO_SITES:
        assert site in done.stdout  # the closing table names every site

    store = open_store(f"sqlite:///{tmp_path / 'apmon.db'}")
    assert set(store.sites(run_id)) == DEMO_SITES
    assert store.run(run_id).status == "finished"
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    for site in DEMO_SITES:
        stored = [
            m for m in store.measures(run_id, name="rel_entropy", site=site) if m.source == "train"
        ]
        # Patterns are counted on steps 0 and 1 (until a step that counted them was timed),
        # then on every k-th step (k a power of two) that the capture budget allows.
        steps = [m.step for m in stored]
        assert steps[:2] == [0, 1] and steps == sorted(set(steps)) and steps[-1] < 40
        # The detectors' statistics (per-unit on-counts: dead units) come with every step.
        dead = [m for m in store.measures(run_id, name="dead", site=site) if m.source == "train"]
        assert [m.step for m in dead] == list(range(40))
        # MLflow gets the site means by default (mlflow_keys="summary"), not each site's keys.
        assert not client.get_metric_history(
            mlflow_run_id, f"ap/rel_entropy/{site.replace('#', ':')}"
        )
    means = {
        m.step: m.value
        for m in store.measures(run_id, name="rel_entropy_mean")
        if m.source == "train"
    }
    history = client.get_metric_history(mlflow_run_id, "ap/rel_entropy_mean")
    # A key gets a point at most every 0.1 s, and its last point always: the first and the
    # last step with patterns are in.
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == max(means)
    assert all(m.value == means[m.step] for m in history)
    assert [m.step for m in client.get_metric_history(mlflow_run_id, "train/loss")][-1] == 39
    assert client.get_run(mlflow_run_id).data.tags["apmon.run_id"] == run_id
    figures = sorted(p.name for p in (tmp_path / "apmon-report" / run_id).glob("*.png"))
    expected = {
        "heatmap_train_rel_entropy.png",
        "heatmap_probe_set_jaccard_init.png",
        "heatmap_apt_D.png",
        "phase_diagram.png",
        "transition_fit.png",
        "timeline.png",
    }
    assert expected <= set(figures)
    artifacts = {a.path for a in client.list_artifacts(mlflow_run_id, "apmon-report")}
    names = [*figures, "report.html", "alerts.json"]
    assert artifacts == {f"apmon-report/{name}" for name in names}
    # the labelled probe set: seed-002 measures per site, diagrams at 0, 25 and the last step
    sample_sets = {
        (m.name, m.site) for m in store.measures(run_id, name="predictability") if m.site
    }
    assert sample_sets == {("predictability", site) for site in DEMO_SITES}
    assert [step for step, _ in store.diagrams(run_id)] == [0, 25, 39]
    assert {"heatmap_probe_set_predictability.png", "flow_clusters.png"} <= set(figures)
    report = tmp_path / "apmon-report" / run_id / "report.html"
    page = report.read_text(encoding="utf-8")
    assert page.count('"type":"sankey"') == 3
    # the page of a real run: every PNG inlined, the interactive figures, nothing loaded
    assert page.count('<img alt="') == len(figures)
    plots = page.count("Plotly.newPlot")
    heatmaps = sum(name.startswith("heatmap_") for name in figures)
    assert plots == 1 + heatmaps + 1 + 3  # time line, heat maps, phase diagram, Sankeys
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|<img[^>]+src=\"(?!data:)", page)
    if shutil.which("chromium"):
        # opened offline (every request goes to a closed port): plotly draws every figure
        shown = subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--proxy-server=127.0.0.1:9",
                "--virtual-time-budget=10000",
                "--dump-dom",
                report.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert shown.stdout.count('class="plotly-graph-div js-plotly-plot"') == plots


def test_commands_refuse_an_out_of_date_database_and_upgrade_fixes_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    (tmp_path / "old.db").touch()  # there, but never migrated
    refused = _apmon("runs", "list", "--database-url", url, cwd=tmp_path)
    assert refused.returncode == 2
    assert "apmon db upgrade" in refused.stderr
    upgraded = _apmon("db", "upgrade", "--database-url", url, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    assert "upgraded from an empty database" in upgraded.stdout
    assert _apmon("db", "current", "--database-url", url, cwd=tmp_path).returncode == 0
    assert _apmon("runs", "list", "--database-url", url, cwd=tmp_path).returncode == 0


def test_help_names_every_command(tmp_path: Path) -> None:
    shown = _apmon("--help", cwd=tmp_path)
    assert shown.returncode == 0
    for command in ("demo", "db", "plugins", "runs"):
        assert command in shown.stdout
    listed = _apmon("plugins", cwd=tmp_path)
    assert "entropy" in listed.stdout
