"""Exact activation-pattern counting on the device.

A pattern (one row's ``preactivation > 0`` over d units) is packed into ``W = ceil(d / 64)``
int64 words, then fingerprinted to 64 bits. For ``d <= 64`` the fingerprint is a bijection of the
packed word (SplitMix64's finaliser is invertible), so it cannot collide. For ``d > 64`` two
distinct patterns share a fingerprint with probability about 2^-64 per pair, i.e. at most
n^2 / 2^65 over n distinct patterns (3e-12 for a million rows); ``count_patterns`` checks every
group against its representative's words anyway and, on a collision, recounts on the words
themselves, so counts are exact always. This replaces the sources' fixed-size hash table
(Hartmann et al. 2021, Algorithm 1; thesis Algorithm 2), which merges colliding patterns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

_WORD_BITS = 64
_SIGN_BIT = -(2**63)


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


_bit_weights: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    weights = _bit_weights.get(device)
    if weights is None:
        powers = [1 << i for i in range(_WORD_BITS - 1)] + [_SIGN_BIT]
        weights = torch.tensor(powers, dtype=torch.int64, device=device)
        _bit_weights[device] = weights
    return weights


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean (rows, d) mask into int64 words (rows, ceil(d/64)); bit j of word w is unit 64w+j."""
    rows, units = mask.shape
    words = (units + _WORD_BITS - 1) // _WORD_BITS
    padded = units if units == words * _WORD_BITS else words * _WORD_BITS
    if padded != units:
        mask = torch.nn.functional.pad(mask, (0, padded - units))
    bits = mask.reshape(rows, words, _WORD_BITS).to(torch.int64)
    return (bits * _weights(mask.device)).sum(dim=-1)


def fingerprint(words: torch.Tensor) -> torch.Tensor:
    """64-bit fingerprint (int64 bits) of each packed row; a bijection when there is one word."""
    fp = mix64(words[:, 0])
    for j in range(1, words.shape[1]):
        fp = mix64(fp ^ mix64(words[:, j] + _GOLDEN * j))
    return fp


def to_unsigned(fp: int) -> int:
    """An int64 fingerprint as the unsigned integer the wire carries."""
    return fp % 2**64


@dataclass
class PatternCounts:
    """Exact pattern histogram of a set of rows: fingerprints (int64 bits, sorted) and counts."""

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


def empty_counts(device: torch.device | str = "cpu") -> PatternCounts:
    """The histogram of no rows."""
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return PatternCounts(empty, empty.clone())


def merge_counts(parts: list[PatternCounts]) -> PatternCounts:
    """Exact merge of several histograms."""
    if len(parts) == 1:
        return parts[0]
    fps = torch.cat([p.fingerprints for p in parts])
    counts = torch.cat([p.counts for p in parts])
    unique, inverse = torch.unique(fps, sorted=True, return_inverse=True)
    merged = torch.zeros(unique.numel(), dtype=torch.int64, device=fps.device)
    merged.scatter_add_(0, inverse, counts)
    return PatternCounts(unique, merged)


def count_patterns(mask: torch.Tensor) -> PatternCounts:
    """Exact histogram of the rows of a boolean (rows, d) mask."""
    if mask.shape[0] == 0:
        return empty_counts(mask.device)
    words = pack_bits(mask)
    fps = fingerprint(words)
    unique, inverse, counts = torch.unique(
        fps, sorted=True, return_inverse=True, return_counts=True
    )
    if words.shape[1] > 1 and not _groups_agree(words, inverse, unique.numel()):
        logger.warning("64-bit fingerprint collision among %d patterns; recounting", unique.numel())
        return _count_by_words(words)
    return PatternCounts(unique, counts)


def _groups_agree(words: torch.Tensor, inverse: torch.Tensor, groups: int) -> bool:
    """True when every row equals its group's representative row (no fingerprint collision)."""
    representative = torch.empty(groups, dtype=torch.int64, device=words.device)
    representative.scatter_(0, inverse, torch.arange(words.shape[0], device=words.device))
    return bool((words == words[representative[inverse]]).all())


def _count_by_words(words: torch.Tensor) -> PatternCounts:
    """Fallback exact count on the packed words; colliding patterns get distinct fingerprints
    by re-mixing with their rank, so no two distinct patterns ever share an entry."""
    unique_words, counts = torch.unique(words, dim=0, return_counts=True)
    fps = fingerprint(unique_words)
    order = torch.argsort(fps)
    fps, counts = fps[order], counts[order]
    duplicate = torch.zeros_like(fps, dtype=torch.bool)
    duplicate[1:] = fps[1:] == fps[:-1]
    if bool(duplicate.any()):
        fps = torch.where(duplicate, mix64(fps + torch.arange(fps.numel(), device=fps.device)), fps)
        order = torch.argsort(fps)
        fps, counts = fps[order], counts[order]
    return PatternCounts(fps, counts)
