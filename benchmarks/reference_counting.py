"""The sources' pattern counting, reproduced as the reference: a multiply-xor hash, modulo a table.

Thesis (Hartmann 2025) Section 2.2.3, Algorithm 1: the boolean pattern is reinterpreted as
int64 words A_j, and ``h = offset; h = (A_j * Q) XOR (h * P)`` for each word, with
offset = 1610612741, P = 805306457, Q = 402653189 (wrapping int64 arithmetic). Algorithm 2
(``get_hist_torch``; Hartmann et al. 2021, Algorithm 1): ``key = h % hashlist_size`` and
``counts.index_add_(0, key, ones)`` into a fixed table, so patterns whose keys agree are merged.
"""

from __future__ import annotations

import torch

OFFSET = 1610612741
P = 805306457
Q = 402653189
DEFAULT_TABLE = 30000  # Algorithm 2's default hashlist_size


def pack_words(mask: torch.Tensor) -> torch.Tensor:
    """Reinterpret a boolean (n, d) mask as int64 words (n, ceil(d/64)): bit j of word w is unit
    64w + j (the sources' ``reinterpret(A, int64)``)."""
    n, d = mask.shape
    words = (d + 63) // 64
    if d != words * 64:
        mask = torch.nn.functional.pad(mask, (0, words * 64 - d))
    weights = torch.tensor(
        [1 << i for i in range(63)] + [-(2**63)], dtype=torch.int64, device=mask.device
    )
    return (mask.reshape(n, words, 64).to(torch.int64) * weights).sum(dim=-1)


def source_hash(words: torch.Tensor) -> torch.Tensor:
    """Thesis Algorithm 1 on packed words (n, W) -> (n,) int64."""
    h = torch.full((words.shape[0],), OFFSET, dtype=torch.int64, device=words.device)
    for j in range(words.shape[1]):
        h = (words[:, j] * Q) ^ (h * P)
    return h


def source_hash_int(words: list[int]) -> int:
    """The same hash on Python ints (unsigned 64-bit), to construct collisions."""
    mask = 2**64 - 1
    h = OFFSET
    for w in words:
        h = ((w * Q) & mask) ^ ((h * P) & mask)
    return h


def source_count(mask: torch.Tensor, table_size: int = DEFAULT_TABLE) -> torch.Tensor:
    """Thesis Algorithm 2: the fixed-size table of counts (colliding patterns share a slot)."""
    counts = torch.zeros(table_size, dtype=torch.int64, device=mask.device)
    key = source_hash(pack_words(mask)) % table_size
    counts.index_add_(0, key, torch.ones_like(key))
    return counts


def source_distinct(mask: torch.Tensor, table_size: int = DEFAULT_TABLE) -> int:
    """Distinct patterns as the sources count them: occupied table slots."""
    return int((source_count(mask, table_size) > 0).sum())
