"""The read side of the CLI: alerts, runs show, --json, run-id prefixes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.cli import main
from monitor.schema import AlertValue, MeasureValue, RunStart, SiteInfo, SiteSummary, StepSummary
from monitor.store import PluginOutcome, SqlStore, make_engine, open_store

FIRST, SECOND = "aaaa1111-0000-0000-0000-000000000000", "aaaa2222-0000-0000-0000-000000000000"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("APMON_DATABASE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")  # so that undo removes what a command sets
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _filled(path: Path) -> tuple[str, SqlStore]:
    url = f"sqlite:///{path}"
    store = open_store(url, auto_upgrade=True)
    sites = [SiteInfo(name=s, kind="dense", units=2) for s in ("fc1#0", "fc2#0")]
    for run_id in (FIRST, SECOND):
        store.create_run("p", RunStart(name="r", sites=sites, mlflow_run_id="m" * 32), run_id)
    for step in range(3):
        summary = SiteSummary(site="fc1#0", rows=2, distinct=1, spectrum=[(2, 1)], unit_on=[2, 0])
        store.save_summary(FIRST, StepSummary(step=step, sites=[summary]))
        outcome = PluginOutcome("train")
        outcome.measures = [("p", "1", MeasureValue(name="dead", value=0.5, site="fc1#0"))]
        outcome.alerts = [("d", AlertValue(kind="bad_batch", step=step, message=f"b{step}"))]
        if step == 2:
            outcome.alerts.append(("d", AlertValue(kind="divergence", step=2, message="far")))
        store.save_outcome(FIRST, step, outcome)
    return url, store


def test_read_commands_in_an_empty_folder_say_so_and_create_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    reads = (
        ["runs", "list"],
        ["report"],
        ["alerts", "abc"],
        ["runs", "show", "abc"],
        ["errors", "x"],
    )
    for argv in reads:
        code, out, err = _run(capsys, *argv)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "no apmon database at" in err, err
        assert "the default sqlite:///apmon.db" in err
    code, _, err = _run(capsys, "runs", "finish", "abc")
    assert code == 2 and "no apmon database" in err
    assert not list(tmp_path.iterdir())  # no apmon.db left behind


def test_a_missing_folder_a_bad_url_and_a_dead_server_get_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, _, err = _run(capsys, "db", "upgrade", "--database-url", "sqlite:///nope/x.db")
    assert code == 2 and err.count("\n") == 1
    assert "folder nope" in err and "--database-url" in err
    code, _, err = _run(capsys, "runs", "list", "--database-url", "not a url")
    assert code == 2 and err.count("\n") == 1 and "is not a database URL" in err
    monkeypatch.setenv("APMON_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/none")
    code, _, err = _run(capsys, "runs", "list")
    assert code == 2 and err.count("\n") == 1
    assert "cannot reach the apmon database" in err and "APMON_DATABASE_URL" in err
    assert "Traceback" not in err
    code, _, err = _run(capsys, "-v", "runs", "list")
    assert code == 2 and "Traceback" in err  # -v shows where it came from


def test_an_old_schema_names_the_flag_the_user_gave(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    make_engine(url).connect().close()  # an existing, empty database
    for argv in (["runs", "list"], ["serve"]):
        code, _, err = _run(capsys, *argv, "--database-url", url)
        assert code == 2 and err.count("\n") == 1
        assert "apmon db upgrade" in err and "--database-url" in err
        assert "APMON_DATABASE_URL" not in err, err


def test_alerts_and_runs_show_take_unique_prefixes_and_print_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    url, _ = _filled(tmp_path / "apmon.db")
    code, out, _ = _run(capsys, "alerts", "aaaa1", "--database-url", url)
    assert code == 0
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["0", "bad_batch"],
        ["1", "bad_batch"],
        ["2", "bad_batch"],
        ["2", "divergence"],
    ]
    code, out, _ = _run(
        capsys, "alerts", "aaaa1", "--json", "--kind", "divergence", "--database-url", url
    )
    assert [(a["step"], a["message"]) for a in json.loads(out)] == [(2, "far")]
    code, _, err = _run(capsys, "alerts", "aaaa", "--database-url", url)
    assert code == 2 and "2 runs start with 'aaaa'" in err
    code, _, err = _run(capsys, "runs", "show", "zz", "--database-url", url)
    assert code == 2 and "no run 'zz'" in err
    code, out, _ = _run(capsys, "runs", "show", "aaaa1", "--json", "--database-url", url)
    shown = json.loads(out)
    assert shown["id"] == FIRST and shown["mlflow_run_id"] == "m" * 32
    assert shown["steps"] == {"train": {"count": 3, "first": 0, "last": 2}}
    assert shown["sites"] == ["fc1#0", "fc2#0"]
    assert shown["measures"] == {"dead (train)": 3}
    assert shown["alerts"] == {"bad_batch": 3, "divergence": 1}
    code, out, _ = _run(capsys, "runs", "show", "aaaa1", "--database-url", url)
    assert "alerts:        bad_batch 3, divergence 1" in out
    code, out, _ = _run(capsys, "runs", "list", "--json", "--database-url", url)
    assert sorted(r["id"] for r in json.loads(out)) == [FIRST, SECOND]
    code, out, _ = _run(capsys, "plugins", "--json")
    assert "entropy" in {p["name"] for p in json.loads(out)}
