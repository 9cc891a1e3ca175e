"""Exact counting: packing, fingerprints, counts against brute force, and collisions built on
purpose under the sources' hash and under our own fingerprint."""

from __future__ import annotations

import importlib.util
import logging
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from monitor.client.patterns import (
    count_patterns,
    count_words,
    fingerprint,
    merge_counts,
    mix64,
    pack_bits,
    pack_signs,
)

MASK64 = 2**64 - 1
M1, M2, GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15


def _load_reference():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "reference_counting.py"
    spec = importlib.util.spec_from_file_location("reference_counting", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


def signed(u: int) -> int:
    return u - 2**64 if u >= 2**63 else u


def mix_int(x: int) -> int:
    x ^= x >> 30
    x = (x * M1) & MASK64
    x ^= x >> 27
    x = (x * M2) & MASK64
    return x ^ (x >> 31)


def _unxorshift(y: int, k: int) -> int:
    x = y
    for _ in range(64 // k + 1):
        x = y ^ (x >> k)
    return x


def unmix_int(x: int) -> int:
    x = _unxorshift(x, 31)
    x = (x * pow(M2, -1, 2**64)) & MASK64
    x = _unxorshift(x, 27)
    x = (x * pow(M1, -1, 2**64)) & MASK64
    return _unxorshift(x, 30)


def fp_int(words: list[int]) -> int:
    """Our fingerprint on unsigned Python ints (mirror of patterns.fingerprint)."""
    fp = mix_int(words[0])
    for j, w in enumerate(words[1:], start=1):
        fp = mix_int(fp ^ mix_int((w + GOLDEN * j) & MASK64))
    return fp


def words_to_mask(rows: list[list[int]], units: int) -> torch.Tensor:
    """Boolean (n, units) mask whose packed words are ``rows`` (unsigned ints)."""
    mask = torch.zeros(len(rows), units, dtype=torch.bool)
    for i, words in enumerate(rows):
        for w, word in enumerate(words):
            for bit in range(64):
                if 64 * w + bit < units and (word >> bit) & 1:
                    mask[i, 64 * w + bit] = True
    return mask


def brute_force(mask: torch.Tensor) -> dict[int, int]:
    """{our fingerprint: count} by a Python Counter over row tuples."""
    counter = Counter(tuple(row) for row in mask.tolist())
    out = {}
    for row, count in counter.items():
        words = [0] * ((len(row) + 63) // 64)
        for j, on in enumerate(row):
            if on:
                words[j // 64] |= 1 << (j % 64)
        out[fp_int(words)] = count
    return out


def random_mask(rows: int, units: int, pool: int, seed: int) -> torch.Tensor:
    """Rows drawn from a pool of random patterns, so that patterns repeat."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(pool, units, generator=gen) > 0.5
    return patterns[torch.randint(0, pool, (rows,), generator=gen)]


def test_python_mirror_matches_torch_mix_and_inverse():
    values = [0, 1, 2**63, MASK64, 0x0123456789ABCDEF] + [random.getrandbits(64) for _ in range(50)]
    torch_out = mix64(torch.tensor([signed(v) for v in values])).tolist()
    assert [v % 2**64 for v in torch_out] == [mix_int(v) for v in values]
    assert [unmix_int(mix_int(v)) for v in values] == values


@pytest.mark.parametrize("units", [1, 7, 8, 16, 33, 64, 65, 130])
def test_pack_signs_matches_arithmetic_packing(units):
    torch.manual_seed(units)
    dense = torch.randn(37, units)
    assert torch.equal(pack_signs(dense, -1)[1], pack_bits(dense > 0))
    conv = torch.randn(3, units, 5, 4)
    rows = conv.movedim(1, -1).reshape(-1, units)
    assert torch.equal(pack_signs(conv, 1)[1], pack_bits(rows > 0))
    seq = torch.randn(4, 6, units)
    assert torch.equal(pack_signs(seq, -1)[1], pack_bits(seq.reshape(-1, units) > 0))


@pytest.mark.parametrize(
    ("rows", "units", "pool"),
    [
        (500, 3, 8),
        (3000, 12, 300),
        (40, 12, 30),
        (2000, 16, 1500),
        (700, 20, 500),
        (600, 40, 200),
        (600, 64, 400),
        (300, 100, 120),
        (200, 200, 150),
    ],
)
def test_counts_equal_brute_force(rows, units, pool):
    mask = random_mask(rows, units, pool, seed=rows + units)
    counts = count_patterns(mask)
    expected = brute_force(mask)
    assert counts.as_dict() == expected
    assert counts.distinct == len(expected)
    assert counts.rows == rows


def test_single_word_fingerprint_is_a_bijection():
    words = torch.arange(-5000, 5000, dtype=torch.int64).unsqueeze(1) * 7919
    assert torch.unique(fingerprint(words)).numel() == words.shape[0]


def test_merge_counts_is_exact():
    mask = random_mask(900, 30, 250, seed=3)
    parts = [count_patterns(mask[i : i + 200]) for i in range(0, 900, 200)]
    assert merge_counts(parts).as_dict() == brute_force(mask)


def _source_preimage(h: int, prefix_hash: int) -> int:
    """The word w with (w * Q) XOR (prefix_hash * P) == h (Q is odd, so invertible mod 2^64)."""
    return ((h ^ ((prefix_hash * ref.P) & MASK64)) * pow(ref.Q, -1, 2**64)) & MASK64


def test_patterns_colliding_in_the_sources_table_stay_distinct():
    """64 one-word patterns whose source hashes agree modulo the table size: Algorithm 2 puts them
    all in one slot; our counts stay exact."""
    table = ref.DEFAULT_TABLE
    base = random.Random(0).getrandbits(64)
    words = [_source_preimage((base + i * table) & MASK64, ref.OFFSET) for i in range(64)]
    assert len(set(words)) == 64
    assert {ref.source_hash_int([w]) % table for w in words} == {base % table}
    rows = [[w] for i, w in enumerate(words) for _ in range(i + 1)]
    mask = words_to_mask(rows, 64)
    keys = ref.source_hash(ref.pack_words(mask)) % table
    assert torch.unique(keys).numel() == 1  # the torch reference agrees with the construction
    assert ref.source_distinct(mask, table) == 1
    counts = count_patterns(mask)
    assert counts.distinct == 64
    assert sorted(counts.counts.tolist()) == list(range(1, 65))
    assert counts.as_dict() == brute_force(mask)


def test_full_64_bit_collisions_of_the_sources_hash_stay_distinct():
    """Two-word patterns with the *same* 64-bit source hash: merged for every table size."""
    rng = random.Random(1)
    target = ref.source_hash_int([rng.getrandbits(64), rng.getrandbits(64)])
    rows = []
    for _ in range(20):
        first = rng.getrandbits(64)
        prefix = ((first * ref.Q) & MASK64) ^ ((ref.OFFSET * ref.P) & MASK64)
        rows.append([first, _source_preimage(target, prefix)])
    assert {ref.source_hash_int(r) for r in rows} == {target}
    mask = words_to_mask(rows, 128)
    for table in (1000, 30000, 2**20):
        assert ref.source_distinct(mask, table) == 1
    counts = count_patterns(mask)
    assert counts.distinct == 20
    assert counts.as_dict() == brute_force(mask)


def test_a_collision_of_our_own_fingerprint_is_detected_and_counted_exactly(caplog):
    """Build two 128-unit patterns with equal fingerprints (by inverting SplitMix64): the group
    check finds it and the recount keeps them apart."""
    rng = random.Random(2)
    a0, a1, b0 = rng.getrandbits(64), rng.getrandbits(64), rng.getrandbits(64)
    b1 = (unmix_int(mix_int(a0) ^ mix_int((a1 + GOLDEN) & MASK64) ^ mix_int(b0)) - GOLDEN) & MASK64
    assert fp_int([a0, a1]) == fp_int([b0, b1])
    words = torch.tensor([[signed(a0), signed(a1)]] * 3 + [[signed(b0), signed(b1)]] * 5)
    with caplog.at_level(logging.WARNING, logger="monitor.client.patterns"):
        counts = count_words(words, 128)
    assert "collision" in caplog.text
    assert counts.distinct == 2
    assert sorted(counts.counts.tolist()) == [3, 5]
    assert torch.unique(counts.fingerprints).numel() == 2


def test_empty_input():
    counts = count_patterns(torch.zeros(0, 10, dtype=torch.bool))
    assert counts.distinct == 0 and counts.rows == 0


def test_channels_last_conv_packs_like_contiguous():
    x = torch.randn(3, 16, 5, 4)
    assert torch.equal(
        pack_signs(x.to(memory_format=torch.channels_last), 1)[1], pack_signs(x, 1)[1]
    )
