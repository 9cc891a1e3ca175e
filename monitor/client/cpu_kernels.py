"""Fused CPU kernels (numba) for a site's sign bits, on-counts and exact pattern counts.

On the CPU a chain of torch operations reads a site's preactivations several times (compare,
pack, transpose, min/max) and sorts to count; these kernels read them once, in memory order, and
count exactly: in a table of all 2^d patterns when d is small against the rows (sites of <= 16
units are packed and counted in one pass), by a radix sort for many rows of <= 32 bits, else in
a hash table. They compute exactly what ``patterns.pack_signs``,
``summary._unit_on_counts`` and ``patterns.count_words`` compute (tests/client/test_cpu_kernels.py
checks them against those and against brute force); ``measure`` uses them for float32/float64
tensors on the CPU and the torch operations everywhere else (GPUs, half precision).

**Exactness.** The full table and the sort count the patterns themselves. The hash table stores
full keys with linear probing, so unlike the sources' table (``hash % size``, Algorithm 1/2) two
keys never share an entry. For d <= 64 the key is the
SplitMix64 finaliser of the pattern's one word, a bijection. For d > 64 the key is the chained
64-bit fingerprint, and every row is compared word by word with the first row that had its key;
a mismatch (a fingerprint collision, probability <= n^2 / 2^65) is reported and the caller
recounts on the words themselves.

The kernels are compiled on first use (about a second each, cached on disk by numba) and run on
the calling thread without the GIL's help or harm: one pass, no temporaries but the outputs.
Dense rows are the exception: their units are contiguous, so numpy's ``packbits`` (a byte per
eight units, vectorised) packs them faster than a loop that shifts bits one unit at a time, and
``count_on_rows`` adds the on-counts in a pass of its own.
"""

from __future__ import annotations

import numba
import numpy as np

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, nogil=True)
def _mix64(x: np.uint64) -> np.uint64:  # pragma: no cover - compiled
    """SplitMix64 finaliser; the same bijection as ``patterns.mix64``."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True, nogil=True, inline="always")
def _take_value(
    value: float, squares: np.ndarray, largest: np.ndarray, at: int
) -> int:  # pragma: no cover - compiled
    """Add one value to the scale at ``at`` (its square, its magnitude); 1 if it is not finite.

    Inlined into every counting loop (numba's ``inline="always"``), so the loops keep their
    order of additions and vectorise as before.
    """
    wide = np.float64(value)
    squares[at] += wide * wide
    size = abs(wide)
    largest[at] = size if size > largest[at] else largest[at]
    return 1 if value - value != 0 else 0  # inf - inf and NaN - NaN are NaN


@numba.njit(cache=True, nogil=True)
def pack_and_count_on(
    x: np.ndarray, outer_class: np.ndarray, words: np.ndarray, on: np.ndarray, scale: np.ndarray
) -> int:  # pragma: no cover - compiled
    """Sign bits of ``x`` (outer, units, inner) into ``words`` (outer * inner, W), zeroed.

    Row ``o * inner + p`` gets bit ``u % 64`` of word ``u // 64`` set when ``x[o, u, p] > 0``;
    ``on[outer_class[o], u]`` counts those rows. Returns the number of non-finite values.
    ``scale`` (2,) float64 gets the sum of squares added to ``scale[0]`` and the largest
    magnitude maxed into ``scale[1]`` (the site's preactivation scale); both are meaningless when
    a value is non-finite (the caller then recomputes them over the finite values). They are
    accumulated per position in arrays, not in one scalar, so that the loop still vectorises
    (a scalar float sum is a reduction LLVM may not reorder).
    Each unit's ``inner`` values are contiguous, so the inner loop runs along rows and
    vectorises; dense rows (inner 1) go through ``count_on_rows`` and numpy's ``packbits``.
    """
    outer, units, inner = x.shape
    nonfinite = 0
    squares = np.zeros(inner, dtype=np.float64)
    largest = np.zeros(inner, dtype=np.float64)
    for o in range(outer):
        base = o * inner
        label = outer_class[o]
        for u in range(units):
            word = u >> 6
            bit = np.int64(1) << np.int64(u & 63)
            count = 0
            for p in range(inner):
                value = x[o, u, p]
                positive = value > 0
                words[base + p, word] |= bit * positive
                count += positive
                nonfinite += _take_value(value, squares, largest, p)
            on[label, u] += count
    _add_scale(scale, squares, largest)
    return nonfinite


@numba.njit(cache=True, nogil=True)
def count_on_positions(
    x: np.ndarray, outer_class: np.ndarray, on: np.ndarray, scale: np.ndarray
) -> int:  # pragma: no cover - compiled
    """``pack_and_count_on`` without the sign bits: on-counts, scale and non-finite values.

    The scale-only statistics of a conv or sequence site (``summary.measure_scale``) need no
    bits; writing them cost about a third of the pass. The loops and the order in which the
    squares are added are those of ``pack_and_count_on``, so the sums are the same to the bit.
    """
    outer, units, inner = x.shape
    nonfinite = 0
    squares = np.zeros(inner, dtype=np.float64)
    largest = np.zeros(inner, dtype=np.float64)
    for o in range(outer):
        label = outer_class[o]
        for u in range(units):
            count = 0
            for p in range(inner):
                value = x[o, u, p]
                count += value > 0
                nonfinite += _take_value(value, squares, largest, p)
            on[label, u] += count
    _add_scale(scale, squares, largest)
    return nonfinite


@numba.njit(cache=True, nogil=True)
def count_on_rows(
    x: np.ndarray, row_class: np.ndarray, on: np.ndarray, scale: np.ndarray
) -> int:  # pragma: no cover - compiled
    """``on[row_class[r], u] += x[r, u] > 0`` over rows (rows, units); returns non-finite values.

    The dense-row half of ``pack_and_count_on`` (``scale`` as there, accumulated per unit): the
    loop runs along a row's contiguous units.
    """
    rows, units = x.shape
    nonfinite = 0
    squares = np.zeros(units, dtype=np.float64)
    largest = np.zeros(units, dtype=np.float64)
    for r in range(rows):
        label = row_class[r]
        for u in range(units):
            value = x[r, u]
            on[label, u] += value > 0
            nonfinite += _take_value(value, squares, largest, u)
    _add_scale(scale, squares, largest)
    return nonfinite


@numba.njit(cache=True, nogil=True)
def _add_scale(
    scale: np.ndarray, squares: np.ndarray, largest: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Fold per-position sums of squares and maxima into ``scale`` = (sum, max)."""
    scale[0] += squares.sum()
    if largest.size:
        scale[1] = max(scale[1], largest.max())


@numba.njit(cache=True, nogil=True)
def count_table(words: np.ndarray, units: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """Fingerprints and counts of one-word patterns of ``units`` <= 20 bits, via a 2^units table."""
    table = np.zeros(1 << units, dtype=np.int64)
    for r in range(words.shape[0]):
        table[words[r, 0]] += 1
    return _table_histogram(table)


# Sites this narrow are packed into 16-bit words and counted as they are packed.
PACKED_TABLE_UNITS = 16


@numba.njit(cache=True, nogil=True)
def pack_and_count_table(
    x: np.ndarray, outer_class: np.ndarray, on: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:  # pragma: no cover - compiled
    """``pack_and_count_on`` then ``count_table`` in one pass, for ``units`` <= 16 and inner > 1.

    Returns ``(fingerprints, counts, nonfinite)``. One outer index's ``inner`` rows are packed
    into a block of 16-bit words that stays in the L1 cache and are counted from there into an
    int32 table of all 2^units patterns (the caller keeps rows below 2^31), so no words array
    is written out and read back: for a 16-channel site of a CIFAR ResNet (131k rows), 0.28 ms
    against 0.35 ms for ``pack_and_count_on`` and ``count_table``.
    """
    outer, units, inner = x.shape
    table = np.zeros(1 << units, dtype=np.int32)
    block = np.empty(inner, dtype=np.uint16)
    nonfinite = 0
    squares = np.zeros(inner, dtype=np.float64)
    largest = np.zeros(inner, dtype=np.float64)
    for o in range(outer):
        label = outer_class[o]
        block[:] = 0
        for u in range(units):
            bit = np.uint16(1 << u)
            count = 0
            for p in range(inner):
                value = x[o, u, p]
                positive = value > 0
                block[p] |= bit * positive
                count += positive
                nonfinite += _take_value(value, squares, largest, p)
            on[label, u] += count
        for p in range(inner):
            table[block[p]] += 1
    _add_scale(scale, squares, largest)
    fingerprints, counts = _table_histogram(table)
    return fingerprints, counts, nonfinite


@numba.njit(cache=True, nogil=True)
def _table_histogram(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """``(fingerprints, counts)`` of the patterns a table of all 2^units values holds."""
    distinct = 0
    for value in range(table.size):
        distinct += table[value] > 0
    fingerprints = np.empty(distinct, dtype=np.uint64)
    counts = np.empty(distinct, dtype=np.int64)
    i = 0
    for value in range(table.size):
        if table[value] > 0:
            fingerprints[i] = _mix64(np.uint64(value))
            counts[i] = table[value]
            i += 1
    return fingerprints.view(np.int64), counts


# From this many rows on, rows of <= 32 bits are counted by sorting. The hash table (16 bytes a
# slot, twice as many slots as rows) costs 3-4 ns a row up to 8k rows but 13-15 ns from 32k rows
# on, while the radix sort's passes stream through memory (measured, all rows distinct: 32768
# rows 0.43 -> 0.17 ms, 131072 rows 2.0 -> 1.0 ms; below about 16k rows the table is faster).
SORTED_MIN_ROWS = 16384


@numba.njit(cache=True, nogil=True)
def count_sorted32(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    """``(fingerprints, counts)`` of one-word rows of at most 32 bits, by an LSD radix sort.

    Four passes of 8-bit digits (a pass whose digit is the same in every row is skipped), then
    equal neighbours are counted. Exact: the rows themselves are sorted, and the fingerprint
    of a one-word pattern is the SplitMix64 finaliser of the word, a bijection.
    """
    rows = words.shape[0]
    keys = np.empty(rows, dtype=np.uint32)
    spare = np.empty(rows, dtype=np.uint32)
    digits = np.zeros((4, 256), dtype=np.int64)
    for r in range(rows):
        word = np.uint32(words[r, 0])
        keys[r] = word
        digits[0, word & 255] += 1
        digits[1, (word >> 8) & 255] += 1
        digits[2, (word >> 16) & 255] += 1
        digits[3, word >> 24] += 1
    offsets = np.empty(256, dtype=np.int64)
    for d in range(4):
        if digits[d].max() == rows:
            continue
        total = 0
        for b in range(256):
            offsets[b] = total
            total += digits[d, b]
        shift = np.uint32(8 * d)
        for r in range(rows):
            word = keys[r]
            b = (word >> shift) & np.uint32(255)
            spare[offsets[b]] = word
            offsets[b] += 1
        keys, spare = spare, keys
    distinct = 0
    for r in range(rows):
        distinct += r == 0 or keys[r] != keys[r - 1]
    fingerprints = np.empty(distinct, dtype=np.uint64)
    counts = np.zeros(distinct, dtype=np.int64)
    i = -1
    for r in range(rows):
        if r == 0 or keys[r] != keys[r - 1]:
            i += 1
            fingerprints[i] = _mix64(np.uint64(keys[r]))
        counts[i] += 1
    return fingerprints.view(np.int64), counts


@numba.njit(cache=True, nogil=True)
def count_hashed(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:  # pragma: no cover
    """Exact histogram of packed rows keyed by fingerprint: ``(fingerprints, counts, verified)``.

    Fingerprints are ``patterns.fingerprint``'s (int64 bits). ``verified`` is False when two
    different rows share a fingerprint (only possible for more than one word per row). A slot is
    free while its count is 0; the table is at most half full.
    """
    rows, width = words.shape
    capacity = 16
    while capacity < 2 * rows:
        capacity *= 2
    mask = np.uint64(capacity - 1)
    keys = np.empty(capacity, dtype=np.uint64)
    counts = np.zeros(capacity, dtype=np.int64)
    first_row = np.empty(capacity if width > 1 else 0, dtype=np.int64)
    verified = True
    distinct = 0
    for r in range(rows):
        key = _mix64(np.uint64(words[r, 0]))
        for j in range(1, width):
            salt = _GOLDEN * np.uint64(j)
            key = _mix64(key ^ _mix64(np.uint64(words[r, j]) + salt))
        slot = key & mask
        while counts[slot] > 0 and keys[slot] != key:
            slot = (slot + np.uint64(1)) & mask
        if counts[slot] == 0:
            keys[slot] = key
            distinct += 1
            if width > 1:
                first_row[slot] = r
        elif width > 1:
            rep = first_row[slot]
            for j in range(width):
                if words[rep, j] != words[r, j]:
                    verified = False
        counts[slot] += 1
    fingerprints = np.empty(distinct, dtype=np.uint64)
    kept = np.empty(distinct, dtype=np.int64)
    i = 0
    for index in range(capacity):
        if counts[index] > 0:
            fingerprints[i] = keys[index]
            kept[i] = counts[index]
            i += 1
    return fingerprints.view(np.int64), kept, verified


# Counts below this go to the spectrum's dense histograms; the few above it are sorted instead.
_DENSE_COUNTS = 1024


@numba.njit(cache=True, nogil=True)
def sketch_and_spectrum(
    fingerprints: np.ndarray, counts: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """What ``summary.to_wire`` needs from a histogram: ``(kept, values, multiplicities)``.

    ``kept``: the indices of the ``k`` smallest unsigned ``fingerprints`` (all of them when there
    are at most ``k``), sorted by fingerprint. Fingerprints are well mixed, so the k smallest of n
    lie below about k/n of the 64-bit range: one pass gathers those below 2k/n of it (about 2k
    candidates; room is kept for 4k + 64) and only they are sorted. If fewer than k or more than
    that room turn up (fingerprints that are not uniform), every fingerprint is sorted: exact
    either way.

    ``values``/``multiplicities``: the count-of-counts, ascending (``multiplicities[i]`` patterns
    occurred ``values[i]`` times). Counts below ``_DENSE_COUNTS`` go to four interleaved
    histograms, which keep runs of equal counts (most patterns occur once) from serialising on
    one memory cell; the rare larger counts (at most rows / _DENSE_COUNTS of them) are sorted.
    """
    n = fingerprints.size
    if n <= k:
        kept = np.argsort(fingerprints)
    else:
        bound = np.uint64(0xFFFFFFFFFFFFFFFF)
        if 2 * k < n:
            bound = (bound // np.uint64(n)) * np.uint64(2 * k)
        room = min(n, 4 * k + 64)
        candidates = np.empty(room, dtype=np.int64)
        found = 0
        for i in range(n):
            if fingerprints[i] < bound:
                if found < room:
                    candidates[found] = i
                found += 1
        if k <= found <= room:
            chosen = candidates[:found]
            kept = chosen[np.argsort(fingerprints[chosen])[:k]]
        else:  # far from uniform: sort them all
            kept = np.argsort(fingerprints)[:k]
    largest = 0
    for i in range(n):
        largest = max(largest, counts[i])
    dense = min(largest + 1, _DENSE_COUNTS)
    by_count = np.zeros((4, dense), dtype=np.int64)
    large = 0
    for i in range(n):
        count = counts[i]
        if count < dense:
            by_count[i & 3, count] += 1
        else:
            large += 1
    total = by_count[0] + by_count[1] + by_count[2] + by_count[3]
    small_values = np.flatnonzero(total)
    big = np.empty(large, dtype=np.int64)
    j = 0
    for i in range(n if large else 0):
        if counts[i] >= dense:
            big[j] = counts[i]
            j += 1
    big.sort()
    runs = 0
    for j in range(large):
        runs += j == 0 or big[j] != big[j - 1]
    values = np.empty(small_values.size + runs, dtype=np.int64)
    multiplicities = np.empty(small_values.size + runs, dtype=np.int64)
    values[: small_values.size] = small_values
    multiplicities[: small_values.size] = total[small_values]
    at = small_values.size - 1
    for j in range(large):
        if j == 0 or big[j] != big[j - 1]:
            at += 1
            values[at] = big[j]
            multiplicities[at] = 0
        multiplicities[at] += 1
    return kept, values, multiplicities
