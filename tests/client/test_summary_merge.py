"""merge(a, b) == summary(a + b) for every field, and every field against brute force."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from memory_transport import ListTransport
from torch import nn

from monitor.client import cpu_kernels, summary
from monitor.client.handle import Monitor
from monitor.client.patterns import mix64, pack_bits
from monitor.client.summary import empty_stats, measure, measure_scale, to_wire
from monitor.schema import SiteSummary


def make_input(kind: str, seed: int, units: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = {"dense": (24, units), "seq": (24, 5, units), "conv": (24, units, 3, 4)}[kind]
    x = torch.randn(shape, generator=gen)
    x = torch.where(x.abs() < 0.6, torch.zeros_like(x), x)  # ties at 0 count as off
    x.view(-1)[7] = float("nan")
    x.view(-1)[-3] = float("inf")
    return x


def rows_of(x: torch.Tensor, kind: str) -> torch.Tensor:
    return (
        x.movedim(1, -1).reshape(-1, x.shape[1]) if kind == "conv" else x.reshape(-1, x.shape[-1])
    )


def assert_same(a, b):
    assert a.units == b.units
    assert a.counts.as_dict() == b.counts.as_dict()
    assert torch.equal(a.unit_on, b.unit_on)
    assert a.nonfinite_rows == b.nonfinite_rows
    assert a.class_rows == b.class_rows
    assert a.class_unit_on.keys() == b.class_unit_on.keys()
    for label in a.class_unit_on:
        assert torch.equal(a.class_unit_on[label], b.class_unit_on[label])
    assert a.sumsq == pytest.approx(b.sumsq, rel=1e-12)  # sums in another order
    assert a.max_abs == b.max_abs


def same_wire(a: SiteSummary, b: SiteSummary) -> bool:
    """Equal summaries, up to the rounding of the sum of squares (merged sums in another order)."""
    return a.model_copy(update={"sumsq": 0.0}) == b.model_copy(
        update={"sumsq": 0.0}
    ) and a.sumsq == pytest.approx(b.sumsq, rel=1e-12)


CASES = [("dense", 5), ("dense", 70), ("seq", 9), ("conv", 16), ("conv", 3), ("conv", 130)]


@pytest.mark.parametrize(("kind", "units"), CASES)
def test_merge_equals_summary_of_concatenation(kind, units):
    x = make_input(kind, units, units)
    labels = torch.tensor([3, 1, 4, 1, 5, 9] * 4)
    whole = measure(x, kind, labels)
    parts = [measure(x[i : i + 10], kind, labels[i : i + 10]) for i in (0, 10, 20)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert_same(merged, whole)
    assert_same(empty_stats(units).merge(whole), whole)
    for k in (4, 256):
        assert same_wire(to_wire("s", merged, k), to_wire("s", whole, k))


@pytest.mark.parametrize(("kind", "units"), CASES)
def test_every_field_against_brute_force(kind, units):
    x = make_input(kind, units + 1, units)
    labels = torch.tensor([0, 2, 2, 7] * 6)
    stats = measure(x, kind, labels)
    rows = rows_of(x, kind)
    mask = rows > 0
    per_sample = rows.shape[0] // 24
    row_labels = labels.repeat_interleave(per_sample)
    counter = Counter(tuple(r) for r in mask.tolist())
    summary = to_wire("s", stats, sketch_k=10**6)
    # to_wire builds without validation: what it builds must pass the wire's validation unchanged
    assert SiteSummary.model_validate(summary.model_dump()) == summary
    assert SiteSummary.model_validate_json(summary.model_dump_json()) == summary
    n = rows.shape[0]
    assert summary.rows == n and summary.distinct == len(counter)
    assert summary.unit_on == mask.sum(0).tolist()
    assert summary.nonfinite_rows == int((~torch.isfinite(rows)).any(1).sum())
    finite = [v for v in x.reshape(-1).tolist() if math.isfinite(v)]
    assert summary.sumsq == pytest.approx(math.fsum(v * v for v in finite), rel=1e-9)
    assert summary.max_abs == max(abs(v) for v in finite)
    for label in (0, 2, 7):
        chosen = mask[row_labels == label]
        assert summary.class_rows[str(label)] == chosen.shape[0]
        assert summary.class_unit_on[str(label)] == chosen.sum(0).tolist()
    # the spectrum gives distinct, max_freq and entropy exactly
    assert sorted(summary.spectrum) == sorted(Counter(counter.values()).items())
    entropy = -sum(c * m / n * math.log2(c / n) for c, m in summary.spectrum)
    brute = -sum(c / n * math.log2(c / n) for c in counter.values())
    assert entropy == pytest.approx(brute, rel=1e-12)
    assert max(c for c, _ in summary.spectrum) == max(counter.values())
    # fingerprints are those of the packed patterns
    fps = mix64(pack_bits(mask)[:, 0]) if units <= 64 else None
    if fps is not None:
        expected = Counter(v % 2**64 for v in fps.tolist())
        assert dict(summary.patterns) == dict(expected)


@pytest.mark.parametrize(("kind", "units"), CASES)
def test_torch_path_scale_equals_kernels(kind, units):
    # float16 is not a kernel dtype: the same values go through the torch operations
    x = make_input(kind, units + 2, units).to(torch.float16)
    kernels, torch_path = measure(x.float(), kind), measure(x, kind)
    assert torch_path.sumsq == pytest.approx(kernels.sumsq, rel=1e-9)
    assert torch_path.max_abs == kernels.max_abs
    assert torch_path.nonfinite_rows == kernels.nonfinite_rows > 0


@pytest.mark.parametrize(("kind", "units"), CASES)
@pytest.mark.parametrize("labelled", [False, True])
def test_summaries_while_the_kernels_load_equal_the_kernels(kind, units, labelled, monkeypatch):
    # Until ``kernel_loader`` loads the kernels, summaries come from torch operations and
    # numpy's sketch; the wire must not tell the difference.
    x = make_input(kind, units + 3, units)
    labels = torch.arange(x.shape[0]) % 3 if labelled else None
    loaded = to_wire("s", measure(x, kind, labels), sketch_k=8)
    loaded_scale = measure_scale(x, kind)
    finite = torch.nan_to_num(x, nan=0.0, posinf=5.0, neginf=-5.0)
    loaded_finite = measure_scale(finite, kind)
    monkeypatch.setattr(summary, "kernels", lambda: None)
    loading = to_wire("s", measure(x, kind, labels), sketch_k=8)
    assert same_wire(loading, loaded)
    assert loading.sumsq == pytest.approx(loaded.sumsq, rel=1e-9)
    assert_same(measure_scale(x, kind), loaded_scale)
    assert_same(measure_scale(finite, kind), loaded_finite)
    assert loaded_finite.nonfinite_rows == 0 and loaded_finite.max_abs == 5.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("read", [measure_scale, measure])
def test_large_site_scale_read_in_chunks_equals_brute_force(read, dtype, monkeypatch):
    # Above ``_SQUARES_CHUNK`` values the sum of squares is taken a chunk at a time (two whole
    # chunks and a part here), and a conv site's on-counts are tallied in uint16 first.
    x = torch.randn((65, 16, 16, 16), generator=torch.Generator().manual_seed(3), dtype=dtype)
    assert 2 * summary._SQUARES_CHUNK < x.numel() < 3 * summary._SQUARES_CHUNK
    monkeypatch.setattr(summary, "kernels", lambda: None)
    stats = read(x, "conv")
    values = x.reshape(-1).tolist()
    assert stats.sumsq == pytest.approx(math.fsum(v * v for v in values), rel=1e-12)
    assert stats.max_abs == max(abs(v) for v in values)
    assert stats.unit_on.tolist() == [
        sum(1 for v in x[:, unit].reshape(-1).tolist() if v > 0) for unit in range(16)
    ]


def test_numpy_sketch_and_spectrum_equal_the_kernel():
    rng = np.random.default_rng(7)
    for n, k in [(0, 4), (5, 8), (256, 256), (1000, 16), (3000, 256)]:
        fingerprints = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
        fingerprints = np.unique(fingerprints)  # distinct, as a histogram's are
        counts = rng.integers(1, 2000, fingerprints.size).astype(np.int64)
        numpy_way = summary.sketch_and_spectrum_numpy(fingerprints, counts, k)
        kernel_way = cpu_kernels.sketch_and_spectrum(fingerprints, counts, k)
        for ours, theirs in zip(numpy_way, kernel_way, strict=True):
            assert np.array_equal(ours, theirs)
        order = np.sort(fingerprints)[:k]  # brute force: the k smallest, ascending
        assert np.array_equal(fingerprints[numpy_way[0]], order)
        assert dict(zip(*numpy_way[1:], strict=True)) == dict(Counter(counts.tolist()))


def test_exact_below_threshold_and_bottom_k_above():
    x = make_input("conv", 0, 16)
    stats = measure(x, "conv")
    everything = sorted(stats.counts.as_dict().items())
    distinct = len(everything)
    exact = to_wire("s", stats, sketch_k=distinct)
    assert exact.patterns_exact and exact.sketch_k is None and exact.patterns == everything
    sketch = to_wire("s", stats, sketch_k=distinct - 1)
    assert not sketch.patterns_exact and sketch.sketch_k == distinct - 1
    assert sketch.patterns == everything[: distinct - 1]
    small = to_wire("s", stats, sketch_k=8)
    assert small.patterns == everything[:8] and small.distinct == distinct


def test_gradient_accumulation_micro_batches_merge_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    x = torch.randn(12, 3, 8, 8)
    labels = torch.randint(0, 4, (12,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    summaries = []
    for chunks in (1, 3):
        transport = ListTransport()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with Monitor(model, opt, transport) as monitor:
            for xs, ys in zip(x.chunk(chunks), labels.chunk(chunks), strict=True):
                monitor.set_labels(ys)
                model(xs).sum().backward()
            opt.step()
        model.load_state_dict(state)
        summaries.append(transport.summaries[0])
    one, three = summaries
    # the inputs' RMS: sums of squares of the chunks, added in another order
    assert one.scalars is not None and three.scalars is not None
    assert one.scalars == pytest.approx(three.scalars, rel=1e-6)
    rest = {"sites": [], "scalars": None}
    assert one.model_copy(update=rest) == three.model_copy(update=rest)
    assert all(same_wire(a, b) for a, b in zip(one.sites, three.sites, strict=True))
    assert summaries[0].sites[0].class_rows is not None


@pytest.mark.parametrize(("kind", "units"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_read_by_numpy_equals_brute_force(kind, units, dtype, monkeypatch):
    # Before the kernels load, numpy reads a finite site's scale (``_scale_with_numpy``).
    x = torch.nan_to_num(make_input(kind, units + 5, units), nan=0.0, posinf=4.0).to(dtype)
    monkeypatch.setattr(summary, "kernels", lambda: None)
    read = []
    real = summary._scale_with_numpy
    monkeypatch.setattr(summary, "_scale_with_numpy", lambda *a: read.append(1) or real(*a))
    stats = measure_scale(x, kind)
    assert read, "the numpy path did not run"
    rows = rows_of(x, kind)
    values = [float(v) for v in x.reshape(-1).tolist()]
    assert stats.rows == rows.shape[0] and stats.units == units
    assert stats.unit_on.tolist() == [
        sum(1 for r in rows[:, u].tolist() if r > 0) for u in range(units)
    ]
    assert stats.sumsq == pytest.approx(math.fsum(v * v for v in values), rel=1e-12)
    assert stats.max_abs == max(abs(v) for v in values)
    assert stats.nonfinite_rows == 0 and stats.scale_only


def _brute_scale(x: torch.Tensor, kind: str) -> dict[str, object]:
    """Rows, unit on-counts, non-finite rows, sum of squares and max |x| of the finite values.

    The sum of squares is compared up to rounding: float64 sums in another order.
    """
    rows = rows_of(x, kind)
    finite = [v for v in x.reshape(-1).tolist() if math.isfinite(v)]
    return {
        "rows": rows.shape[0],
        "unit_on": [sum(1 for r in rows[:, u].tolist() if r > 0) for u in range(rows.shape[1])],
        "nonfinite_rows": sum(1 for r in rows.tolist() if not all(map(math.isfinite, r))),
        "sumsq": pytest.approx(math.fsum(v * v for v in finite), rel=1e-12),
        "max_abs": max((abs(v) for v in finite), default=0.0),
    }


def _scale_fields(stats: summary.SiteStats) -> dict[str, object]:
    return {
        "rows": stats.rows,
        "unit_on": stats.unit_on.tolist(),
        "nonfinite_rows": stats.nonfinite_rows,
        "sumsq": stats.sumsq,
        "max_abs": stats.max_abs,
    }


@pytest.mark.parametrize(("kind", "units"), CASES)
@pytest.mark.parametrize("finite", [False, True])
def test_scale_kept_on_the_device_until_settled_equals_brute_force(kind, units, finite):
    # An accelerator's sites go through ``_scale_on_device`` (any device: here the CPU's
    # tensors), whose sums wait in ``pending`` until ``settle`` brings them back at once.
    x = make_input(kind, units + 11, units)
    if finite:
        x = torch.nan_to_num(x, nan=0.0, posinf=4.0)
    stats = summary._scale_on_device(x, summary.unit_dim_of(kind))
    assert stats.pending is not None and stats.scale_only
    assert (stats.sumsq, stats.max_abs, stats.nonfinite_rows) == (0.0, 0.0, 0)  # not yet
    summary.settle([stats])
    assert stats.pending is None
    assert _scale_fields(stats) == _brute_scale(x, kind)
    assert (stats.nonfinite_rows > 0) is not finite


@pytest.mark.parametrize(("kind", "units"), CASES)
def test_pending_scale_merges_and_reaches_the_wire_like_the_cpu_path(kind, units):
    # Micro-batches merged while pending, settled once with a site that has nothing pending,
    # give the statistics of all rows; a pending site that reaches ``to_wire`` is settled there.
    x = make_input(kind, units + 13, units)
    dim = summary.unit_dim_of(kind)
    parts = [summary._scale_on_device(x[i : i + 8], dim) for i in (0, 8, 16)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    other = measure_scale(x[:5], kind)  # the CPU path: nothing pending
    before = _scale_fields(other)
    summary.settle([merged, other])
    assert merged.pending is None and _scale_fields(other) == before
    assert _scale_fields(merged) == _brute_scale(x, kind)
    wire = to_wire("s", summary._scale_on_device(x, dim))
    cpu = to_wire("s", measure_scale(x, kind))
    assert same_wire(wire, cpu)
