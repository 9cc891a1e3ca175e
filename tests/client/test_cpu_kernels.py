"""The fused CPU kernels give brute force's statistics and the torch operations' bit for bit."""

from __future__ import annotations

import logging
import random
from collections import Counter

import numpy as np
import pytest
import torch
from test_patterns import GOLDEN, MASK64, fp_int, mix_int, unmix_int

from monitor.client import cpu_kernels
from monitor.client.capture import rows_of
from monitor.client.summary import _measure_with_torch, measure, unit_dim_of
from monitor.schema import SiteKind


def brute_force(x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, object]:
    """Every statistic from Python tuples of each row's ``> 0`` pattern."""
    rows, _ = rows_of(x)
    patterns = [tuple(bool(v > 0) for v in row) for row in rows.tolist()]
    counts = Counter(patterns)
    units = rows.shape[1]
    result: dict[str, object] = {
        "histogram": sorted(counts.values()),
        "unit_on": [sum(p[u] for p in patterns) for u in range(units)],
        "nonfinite": sum(not all(abs(v) < float("inf") for v in row) for row in rows.tolist()),
    }
    if labels is not None:
        per_sample = len(patterns) // x.shape[0]
        classes: dict[int, list[int]] = {}
        class_rows: Counter[int] = Counter()
        for i, pattern in enumerate(patterns):
            label = int(labels[i // per_sample])
            class_rows[label] += 1
            on = classes.setdefault(label, [0] * units)
            for u in range(units):
                on[u] += pattern[u]
        result["class_rows"] = dict(class_rows)
        result["class_unit_on"] = classes
    return result


CASES = [
    ("dense", (40, 1)),
    ("dense", (40, 7)),
    ("dense", (300, 8)),
    ("dense", (300, 20)),
    ("dense", (50, 21)),
    ("dense", (64, 63)),
    ("dense", (64, 64)),
    ("dense", (64, 65)),
    ("dense", (33, 130)),
    ("seq", (5, 9, 12)),
    ("conv", (4, 16, 6, 5)),
    ("conv", (3, 32, 4, 4)),
    ("conv", (2, 70, 3, 3)),
    ("conv", (2, 5, 3, 2, 2)),
    # <= 16 units and 2^units <= 4 rows: packed and counted in one kernel (pack_and_count_table)
    ("conv", (16, 16, 32, 32)),
    ("conv", (8, 9, 8, 8)),
    ("conv", (5, 1, 4, 4)),
    # 17..32 units and >= 16384 rows: counted by a radix sort (count_sorted32)
    ("conv", (16, 32, 32, 32)),
    ("dense", (16384, 24)),
]


def _sample(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Few distinct values per unit, so that patterns repeat and counts exceed 1."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    x[x.abs() < 0.3] = 0.0  # exact zeros are "off"
    if shape[-1] > 1:
        x[..., 0] = -1.0  # a dead unit
    return x


@pytest.mark.parametrize(("kind", "shape"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_equal_brute_force_and_torch(kind: SiteKind, shape, dtype):
    x = _sample(shape, seed=len(shape) * 100 + shape[-1]).to(dtype)
    stats = measure(x, kind)
    expected = brute_force(x)
    assert sorted(stats.counts.counts.tolist()) == expected["histogram"]
    assert stats.unit_on.tolist() == expected["unit_on"]
    assert stats.nonfinite_rows == 0
    reference, _ = _measure_with_torch(x, unit_dim_of(kind), None, 0)
    assert stats.counts.as_dict() == reference.counts.as_dict()  # the same fingerprints


@pytest.mark.parametrize("units", [16, 4])  # a hashed count; a fused table count
def test_labels_non_finite_values_and_memory_layouts(units: int):
    x = _sample((6, units, 3, 4), seed=7)
    x[1, 3, 0, 0] = float("nan")
    x[4, 0, 2, 1] = float("inf")
    x[4, 0, 2, 2] = float("-inf")
    labels = torch.tensor([3, 1, 3, 0, 1, 1])
    expected = brute_force(x, labels)
    for variant in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().mT):
        stats = measure(variant, "conv", labels)
        assert sorted(stats.counts.counts.tolist()) == expected["histogram"]
        assert stats.unit_on.tolist() == expected["unit_on"]
        assert stats.nonfinite_rows == expected["nonfinite"] == 3
        assert stats.class_rows == expected["class_rows"]
        assert {k: v.tolist() for k, v in stats.class_unit_on.items()} == expected["class_unit_on"]


def test_a_fingerprint_collision_in_the_kernel_count_is_detected(caplog):
    """Two 128-unit patterns with equal fingerprints (SplitMix64 inverted) stay apart."""
    rng = random.Random(5)
    a0, a1, b0 = rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(64)
    b1 = (unmix_int(mix_int(a0) ^ mix_int((a1 + GOLDEN) & MASK64) ^ mix_int(b0)) - GOLDEN) & MASK64
    assert fp_int([a0, a1]) == fp_int([b0, b1])

    def row(w0: int, w1: int) -> list[float]:
        return [1.0 if (w0 if u < 64 else w1) >> (u % 64) & 1 else -1.0 for u in range(128)]

    x = torch.tensor([row(a0, a1)] * 3 + [row(b0, b1)] * 5)
    with caplog.at_level(logging.WARNING, logger="monitor.client.patterns"):
        stats = measure(x, "dense")
    assert "collision" in caplog.text
    assert sorted(stats.counts.counts.tolist()) == [3, 5]
    assert torch.unique(stats.counts.fingerprints).numel() == 2


def test_half_precision_takes_the_torch_path_with_the_same_result():
    x = _sample((50, 12), seed=3)
    half = measure(x.to(torch.bfloat16), "dense")
    assert half.counts.as_dict() == measure(x, "dense").counts.as_dict()


def fingerprint_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    uniform = np.unique(rng.integers(0, 2**64, size=3000, dtype=np.uint64))
    return {
        "uniform": uniform,
        "all small": np.arange(3000, dtype=np.uint64) * np.uint64(7),  # all below the bound
        # below the bound, but more than the room kept for candidates when k is small
        "half small": np.concatenate(
            [np.arange(1500, dtype=np.uint64), ~np.arange(1500, dtype=np.uint64)]
        ),
        "all large": ~np.arange(3000, dtype=np.uint64),  # none below it: the full sort
        "few": uniform[:5],
        "none": uniform[:0],
    }


@pytest.mark.parametrize("name", list(fingerprint_sets()))
@pytest.mark.parametrize("k", [1, 5, 256, 2999, 3000])
def test_sketch_and_spectrum_equals_sort_and_count(name: str, k: int):
    fingerprints = fingerprint_sets()[name]
    rng = np.random.default_rng(k)
    counts = rng.integers(1, 9, size=fingerprints.size)
    # a few counts past the dense histograms (1024), some of them equal
    heavy = rng.choice(fingerprints.size, size=min(7, fingerprints.size), replace=False)
    counts[heavy] = rng.choice([1023, 1024, 1024, 5000, 70000], size=heavy.size)
    kept, values, multiplicities = cpu_kernels.sketch_and_spectrum(fingerprints, counts, k)
    by_value = sorted(range(fingerprints.size), key=lambda i: int(fingerprints[i]))
    assert kept.tolist() == by_value[:k]
    spectrum = sorted(Counter(counts.tolist()).items())
    assert list(zip(values.tolist(), multiplicities.tolist(), strict=True)) == spectrum


@pytest.mark.parametrize(
    "name",
    ["distinct", "repeats", "below 2^16 (upper digit passes skipped)", "all equal", "one row"],
)
def test_count_sorted32_equals_the_hash_count(name: str):
    rng = np.random.default_rng(11)
    words = (
        {
            "distinct": rng.choice(2**32, 20000, replace=False),
            "repeats": rng.integers(0, 300, size=20000) * 7919,
            "below 2^16 (upper digit passes skipped)": rng.integers(0, 2**16, size=20000),
            "all equal": np.full(20000, 2**32 - 1),
            "one row": np.array([12345]),
        }[name]
        .astype(np.int64)
        .reshape(-1, 1)
    )
    fingerprints, counts = cpu_kernels.count_sorted32(words)
    expected, expected_counts, verified = cpu_kernels.count_hashed(words)
    assert verified
    assert dict(zip(fingerprints.tolist(), counts.tolist(), strict=True)) == dict(
        zip(expected.tolist(), expected_counts.tolist(), strict=True)
    )
    assert sorted(counts.tolist()) == sorted(Counter(words[:, 0].tolist()).values())


@pytest.mark.parametrize("infinite", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 3, 7), (2, 70, 9), (1, 1, 1)])
def test_count_on_positions_equals_pack_and_count_on_bit_for_bit(shape, dtype, infinite):
    """The scale-only pass gives the on-counts, scale and non-finite count of the packing pass."""
    values = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    if infinite:
        values.reshape(-1)[::11] = np.inf
    outer, units, inner = shape
    outer_class = np.arange(outer, dtype=np.int64) % 2
    on, scale = np.zeros((2, units), dtype=np.int64), np.full(2, 0.5)
    words = np.zeros((outer * inner, (units + 63) // 64), dtype=np.int64)
    expected = cpu_kernels.pack_and_count_on(values, outer_class, words, on, scale)
    on_after, scale_after = np.zeros((2, units), dtype=np.int64), np.full(2, 0.5)
    found = cpu_kernels.count_on_positions(values, outer_class, on_after, scale_after)
    assert found == expected
    assert on_after.tolist() == on.tolist()
    assert scale_after.tobytes() == scale.tobytes()  # the same sums, not merely close ones
