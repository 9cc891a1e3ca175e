"""Exact activation-pattern counting on the device: sign bits packed, fingerprinted, counted.

**Packing.** ``preactivation > 0`` is taken on the tensor as it comes (no permute of the floats);
the unit axis is folded into bytes (8 units per byte, one ``uint8`` multiply-add), only the small
byte tensor is moved so that a row's bytes are contiguous, and ``W = ceil(d / 64)`` little-endian
int64 words per row are a free ``view`` of those bytes: bit j of word w is unit 64w + j.

**Fingerprint.** A pattern's 64-bit fingerprint is the SplitMix64 finaliser of its word (d <= 64),
chained over the words for d > 64 (``fingerprint``). For d <= 64 this is a bijection of the packed
word, so two distinct patterns never share a fingerprint. For d > 64 a pair of distinct patterns
shares one with probability about 2^-64, so among n distinct patterns a collision has probability
at most n^2 / 2^65 (3e-8 for a million patterns, 3e-6 for ten million). Within one measurement
even that cannot corrupt a count: ``count_words`` checks every fingerprint group against its
representative's words and, on a collision, recounts on the words themselves and gives the
colliding patterns separate fingerprints. Between two measurements (Jaccard, changes), where only
fingerprints are compared, the same n^2 / 2^65 bound over the union of their patterns applies.

**Counting.** Distinct words are counted exactly: by ``bincount`` over all 2^d values when d is
small (d <= 20 and 2^d <= 4 x rows), else by sorting (``torch.unique``). There is no fixed-size
table and no modulo, unlike the sources (Hartmann et al. 2021, Algorithm 1; thesis Algorithm 2,
whose ``hash % hashlist_size`` merges colliding patterns; see ``benchmarks/reference_counting.py``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_WORD_BITS = 64
_SIGN_BIT = -(2**63)
# bincount over all 2^d patterns when d is at most this and 2^d <= _DENSE_FACTOR * rows.
_DENSE_MAX_BITS = 20
_DENSE_FACTOR = 4


def _as_int64(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - 2**64 if value >= 2**63 else value


_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)
_GOLDEN = _as_int64(0x9E3779B97F4A7C15)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 values."""
    return (x >> bits) & ((1 << (_WORD_BITS - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors: a bijection of 64-bit values (wrapping arithmetic)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Reference packing of a boolean (rows, d) mask into int64 words (rows, ceil(d/64)).

    Plain arithmetic: bit j of word w is unit 64w + j. ``pack_signs`` gives the same words faster.
    """
    rows, units = mask.shape
    words = (units + _WORD_BITS - 1) // _WORD_BITS
    if units != words * _WORD_BITS:
        mask = torch.nn.functional.pad(mask, (0, words * _WORD_BITS - units))
    powers = [1 << i for i in range(_WORD_BITS - 1)] + [_SIGN_BIT]
    weights = torch.tensor(powers, dtype=torch.int64, device=mask.device)
    return (mask.reshape(rows, words, _WORD_BITS).to(torch.int64) * weights).sum(dim=-1)


_byte_weights: dict[torch.device, torch.Tensor] = {}


def _weights8(device: torch.device) -> torch.Tensor:
    weights = _byte_weights.get(device)
    if weights is None:
        weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
        _byte_weights[device] = weights
    return weights


def unit_layout(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """``x`` as (outer, units, inner), a view where the memory allows.

    Row ``o * inner + p`` is ``[o, :, p]``: rows in sample-major order (channels-last conv inputs
    read as (N*H*W, C, 1)).
    """
    unit_dim = unit_dim % x.dim()
    if unit_dim == 1 and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x, unit_dim = x.permute(0, 2, 3, 1), 3  # a free view with the same row order
    outer = 1
    for size in x.shape[:unit_dim]:
        outer *= size
    inner = 1
    for size in x.shape[unit_dim + 1 :]:
        inner *= size
    return x.reshape(outer, x.shape[unit_dim], inner)


def pack_signs(x: torch.Tensor, unit_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack ``x > 0`` along ``unit_dim`` (1 for conv, -1 / last for dense and sequence sites).

    Returns ``(row_bytes, words)``: ``row_bytes`` (rows, ceil(d/8)) uint8, byte b holding units
    8b..8b+7, and ``words`` (rows, ceil(d/64)) int64 as ``pack_bits`` would give. Rows are ordered
    by the other axes in their original order (sample-major).
    """
    x3 = unit_layout(x, unit_dim)
    outer, units, inner = x3.shape
    nbytes = (units + 7) // 8
    positive = x3 > 0
    if units != nbytes * 8:  # pad the unit axis to whole bytes with "off"
        padded_mask = torch.zeros(outer, nbytes * 8, inner, dtype=torch.bool, device=x.device)
        padded_mask[:, :units] = positive
        positive = padded_mask
    weights = _weights8(x.device).view(1, 1, 8, 1)
    packed = (positive.view(torch.uint8).view(outer, nbytes, 8, inner) * weights).sum(
        dim=2, dtype=torch.uint8
    )
    words = (nbytes + 7) // 8
    rows = outer * inner
    # one copy puts each row's bytes side by side, zero-padded to whole int64 words
    if nbytes == words * 8:
        buffer = torch.empty(outer, inner, words * 8, dtype=torch.uint8, device=x.device)
    else:
        buffer = torch.zeros(outer, inner, words * 8, dtype=torch.uint8, device=x.device)
    buffer[:, :, :nbytes] = packed.transpose(1, 2)
    flat = buffer.view(rows, words * 8)
    return flat[:, :nbytes], _bytes_to_words(flat)


def _bytes_to_words(padded: torch.Tensor) -> torch.Tensor:
    """View (rows, 8W) uint8 as (rows, W) little-endian int64 words."""
    if sys.byteorder == "little":
        return padded.view(torch.int64)
    shifts = torch.arange(8, device=padded.device, dtype=torch.int64) * 8
    grouped = padded.reshape(padded.shape[0], -1, 8).to(torch.int64) << shifts
    return grouped.sum(dim=-1)


def fingerprint(words: torch.Tensor) -> torch.Tensor:
    """64-bit fingerprint (int64 bits) of each packed row; a bijection when there is one word."""
    fp = mix64(words[:, 0])
    for j in range(1, words.shape[1]):
        fp = mix64(fp ^ mix64(words[:, j] + _as_int64(_GOLDEN * j % 2**64)))
    return fp


def to_unsigned(fp: int) -> int:
    """An int64 fingerprint as the unsigned integer the wire carries."""
    return fp % 2**64


@dataclass
class PatternCounts:
    """Exact pattern histogram of a set of rows.

    ``fingerprints`` (int64 bits, no two equal, in no particular order) and their ``counts``.
    """

    fingerprints: torch.Tensor
    counts: torch.Tensor

    @property
    def rows(self) -> int:
        """Number of rows counted."""
        return int(self.counts.sum())

    @property
    def distinct(self) -> int:
        """Number of distinct patterns."""
        return int(self.counts.numel())

    def merge(self, other: PatternCounts) -> PatternCounts:
        """Histogram of the union of both row sets (exact: counts of equal patterns add)."""
        return merge_counts([self, other])

    def to(self, device: torch.device | str) -> PatternCounts:
        """The same histogram on another device."""
        return PatternCounts(self.fingerprints.to(device), self.counts.to(device))

    def as_dict(self) -> dict[int, int]:
        """``{unsigned fingerprint: count}`` (for tests and small histograms)."""
        fps = self.fingerprints.tolist()
        return {to_unsigned(fp): c for fp, c in zip(fps, self.counts.tolist(), strict=True)}


def empty_counts(device: torch.device | str = "cpu") -> PatternCounts:
    """The histogram of no rows."""
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return PatternCounts(empty, empty.clone())


def merge_counts(parts: list[PatternCounts]) -> PatternCounts:
    """Exact merge of several histograms: counts of equal fingerprints add."""
    parts = [p for p in parts if p.counts.numel()] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    fps = torch.cat([p.fingerprints for p in parts])
    counts = torch.cat([p.counts for p in parts])
    unique, inverse = torch.unique(fps, return_inverse=True)
    merged = torch.zeros(unique.numel(), dtype=torch.int64, device=fps.device)
    merged.scatter_add_(0, inverse, counts)
    return PatternCounts(unique, merged)


def count_patterns(mask: torch.Tensor) -> PatternCounts:
    """Exact histogram of the rows of a boolean (rows, d) mask."""
    if mask.shape[0] == 0:
        return empty_counts(mask.device)
    _, words = pack_signs(mask, unit_dim=1)
    return count_words(words, mask.shape[1])


def use_table(units: int, rows: int) -> bool:
    """Whether ``rows`` patterns of ``units`` bits are counted in a table of all 2^units values."""
    return units <= _DENSE_MAX_BITS and (1 << units) <= _DENSE_FACTOR * rows


def pattern_table(values: torch.Tensor, units: int) -> torch.Tensor:
    """Occurrences of every one of the 2^units patterns, indexed by the packed word."""
    return torch.bincount(values, minlength=1 << units)


def counts_from_table(table: torch.Tensor) -> PatternCounts:
    """The histogram of the patterns that occur in a ``pattern_table``."""
    unique = torch.nonzero(table).squeeze(1)
    return PatternCounts(mix64(unique), table[unique])


def unit_on_from_table(table: torch.Tensor, units: int) -> torch.Tensor:
    """Per-unit on-counts from a ``pattern_table``: unit j is on in the values with bit j set."""
    return torch.stack([table.view(-1, 2, 1 << j)[:, 1].sum() for j in range(units)])


def count_words(words: torch.Tensor, units: int) -> PatternCounts:
    """Exact histogram of packed rows (rows, W) of ``units``-bit patterns."""
    rows = words.shape[0]
    if rows == 0:
        return empty_counts(words.device)
    if words.shape[1] == 1:
        values = words[:, 0]
        if use_table(units, rows):
            return counts_from_table(pattern_table(values, units))
        else:
            unique, counts = torch.unique(values, return_counts=True)
        return PatternCounts(mix64(unique), counts)
    fps = fingerprint(words)
    unique, inverse, counts = torch.unique(fps, return_inverse=True, return_counts=True)
    if not _groups_agree(words, inverse, unique.numel()):
        logger.warning("64-bit fingerprint collision among %d patterns; recounting", unique.numel())
        return _count_by_words(words)
    return PatternCounts(unique, counts)


def _groups_agree(words: torch.Tensor, inverse: torch.Tensor, groups: int) -> bool:
    """True when every row equals its group's representative row (no fingerprint collision)."""
    representative = torch.empty(groups, dtype=torch.int64, device=words.device)
    representative.scatter_(0, inverse, torch.arange(words.shape[0], device=words.device))
    return bool((words == words[representative[inverse]]).all())


def _count_by_words(words: torch.Tensor) -> PatternCounts:
    """Fallback exact count on the packed words.

    Patterns whose fingerprints collide get distinct fingerprints by re-mixing with their rank,
    so no two distinct patterns ever share an entry.
    """
    unique_words, counts = torch.unique(words, dim=0, return_counts=True)
    fps = fingerprint(unique_words)
    order = torch.argsort(fps)
    fps, counts = fps[order], counts[order]
    duplicate = torch.zeros_like(fps, dtype=torch.bool)
    duplicate[1:] = fps[1:] == fps[:-1]
    while bool(duplicate.any()):
        ranks = torch.arange(fps.numel(), device=fps.device)
        fps = torch.where(duplicate, mix64(fps + ranks), fps)
        order = torch.argsort(fps)
        fps, counts = fps[order], counts[order]
        duplicate = torch.zeros_like(fps, dtype=torch.bool)
        duplicate[1:] = fps[1:] == fps[:-1]
    return PatternCounts(fps, counts)
