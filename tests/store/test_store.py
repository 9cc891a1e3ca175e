"""The SQL store on SQLite and PostgreSQL, each test in a rolled-back transaction."""

from __future__ import annotations

import pytest

from monitor.schema import (
    AlertValue,
    FitValue,
    MeasureValue,
    ProbeRecord,
    RunStart,
    SiteInfo,
    SiteProbe,
    SiteSummary,
    StepSummary,
)
from monitor.store import NotFound, PluginOutcome, SqlStore

SITES = [SiteInfo(name="a#0", kind="dense", units=3), SiteInfo(name="b#0", kind="conv", units=2)]


def _summary(step: int) -> StepSummary:
    site = SiteSummary(
        site="a#0",
        rows=4,
        distinct=2,
        spectrum=[(1, 1), (3, 1)],
        patterns=[(5, 3), (2**64 - 1, 1)],
        unit_on=[4, 3, 0],
    )
    return StepSummary(step=step, sites=[site], loss=0.5, sample_indices=[1, 2, 3, 4])


def test_run_round_trip(store: SqlStore) -> None:
    run_id = store.create_run("proj", RunStart(name="r", sites=SITES, config={"lr": 0.1}))
    run = store.run(run_id)
    assert (run.project, run.name, run.status, run.config) == ("proj", "r", "running", {"lr": 0.1})
    assert list(store.sites(run_id)) == ["a#0", "b#0"]
    store.add_sites(run_id, [SiteInfo(name="c#0", kind="seq", units=4), SITES[0]])
    assert list(store.sites(run_id)) == ["a#0", "b#0", "c#0"]
    store.finish_run(run_id)
    assert store.run(run_id).status == "finished"


def test_summaries_replay_in_step_order(store: SqlStore) -> None:
    run_id = store.create_run("proj", RunStart(sites=SITES))
    for step in (2, 0, 1):
        store.save_summary(run_id, _summary(step))
    replayed = list(store.step_summaries(run_id, "train"))
    assert [s.step for s in replayed] == [0, 1, 2]
    assert replayed[0] == _summary(0)


def test_outcome_is_stored_atomically_and_queryable(store: SqlStore) -> None:
    run_id = store.create_run("proj", RunStart(sites=SITES))
    outcome = PluginOutcome("train")
    outcome.measures.append(("p", "1", MeasureValue(name="m", value=1.5, site="a#0")))
    outcome.measures.append(("p", "1", MeasureValue(name="m_mean", value=2.0)))
    outcome.backfill.append(("p", "1", 0, MeasureValue(name="late", value=3.0, site="b#0")))
    outcome.fits.append(("f", "1", FitValue(site=None, mu=0.1, sigma=1.0, points=5, ok=True)))
    outcome.alerts.append(("d", AlertValue(kind="diverge", step=7, message="sigma rose")))
    outcome.states["p"] = {"seen": 1}
    store.save_outcome(run_id, 7, outcome)
    assert [(m.name, m.site, m.step, m.value) for m in store.measures(run_id)] == [
        ("late", "b#0", 0, 3.0),
        ("m", "a#0", 7, 1.5),
        ("m_mean", None, 7, 2.0),
    ]
    assert [m.value for m in store.measures(run_id, name="m", site="a#0", step_min=7)] == [1.5]
    assert store.measures(run_id, step_max=6)[0].name == "late"
    assert store.fits(run_id)[0].sigma == 1.0
    assert store.alerts(run_id)[0].message == "sigma rose"
    assert store.last_alert_step(run_id, "diverge:*") == 7
    assert store.plugin_states(run_id) == {"p": {"seen": 1}}
    outcome2 = PluginOutcome("train")
    outcome2.states["p"] = {"seen": 2}
    store.save_outcome(run_id, 8, outcome2)
    assert store.plugin_states(run_id) == {"p": {"seen": 2}}


def test_outcome_naming_an_unknown_site_stores_nothing(store: SqlStore) -> None:
    run_id = store.create_run("proj", RunStart(sites=SITES))
    outcome = PluginOutcome("train")
    outcome.measures.append(("p", "1", MeasureValue(name="ok", value=1.0, site="a#0")))
    outcome.measures.append(("p", "1", MeasureValue(name="bad", value=1.0, site="zzz")))
    with pytest.raises(NotFound, match="zzz"):
        store.save_outcome(run_id, 1, outcome)
    assert store.measures(run_id) == []


def test_probes_one_row_per_site_and_eta(store: SqlStore) -> None:
    run_id = store.create_run("proj", RunStart(sites=SITES))
    probe = ProbeRecord(
        step=3,
        kind="sweep",
        lr=0.1,
        sites=[SiteProbe(site="a#0", rows=10, etas=[0.01, 0.1, 1.0], changed=[0, 2, 9])],
    )
    store.save_probe(run_id, probe)
    points = store.probes(run_id)
    assert [(p.eta, p.changed, p.rows) for p in points] == [
        (0.01, 0, 10),
        (0.1, 2, 10),
        (1.0, 9, 10),
    ]


def test_unknown_run_is_not_found(store: SqlStore) -> None:
    with pytest.raises(NotFound):
        store.run("nope")
    with pytest.raises(NotFound):
        store.save_summary("nope", _summary(0))


def test_tokens_are_hashed_and_scoped(store: SqlStore) -> None:
    token = store.create_token("alpha")
    assert store.project_for_token(token) == "alpha"
    assert store.project_for_token(token + "x") is None


def test_batches_are_claimed_once(store: SqlStore) -> None:
    run_id = store.create_run("proj", RunStart(sites=SITES))
    assert store.claim_batch(run_id, "main", 0, {"x": 1}) is True
    assert store.claim_batch(run_id, "main", 0, {"x": 1}) is False
    assert store.claim_batch(run_id, "main", 1, {"x": 1}) is True


def _naive_ready(received: dict[int, bool], include_gaps: bool) -> list[int]:
    """Unprocessed seqs whose every lower seq is processed or itself ready (one stream)."""
    if include_gaps:
        return sorted(seq for seq, done in received.items() if not done)
    ready: list[int] = []
    for seq in sorted(s for s, done in received.items() if not done):
        if all(received.get(lower) is True or lower in ready for lower in range(seq)):
            ready.append(seq)
    return ready


def test_ready_batches_match_a_naive_reference_with_seqs_set_aside_out_of_turn(
    store: SqlStore,
) -> None:
    import random

    rng = random.Random(7)
    for _ in range(40):
        run_id = store.create_run("proj", RunStart(sites=SITES))
        received = {seq: False for seq in rng.sample(range(10), rng.randint(1, 10))}
        for seq in received:
            store.save_batch(run_id, "main", seq, {"seq": seq}, digest=f"{seq:064x}")
        # Some were processed, some quarantined, in any order (as a failed retry leaves them).
        for seq in rng.sample(sorted(received), rng.randint(0, len(received))):
            if rng.random() < 0.5:
                store.mark_batch_processed(run_id, "main", seq, seq)
            else:
                store.quarantine_batch(run_id, "main", seq, f"bad {seq}")
            received[seq] = True
        for gaps in (False, True):
            got = [seq for stream, seq, _ in store.ready_batches(run_id, include_gaps=gaps)]
            assert got == _naive_ready(received, gaps), (received, gaps)


def test_quarantine_keeps_the_payload_and_the_digest_tells_a_conflict(store: SqlStore) -> None:
    run_id = store.create_run("proj", RunStart(sites=SITES))
    store.save_batch(run_id, "main", 1, {"seq": 1}, digest="d1")
    store.quarantine_batch(run_id, "main", 1, "batch main/1: site 'x' was never announced\x00")
    assert store.quarantined_batches(run_id) == [
        ("main", 1, "batch main/1: site 'x' was never announced\\x00")
    ]
    assert store.batch_digest(run_id, "main", 1) == "d1"
    assert store.batch_digest(run_id, "main", 2) is None
    assert store.ready_batches(run_id) == []  # set aside: never offered again
    with pytest.raises(NotFound):
        store.quarantine_batch(run_id, "main", 5, "no such batch")
    store.record_error(run_id, "apmon.ingest", 2**64, "step out of range\ud800")
    assert store.errors(run_id) == [("apmon.ingest", 2**63 - 1, "step out of range\\ud800")]
