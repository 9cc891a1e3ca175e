"""sample_sets plugin (seed 002, eqs. 8-17) against a brute force over explicit samples."""

from __future__ import annotations

import math
import random

import pytest
import torch

from monitor.client.summary import measure, to_wire
from monitor.measures import PluginResult
from monitor.schema import SiteSummary, StepSummary
from plugins.sample_sets import SampleSetsPlugin, site_sample_sets, unit_sample_sets


def brute_unit(on: list[list[bool]], labels: list[int], unit: int) -> dict[str, float | None]:
    """Eqs. 8-15 for one unit, with explicit sets and sums over samples."""
    samples = range(len(labels))
    classes = sorted(set(labels))
    total = len(labels)
    s_c = {c: {s for s in samples if labels[s] == c} for c in classes}
    sample_set = {c: {s for s in s_c[c] if on[s][unit]} for c in classes}  # eq. 8
    size = sum(len(v) for v in sample_set.values())
    fraction = sum(len(sample_set[c]) / len(s_c[c]) for c in classes) / len(classes)  # 9, 16
    if size in (0, total):
        return {"size": size, "fraction": fraction, "p": None, "u": None}

    def e(z: int, c: int) -> float:  # eqs. 10, 11
        return (len(sample_set[c]) if z else len(s_c[c]) - len(sample_set[c])) / total

    def xlog(x: float, y: float) -> float:
        return 0.0 if x == 0 else x * math.log(y)

    p = 1 + sum(
        xlog(e(z, c), e(z, c) / sum(e(x, c) for x in (0, 1))) for c in classes for z in (0, 1)
    ) / math.log(2)  # eq. 14
    u = None
    if len(classes) > 1:
        u = 1 + sum(
            xlog(e(z, c), e(z, c) / sum(e(z, x) for x in classes)) for z in (0, 1) for c in classes
        ) / math.log(len(classes))  # eq. 15
    return {"size": size, "fraction": fraction, "p": p, "u": u}


def brute_site(on: list[list[bool]], labels: list[int]) -> dict[str, float]:
    """Eqs. 16-17: f over non-dead units, p and u over units neither dead nor always on."""
    per_unit = [brute_unit(on, labels, j) for j in range(len(on[0]))]
    alive = [u for u in per_unit if u["size"] != 0]
    switching = [u for u in alive if u["p"] is not None]
    out = {}
    if alive:
        out["activation_fraction"] = sum(u["fraction"] for u in alive) / len(alive)
    if switching:  # informativeness needs two classes (log |C| = 0 otherwise)
        out["predictability"] = sum(u["p"] for u in switching) / len(switching)
        if len(set(labels)) > 1:
            out["informativeness"] = sum(u["u"] for u in switching) / len(switching)
    return out


def summary_from_samples(site: str, on: list[list[bool]], labels: list[int]) -> SiteSummary:
    """A wire summary carrying exactly the per-class counts of explicit samples."""
    classes = sorted(set(labels))
    return SiteSummary(
        site=site,
        rows=len(labels),
        distinct=0,
        unit_on=[sum(row[j] for row in on) for j in range(len(on[0]))],
        class_rows={str(c): labels.count(c) for c in classes},
        class_unit_on={
            str(c): [
                sum(on[s][j] for s in range(len(labels)) if labels[s] == c)
                for j in range(len(on[0]))
            ]
            for c in classes
        },
    )


# Unit 0 dead, unit 1 always on, unit 2 on exactly for class 1, unit 3 mixed.
HAND_ON = [
    [False, True, False, True],
    [False, True, False, False],
    [False, True, True, True],
    [False, True, True, False],
    [False, True, True, True],
    [False, True, False, True],
]
HAND_LABELS = [0, 0, 1, 1, 1, 2]


def test_hand_example_per_unit() -> None:
    summary = summary_from_samples("s", HAND_ON, HAND_LABELS)
    units = unit_sample_sets(summary.class_rows or {}, summary.class_unit_on or {})
    assert units.size.tolist() == [0, 6, 3, 4]
    assert math.isnan(units.predictability[0]) and math.isnan(units.predictability[1])
    assert math.isnan(units.informativeness[0]) and math.isnan(units.informativeness[1])
    # unit 2 is determined by the class: H(Z|Y) = 0, so p = 1; H(Y|Z) is 1 bit of log2(3)
    # when off (classes 0 and 2 with 2 and 1 samples) and 0 when on.
    assert units.predictability[2] == pytest.approx(1.0)
    h_y_given_z = -(3 / 6) * ((2 / 3) * math.log(2 / 3) + (1 / 3) * math.log(1 / 3))
    assert units.informativeness[2] == pytest.approx(1 - h_y_given_z / math.log(3))
    assert units.fraction[2] == pytest.approx((0 + 1 + 0) / 3)
    for j in range(4):
        brute = brute_unit(HAND_ON, HAND_LABELS, j)
        assert units.fraction[j] == pytest.approx(brute["fraction"])
        if brute["p"] is not None:
            assert units.predictability[j] == pytest.approx(brute["p"])
            assert units.informativeness[j] == pytest.approx(brute["u"])


@pytest.mark.parametrize("seed", range(12))
def test_site_averages_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    samples, units, classes = rng.randint(2, 40), rng.randint(1, 9), rng.randint(1, 5)
    labels = [rng.randrange(classes) for _ in range(samples)]
    bias = [rng.choice([0.0, 0.1, 0.5, 0.9, 1.0]) for _ in range(units)]
    on = [[rng.random() < bias[j] for j in range(units)] for _ in range(samples)]
    got = site_sample_sets(summary_from_samples("s", on, labels))
    want = brute_site(on, labels)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12)


def test_plugin_on_a_real_labelled_measurement() -> None:
    """Client counts of a real tensor (dense and conv) through to_wire, then the plugin."""
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (64,))
    dense = torch.randn(64, 12) + torch.linspace(-2, 2, 12) + labels.unsqueeze(1) * 0.3
    conv = torch.randn(64, 3, 2, 2)
    event = StepSummary(
        step=5,
        source="probe_set",
        sites=[
            to_wire("dense", measure(dense, "dense", labels)),
            to_wire("conv", measure(conv, "conv", labels)),
        ],
    )
    result = SampleSetsPlugin().process(event, None, {}, {})  # type: ignore[arg-type]
    got = {(m.name, m.site): m.value for m in result.measures}
    dense_on = (dense > 0).tolist()
    # a conv site's rows are spatial positions, each labelled with its sample's class
    conv_rows = (conv > 0).permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    conv_labels = labels.repeat_interleave(4).tolist()
    expected = {
        "dense": brute_site(dense_on, labels.tolist()),
        "conv": brute_site(conv_rows, conv_labels),
    }
    for site, values in expected.items():
        for name, value in values.items():
            assert got[(name, site)] == pytest.approx(value, abs=1e-12)
    for name in ("activation_fraction", "predictability", "informativeness"):
        mean = (expected["dense"][name] + expected["conv"][name]) / 2
        assert got[(f"{name}_mean", None)] == pytest.approx(mean)


def test_only_labelled_probe_set_summaries_count() -> None:
    plugin = SampleSetsPlugin()
    labelled = summary_from_samples("s", HAND_ON, HAND_LABELS)
    unlabelled = labelled.model_copy(update={"class_rows": None, "class_unit_on": None})
    train = StepSummary(step=1, source="train", sites=[labelled])
    assert plugin.process(train, None, {}, {}).measures == []  # type: ignore[arg-type]
    bare = StepSummary(step=1, source="probe_set", sites=[unlabelled])
    assert plugin.process(bare, None, {}, {}).measures == []  # type: ignore[arg-type]
    assert isinstance(plugin.process(bare, None, {}, {}), PluginResult)  # type: ignore[arg-type]
