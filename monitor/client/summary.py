"""Mergeable per-site pattern statistics, and their compaction into the wire ``SiteSummary``.

**What a summary holds and what it determines.** For one site over a set of rows:

- ``spectrum``, the count-of-counts {(c, m)}: m distinct patterns occurred c times. It gives
  distinct = sum m, n = sum c m, max_freq = max c / n and entropy
  H = -sum m (c/n) log2(c/n) exactly, and rel_entropy = H / min(d, log2 n) (thesis Eq. 3.10).
  Its length is at most the number of different counts, < sqrt(2 n).
- ``patterns``: every (fingerprint, count) when there are at most ``sketch_k`` distinct patterns
  (the exact-below-threshold rule: Jaccard and changes are then exact), else the bottom-k
  sample, the ``sketch_k`` smallest fingerprints with their exact counts. Fingerprints are a
  well-mixed hash of the pattern (``patterns``), so this is a uniform sample of the distinct
  patterns, the same pattern keeps its fingerprint at every step, and two measurements' samples
  combine into a uniform sample of their union (``monitor.sketch``).
- ``unit_on``: per unit, the rows in which it is on (dead: 0, always on: = rows); with labels,
  ``class_rows`` and ``class_unit_on`` per class.
- ``sumsq`` and ``max_abs``: the preactivations' sum of squares and largest magnitude over the
  finite values (RMS = sqrt(sumsq / (rows * units))), read in the same pass as the signs; the
  detectors use them as the site's scale (a batch of the wrong scale, weights blowing up).

**Sketch error.** ``monitor.sketch`` estimates weighted Jaccard by a ratio estimator over the
joint sample of m >= k patterns; its standard error is about sqrt((1 - m/N)/m) times the
coefficient of variation of the residuals. At the default k = 256, ``tests/client/
test_sketch_error.py`` checks |estimate - exact| <= 0.05 for the train-time and probe-set
measurements of a convolutional and a dense net, against exact values from the full histograms.

**Size.** At most ``4 + 2 * sketch_k + d + 2 |spectrum|`` integers per site-step. On the wire
the sampled fingerprints travel as base64 of their 8 bytes (``schema.PackedPatterns``), not as
20-digit decimals: for the 64-unit conv sites of ResNet-20 (8192 rows, all distinct) at k = 256 a
site-step is about 3.8 kB of JSON (2.5 kB gzip-compressed); ``benchmarks/overhead.py`` prints the
figures for every site width.

**Merging.** ``SiteStats`` holds the full exact histogram and only sums, so ``merge`` is exact
across micro-batches, gradient-accumulation steps and data-parallel ranks; the sketch is taken
once, after merging, in ``to_wire``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np
import torch

from monitor.client.kernel_loader import COUNT_SAVING, SCALE_SAVING, charge, kernels
from monitor.client.patterns import (
    PatternCounts,
    count_words,
    counts_from_table,
    empty_counts,
    merge_counts,
    pack_signs,
    pattern_table,
    unit_layout,
    unit_on_from_table,
    use_table,
)
from monitor.schema import SiteKind, SiteSummary

DEFAULT_SKETCH_K = 256


@dataclass
class SiteStats:
    """Exact statistics of one site over a set of rows: sums and counts only, so merging is exact.

    ``merge(a, b)`` equals the statistics of a's rows and b's rows together, for every field.
    """

    units: int
    counts: PatternCounts
    unit_on: torch.Tensor
    nonfinite_rows: int = 0
    class_rows: dict[int, int] = field(default_factory=dict)
    class_unit_on: dict[int, torch.Tensor] = field(default_factory=dict)
    sumsq: float = 0.0
    max_abs: float = 0.0
    # Scale-only statistics (``measure_scale``): no patterns were counted, ``counts`` is empty
    # and ``scale_rows`` holds the rows.
    scale_only: bool = False
    scale_rows: int = 0
    # On an accelerator (``measure_scale``): float64 (sum of squares, max |x|, non-finite rows)
    # still on the device, to be added to the three fields above by ``settle``, which brings
    # every site's back in one copy. None: nothing pending.
    pending: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        """Rows counted."""
        return self.scale_rows if self.scale_only else self.counts.rows

    def merge(self, other: SiteStats) -> SiteStats:
        """Statistics of both row sets together."""
        if other.units != self.units:
            raise ValueError(f"cannot merge sites of {self.units} and {other.units} units")
        class_rows = dict(self.class_rows)
        class_unit_on = {k: v.clone() for k, v in self.class_unit_on.items()}
        for label, rows in other.class_rows.items():
            class_rows[label] = class_rows.get(label, 0) + rows
            if label in class_unit_on:
                class_unit_on[label] += other.class_unit_on[label].to(class_unit_on[label].device)
            else:
                class_unit_on[label] = other.class_unit_on[label].clone()
        device = self.unit_on.device
        scale_only = self.scale_only or other.scale_only  # patterns of some rows were not counted
        return SiteStats(
            units=self.units,
            counts=empty_counts(device)
            if scale_only
            else merge_counts([self.counts, other.counts.to(device)]),
            unit_on=self.unit_on + other.unit_on.to(device),
            nonfinite_rows=self.nonfinite_rows + other.nonfinite_rows,
            class_rows=class_rows,
            class_unit_on=class_unit_on,
            sumsq=self.sumsq + other.sumsq,
            max_abs=max(self.max_abs, other.max_abs),
            scale_only=scale_only,
            scale_rows=self.rows + other.rows if scale_only else 0,
            pending=_merge_pending(self.pending, other.pending),
        )

    def to(self, device: torch.device | str) -> SiteStats:
        """The same statistics with every tensor on ``device``."""
        return SiteStats(
            units=self.units,
            counts=self.counts.to(device),
            unit_on=self.unit_on.to(device),
            nonfinite_rows=self.nonfinite_rows,
            class_rows=dict(self.class_rows),
            class_unit_on={k: v.to(device) for k, v in self.class_unit_on.items()},
            sumsq=self.sumsq,
            max_abs=self.max_abs,
            scale_only=self.scale_only,
            scale_rows=self.scale_rows,
            pending=None if self.pending is None else self.pending.to(device),
        )


def _merge_pending(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Two pending (sum of squares, max |x|, non-finite rows) combined on a's device."""
    if a is None or b is None:
        return a if b is None else b
    b = b.to(a.device)
    return torch.stack((a[0] + b[0], torch.maximum(a[1], b[1]), a[2] + b[2]))


def settle(stats: list[SiteStats]) -> None:
    """Add every pending scalar, and move every unit count, back to the CPU in one copy per device.

    An accelerator's sites (``_scale_on_device``) leave them on the device so that the forward
    never waits for it; the step's end calls this once, before the summaries are built (one wait
    for the device instead of two per site).
    """
    by_device: dict[torch.device, list[SiteStats]] = {}
    for site in stats:
        if site.pending is not None:
            by_device.setdefault(site.pending.device, []).append(site)
    for sites in by_device.values():
        scalars = torch.stack([site.pending for site in sites if site.pending is not None])
        units = [site.unit_on.numel() for site in sites]
        on = torch.cat([site.unit_on.to(scalars.device).reshape(-1) for site in sites])
        scalars_cpu, on_cpu = scalars.cpu().tolist(), on.cpu().split(units)
        for site, (sumsq, max_abs, nonfinite), unit_on in zip(
            sites, scalars_cpu, on_cpu, strict=True
        ):
            site.sumsq += sumsq
            site.max_abs = max(site.max_abs, max_abs)
            site.nonfinite_rows += int(nonfinite)
            site.unit_on = unit_on
            site.pending = None


def empty_stats(units: int, device: torch.device | str = "cpu") -> SiteStats:
    """Statistics of no rows."""
    return SiteStats(
        units=units,
        counts=empty_counts(device),
        unit_on=torch.zeros(units, dtype=torch.int64, device=device),
    )


def unit_dim_of(kind: SiteKind) -> int:
    """The axis that holds the units: channels (1) for conv sites, the last axis otherwise."""
    return 1 if kind == "conv" else -1


_byte_bits: dict[torch.device, torch.Tensor] = {}


def _bits_of_bytes(device: torch.device) -> torch.Tensor:
    """(256, 8) float64: bit k of byte value v."""
    bits = _byte_bits.get(device)
    if bits is None:
        values = torch.arange(256, device=device).unsqueeze(1)
        bits = ((values >> torch.arange(8, device=device)) & 1).to(torch.float64)
        _byte_bits[device] = bits
    return bits


def _unit_on_counts(
    row_bytes: torch.Tensor, units: int, row_class: torch.Tensor | None, classes: int
) -> torch.Tensor:
    """(classes, units) on-counts from a histogram of each byte position's values.

    A unit's on-count is the sum, over byte values with its bit set, of how often that value
    occurs at its byte position: a (positions, 256) x (256, 8) product, done in float64, which is
    exact for counts below 2^53.
    """
    nbytes = row_bytes.shape[1]
    index = row_bytes.to(torch.int64) + 256 * torch.arange(nbytes, device=row_bytes.device)
    if row_class is not None:
        index = index + (row_class * (256 * nbytes)).unsqueeze(1)
    hist = torch.bincount(index.reshape(-1), minlength=256 * nbytes * classes)
    on = hist.view(classes * nbytes, 256).to(torch.float64) @ _bits_of_bytes(row_bytes.device)
    return on.round().to(torch.int64).reshape(classes, nbytes * 8)[:, :units]


def _nonfinite_rows(x: torch.Tensor, unit_dim: int) -> int:
    """Rows with a NaN or infinite preactivation; one cheap min/max pass when there are none."""
    if x.numel() == 0 or not x.is_floating_point():
        return 0
    low, high = torch.aminmax(x)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return 0
    return int((~torch.isfinite(x)).any(dim=unit_dim % x.dim()).sum())


def measure(x: torch.Tensor, kind: SiteKind, labels: torch.Tensor | None = None) -> SiteStats:
    """Exact statistics of one activation input ``x``.

    ``x`` is dense (N, d), sequence (N, T, d) or conv (N, C, ...); ``labels`` (N,) adds per-class
    rows and on-counts (every row of a sample gets the sample's label). float32/float64 tensors
    on the CPU go through the fused kernels of ``cpu_kernels`` once they are loaded
    (``kernel_loader``), everything else through torch operations; both give the same
    statistics.
    """
    if x.dim() == 1:
        x = x.reshape(1, -1)
    unit_dim = unit_dim_of(kind)
    label_values: list[int] = []
    sample_class = None
    if labels is not None:
        labels = labels.to(x.device).reshape(-1)
        if labels.numel() != x.shape[0]:
            raise ValueError(f"{labels.numel()} labels for a batch of {x.shape[0]}")
        values, sample_class = torch.unique(labels, return_inverse=True)
        label_values = [int(v) for v in values.tolist()]
    kernel_input = x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES
    if kernel_input and kernels() is not None:
        stats, on = _measure_with_kernels(x, unit_dim, sample_class, len(label_values))
    else:
        began = time.perf_counter()
        stats, on = _measure_with_torch(x, unit_dim, sample_class, len(label_values))
        if kernel_input:  # what the kernels would have saved (see ``kernel_loader``)
            charge(time.perf_counter() - began, COUNT_SAVING)
    if sample_class is not None:
        rows_per_sample = stats.rows // max(x.shape[0], 1)
        per_class = torch.bincount(sample_class, minlength=len(label_values)) * rows_per_sample
        for i, label in enumerate(label_values):
            stats.class_rows[label] = int(per_class[i])
            stats.class_unit_on[label] = on[i]
    return stats


_KERNEL_DTYPES = (torch.float32, torch.float64)


def measure_scale(x: torch.Tensor, kind: SiteKind) -> SiteStats:
    """What the detectors read every step, without the patterns.

    Rows, per-unit on-counts, non-finite rows and the preactivation scale (sum of squares and
    max |x| of the finite values): the same values as ``measure`` for those fields (the tests
    compare them), at a fraction of its cost: no patterns are counted. On the CPU one compiled
    pass reads the values (``_scale_with_kernels``); until the kernels are loaded numpy reads
    them (``_scale_with_numpy``). On an accelerator the values stay there until ``settle``
    (``_scale_on_device``). Labels are not used.
    """
    if x.dim() == 1:
        x = x.reshape(1, -1)
    unit_dim = unit_dim_of(kind)
    # is_cpu: a tenth of device.type's cost
    kernel_input = x.is_cpu and x.dtype in _KERNEL_DTYPES
    if kernel_input and kernels() is not None:
        return _scale_with_kernels(x, unit_dim)
    if kernel_input and x.numel():
        began = time.perf_counter()
        stats = _scale_with_numpy(x.detach(), unit_dim)
        if stats is not None:
            charge(time.perf_counter() - began, SCALE_SAVING)
            return stats
    if not x.is_cpu and x.numel():
        return _scale_on_device(x.detach(), unit_dim)
    x3 = unit_layout(x, unit_dim)
    outer, units, inner = x3.shape
    sumsq, max_abs, nonfinite = _scale_and_nonfinite_with_torch(x, unit_dim)
    unit_on = (x3 > 0).sum(dim=(0, 2))
    # No rent: the kernels send a site with a non-finite value to these operations too
    return _scale_stats(units, unit_on, outer * inner, nonfinite, sumsq, max_abs)


def _scale_with_numpy(x: torch.Tensor, unit_dim: int) -> SiteStats | None:
    """``measure_scale`` of a finite float32/float64 CPU tensor, read by numpy (None if not finite).

    Before ``kernel_loader`` has loaded the kernels. numpy reads a site without torch's dispatch
    per operation: 31 us for a 32x128 dense site against 59 us for the torch operations, 137
    against 182 us for a 64x16x8x8 conv site (one thread, a 2-core machine; ``kernel_loader``
    compares them with the kernels). Everything runs on the calling thread. A site with a
    non-finite value (rare: the run is diverging) goes to the torch operations, which count its
    rows.
    """
    values = _cpu_values(x, unit_dim)
    if values.ndim == 2:
        rows, units = values.shape
        on_axes: int | tuple[int, int] = 0
    else:
        outer, units, inner = values.shape
        rows, on_axes = outer * inner, (0, 2)
    flat = values.reshape(-1)
    low, high = float(flat.min()), float(flat.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    sumsq = _sum_of_squares(flat)
    if values.ndim == 3 and values.shape[2] <= np.iinfo(np.uint16).max:
        # A (sample, unit) count over the inner axis is at most ``inner``: uint16 holds it, and
        # summing the bytes into uint16 first reads half the memory that int64 sums do
        positive = (values > 0).view(np.uint8)
        on = positive.sum(axis=2, dtype=np.uint16).sum(axis=0, dtype=np.int64)
    else:
        on = (values > 0).sum(axis=on_axes, dtype=np.int64)
    return _scale_stats(units, torch.from_numpy(on), rows, 0, sumsq, max(-low, high))


def _scale_on_device(x: torch.Tensor, unit_dim: int) -> SiteStats:
    """``measure_scale`` of a tensor on an accelerator, without waiting for the device.

    Reading a sum back as a Python number waits until the device has run everything queued
    before it, then leaves it idle while the CPU queues the next kernels: two such waits per
    site made ResNet-20's monitored step on an H200 cost 2x its plain step. Here every value
    stays on the device (``SiteStats.pending``, and the unit counts) until ``settle`` copies
    all sites' back at the step's end. The non-finite values are masked unconditionally (a
    branch on whether there are any would itself wait): a few more passes over the site, which
    cost the device microseconds. Any device torch runs on; the tests run it on CPU tensors.
    """
    x3 = unit_layout(x, unit_dim)
    outer, units, inner = x3.shape
    finite = torch.isfinite(x3)
    clean = torch.where(finite, x3, torch.zeros((), dtype=x3.dtype, device=x3.device))
    wide = clean.reshape(-1).to(torch.float64)  # float32 squares are exact in float64
    pending = torch.stack(
        (
            torch.dot(wide, wide),
            wide.abs().max(),
            (~finite).any(dim=1).sum().to(torch.float64),
        )
    )
    unit_on = (x3 > 0).sum(dim=(0, 2))
    stats = _scale_stats(units, unit_on, outer * inner, 0, 0.0, 0.0)
    stats.pending = pending
    return stats


# Values per float64 chunk in ``_sum_of_squares``: 1 MiB of float64, which stays in cache.
_SQUARES_CHUNK = 2**17


def _sum_of_squares(flat: np.ndarray) -> float:
    """sum(x * x) of a finite 1-D float32/float64 array, accumulated in float64.

    A float32 value's square is exact in float64, so the sum's error is float64 summation's.
    Up to ``_SQUARES_CHUNK`` values numpy squares them into a float64 array and sums it. A larger
    site (ResNet-20's stage-1 conv sites: 32x16x32x32 at the default 32 capture rows, 524,288
    values) is widened a chunk at a time into a float64 buffer that stays in cache and summed by
    torch's dot: for 128 rows (2M values) 0.8 ms against 3.1 ms for numpy's whole float64 array
    of 16 MiB, written and read back (one thread, 2026-12-04).
    Not numpy's dot: its BLAS runs on threads of its own, which spin on the host's core; torch's
    runs on torch's, which training uses anyway.
    """
    if flat.size <= _SQUARES_CHUNK:
        return float(np.square(flat, dtype=np.float64).sum())
    values = torch.from_numpy(flat)
    if values.dtype == torch.float64:
        return sum(float(torch.dot(chunk, chunk)) for chunk in values.split(_SQUARES_CHUNK))
    wide = torch.empty(_SQUARES_CHUNK, dtype=torch.float64)
    total = 0.0
    for chunk in values.split(_SQUARES_CHUNK):
        buffer = wide[: chunk.numel()]
        buffer.copy_(chunk)
        total += float(torch.dot(buffer, buffer))
    return total


def _scale_and_nonfinite_with_torch(x: torch.Tensor, unit_dim: int) -> tuple[float, float, int]:
    """(sum of squares, max |x|, non-finite rows), as the two functions named below give them.

    ``_scale_with_torch`` and ``_nonfinite_rows`` together read ``x`` four times; when every
    value is finite this reads it twice (the min/max pass gives max |x| too).
    """
    if x.numel() == 0 or not x.is_floating_point():
        return 0.0, 0.0, 0
    low, high = (float(v) for v in torch.aminmax(x))
    if math.isfinite(low) and math.isfinite(high):
        if x.is_cpu and x.dtype in _KERNEL_DTYPES:
            # 0.8 ms for a 128x16x32x32 site against 2.1 ms for vector_norm (one thread)
            sumsq = _sum_of_squares(x.detach().contiguous().reshape(-1).numpy())
        else:
            sumsq = float(torch.linalg.vector_norm(x.reshape(-1), dtype=torch.float64).square())
        return sumsq, max(abs(low), abs(high)), 0
    nonfinite = int((~torch.isfinite(x)).any(dim=unit_dim % x.dim()).sum())
    return (*_scale_with_torch(x, True), nonfinite)


def _scale_with_kernels(x: torch.Tensor, unit_dim: int) -> SiteStats:
    """``measure_scale`` of a float32/float64 CPU tensor (at least 2 dims).

    Rows of contiguous units (dense sites, and any layout whose inner size is 1) take one pass
    of ``count_on_rows``; conv and sequence layouts one of ``count_on_positions``. A site this
    path sees on every captured step costs a few microseconds of Python around the kernel, so
    a dense (rows, units) tensor is read as it is, without the (outer, units, 1) view.
    """
    cpu_kernels = _loaded_kernels()
    scale = np.zeros(2, dtype=np.float64)
    values = _cpu_values(x, unit_dim)
    if values.ndim == 2:
        rows, units = values.shape
        on = np.zeros((1, units), dtype=np.int64)
        nonfinite = cpu_kernels.count_on_rows(values, _no_classes(rows), on, scale)
    else:
        outer, units, inner = values.shape
        rows = outer * inner
        on = np.zeros((1, units), dtype=np.int64)
        if inner == 1:
            nonfinite = cpu_kernels.count_on_rows(values[:, :, 0], _no_classes(outer), on, scale)
        else:
            nonfinite = cpu_kernels.count_on_positions(values, _no_classes(outer), on, scale)
    sumsq, max_abs = float(scale[0]), float(scale[1])
    if nonfinite:  # the kernels' scale is over every value: take it over the finite ones
        nonfinite = _nonfinite_rows(x, unit_dim)
        sumsq, max_abs = _scale_with_torch(x, True)
    return _scale_stats(units, torch.from_numpy(on[0]), rows, nonfinite, sumsq, max_abs)


def _cpu_values(x: torch.Tensor, unit_dim: int) -> np.ndarray:
    """A CPU site's values as numpy reads them: (rows, units) or (outer, units, inner).

    A 2-D tensor is (rows, units) whatever the kind (the units are the last axis), read as it is:
    no (outer, units, 1) view to pay for on every step.
    """
    if x.dim() == 2:
        return x.contiguous().numpy()
    return unit_layout(x, unit_dim).contiguous().numpy()


def _no_classes(outer: int) -> np.ndarray:
    """Class 0 for every outer index: the kernels' class argument when no labels are counted."""
    return np.zeros(outer, dtype=np.int64)


# One empty histogram per device, shared by every scale-only ``SiteStats`` (allocating two
# empty tensors took a fifth of a small site's scale pass). Nothing changes a histogram in
# place: merges and copies build new ones.
_no_patterns: dict[torch.device, PatternCounts] = {}


def _scale_stats(
    units: int, unit_on: torch.Tensor, rows: int, nonfinite: int, sumsq: float, max_abs: float
) -> SiteStats:
    """Scale-only statistics: no patterns counted (an empty, shared histogram)."""
    counts = _no_patterns.get(unit_on.device)
    if counts is None:
        counts = _no_patterns[unit_on.device] = empty_counts(unit_on.device)
    return SiteStats(
        units=units,
        counts=counts,
        unit_on=unit_on,
        nonfinite_rows=nonfinite,
        sumsq=sumsq,
        max_abs=max_abs,
        scale_only=True,
        scale_rows=rows,
    )


def _measure_with_kernels(
    x: torch.Tensor, unit_dim: int, sample_class: torch.Tensor | None, classes: int
) -> tuple[SiteStats, torch.Tensor]:
    """``measure`` on the CPU: one fused pass for bits and on-counts, one exact count."""
    x3 = unit_layout(x, unit_dim).contiguous()
    outer, units, _inner = x3.shape
    if sample_class is None:
        outer_class = np.zeros(outer, dtype=np.int64)
    else:  # every outer index lies within one sample (the sample axis leads)
        outer_class = sample_class.repeat_interleave(outer // max(x.shape[0], 1)).numpy()
    on = np.zeros((max(classes, 1), units), dtype=np.int64)
    scale = np.zeros(2, dtype=np.float64)
    counts, nonfinite = _pack_and_count(x3.numpy(), outer_class, on, scale)
    sumsq, max_abs = float(scale[0]), float(scale[1])
    if nonfinite:  # the kernels' scale is over every value: take it over the finite ones
        sumsq, max_abs = _scale_with_torch(x, True)
    stats = SiteStats(
        units=units,
        counts=counts,
        unit_on=torch.from_numpy(on.sum(axis=0)),
        nonfinite_rows=_nonfinite_rows(x, unit_dim) if nonfinite else 0,
        sumsq=sumsq,
        max_abs=max_abs,
    )
    return stats, torch.from_numpy(on)


def _pack_and_count(
    values: np.ndarray, outer_class: np.ndarray, on: np.ndarray, scale: np.ndarray
) -> tuple[PatternCounts, int]:
    """Exact pattern counts of ``values`` (outer, units, inner) and its non-finite values.

    Adds each unit's on-rows to ``on[outer_class[o]]`` and the scale to ``scale`` (sum of
    squares, max magnitude; see ``cpu_kernels.pack_and_count_on``). Narrow conv-like sites are
    packed and counted in one kernel; dense rows (inner 1) are packed by numpy, whose
    ``packbits`` takes a byte of contiguous units at a time; the rest are packed into 64-bit
    words, then counted.
    """
    cpu_kernels = _loaded_kernels()
    outer, units, inner = values.shape
    rows = outer * inner
    narrow = units <= cpu_kernels.PACKED_TABLE_UNITS and rows < 2**31  # int32 table counts
    if inner > 1 and narrow and use_table(units, rows):
        fingerprints, counts, nonfinite = cpu_kernels.pack_and_count_table(
            values, outer_class, on, scale
        )
        return _pattern_counts(fingerprints, counts), nonfinite
    words = np.zeros((rows, (units + 63) // 64), dtype=np.int64)
    if inner == 1:
        dense = values[:, :, 0]
        bits = np.packbits(dense > 0, axis=-1, bitorder="little")
        words.view(np.uint8)[:, : bits.shape[1]] = bits  # little-endian: byte b is units 8b..
        nonfinite = cpu_kernels.count_on_rows(dense, outer_class, on, scale)
    else:
        nonfinite = cpu_kernels.pack_and_count_on(values, outer_class, words, on, scale)
    return _count_with_kernels(words, units), nonfinite


def _count_with_kernels(words: np.ndarray, units: int) -> PatternCounts:
    """Exact histogram of packed rows.

    A table of all patterns when that is small against the rows, a radix sort for many rows of
    <= 32 bits, else a hash table whose keys are verified against the words.
    """
    cpu_kernels = _loaded_kernels()
    rows = words.shape[0]
    if rows == 0:
        return empty_counts()
    if words.shape[1] == 1 and use_table(units, rows):
        return _pattern_counts(*cpu_kernels.count_table(words, units))
    if units <= 32 and rows >= cpu_kernels.SORTED_MIN_ROWS:
        return _pattern_counts(*cpu_kernels.count_sorted32(words))
    fingerprints, counts, verified = cpu_kernels.count_hashed(words)
    if not verified:
        return count_words(torch.from_numpy(words), units)  # logs the collision, recounts
    return _pattern_counts(fingerprints, counts)


def _loaded_kernels() -> ModuleType:
    """``cpu_kernels``, on the paths that ``kernels()`` let through."""
    module = kernels()
    assert module is not None
    return module


def sketch_and_spectrum_numpy(
    fingerprints: np.ndarray, counts: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``cpu_kernels.sketch_and_spectrum`` in numpy, before the kernels are loaded (same results).

    Fingerprints are distinct, so the order of the ``k`` smallest is unique. Partitioning before
    sorting, and tallying the counts by ``bincount`` rather than sorting them, took a 56,615-
    pattern site (ResNet-20's stage-1 conv site at 128 rows) from 3.3 to 0.6 ms (one thread,
    2026-12-04).
    """
    if fingerprints.size > k:
        smallest = np.argpartition(fingerprints, k)[:k]
        kept = smallest[np.argsort(fingerprints[smallest])]
    else:
        kept = np.argsort(fingerprints)
    if counts.size and int(counts.max()) <= _TALLY_FACTOR * counts.size:
        tally = np.bincount(counts)
        values = np.flatnonzero(tally)
        return kept, values.astype(np.int64), tally[values].astype(np.int64)
    # A few patterns hold most rows: a tally as long as the largest count would be mostly zeros
    values, multiplicities = np.unique(counts, return_counts=True)
    return kept, values.astype(np.int64), multiplicities.astype(np.int64)


# ``sketch_and_spectrum_numpy`` tallies counts with ``bincount`` when the largest count is at
# most this many times the number of patterns (the tally's length against the data's).
_TALLY_FACTOR = 16


def _pattern_counts(fingerprints: np.ndarray, counts: np.ndarray) -> PatternCounts:
    """A kernel's (fingerprints, counts) arrays as ``PatternCounts``, sharing their memory."""
    return PatternCounts(torch.from_numpy(fingerprints), torch.from_numpy(counts))


def _measure_with_torch(
    x: torch.Tensor, unit_dim: int, sample_class: torch.Tensor | None, classes: int
) -> tuple[SiteStats, torch.Tensor]:
    """``measure`` with torch operations (any device and dtype)."""
    units = x.shape[unit_dim]
    row_bytes, words = pack_signs(x, unit_dim)
    if x.is_floating_point():  # one min/max pass gives the non-finite rows and max |x|
        sumsq, max_abs, nonfinite = _scale_and_nonfinite_with_torch(x, unit_dim)
    else:
        (sumsq, max_abs), nonfinite = _scale_with_torch(x, False), 0
    rows = words.shape[0]
    row_class = None
    if sample_class is not None:
        row_class = sample_class.repeat_interleave(rows // max(x.shape[0], 1))
    if row_class is None and words.shape[1] == 1 and use_table(units, rows):
        table = pattern_table(words[:, 0], units)  # small d: one table gives counts and on-counts
        counts, unit_on = counts_from_table(table), unit_on_from_table(table, units)
        on = unit_on.unsqueeze(0)
    else:
        on = _unit_on_counts(row_bytes, units, row_class, max(classes, 1))
        counts, unit_on = count_words(words, units), on.sum(dim=0)
    stats = SiteStats(
        units=units,
        counts=counts,
        unit_on=unit_on,
        nonfinite_rows=nonfinite,
        sumsq=sumsq,
        max_abs=max_abs,
    )
    return stats, on


def _scale_with_torch(x: torch.Tensor, nonfinite: bool) -> tuple[float, float]:
    """Sum of squares (in float64) and largest magnitude of ``x``'s finite values."""
    if x.numel() == 0:
        return 0.0, 0.0
    if nonfinite:
        x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    flat = x.reshape(-1)
    sumsq = torch.linalg.vector_norm(flat, dtype=torch.float64).square()
    return float(sumsq), float(flat.abs().max())


def to_wire(name: str, stats: SiteStats, sketch_k: int = DEFAULT_SKETCH_K) -> SiteSummary:
    """Compact statistics into a wire summary.

    The count-of-counts spectrum is always exact. ``patterns`` lists every (fingerprint, count)
    when there are at most ``sketch_k`` distinct patterns, else the ``sketch_k`` smallest
    fingerprints (unsigned order); either way sorted by unsigned fingerprint. One compiled pass
    (``cpu_kernels.sketch_and_spectrum``) selects them and counts the spectrum.
    """
    if stats.pending is not None:  # the step's end settles all sites at once; this is a fallback
        settle([stats])
    spectrum: list[tuple[int, int]] = []
    patterns: list[tuple[int, int]] = []
    rows, distinct, exact = stats.rows, 0, True
    if not stats.scale_only:  # scale-only statistics counted no patterns
        fingerprints = stats.counts.fingerprints.cpu().numpy().view(np.uint64)
        counts = stats.counts.counts.cpu().numpy()
        rows, distinct = int(counts.sum()), int(counts.size)
        exact = distinct <= sketch_k
        cpu_kernels = kernels()
        if cpu_kernels is None:
            began = time.perf_counter()
            kept, values, multiplicities = sketch_and_spectrum_numpy(fingerprints, counts, sketch_k)
            charge(time.perf_counter() - began, COUNT_SAVING)
        else:
            kept, values, multiplicities = cpu_kernels.sketch_and_spectrum(
                fingerprints, counts, sketch_k
            )
        spectrum = list(zip(values.tolist(), multiplicities.tolist(), strict=True))
        patterns = list(zip(fingerprints[kept].tolist(), counts[kept].tolist(), strict=True))
    # Built from our own exact counts, so pydantic's validation (a tenth of a millisecond per
    # site, every step) is skipped here; the service validates what it receives, and the tests
    # validate what this returns.
    summary = SiteSummary.trusted(
        site=name,
        rows=rows,
        distinct=distinct,
        spectrum=spectrum,
        patterns=patterns,
        patterns_exact=exact,
        sketch_k=None if exact else sketch_k,
        unit_on=stats.unit_on.tolist(),
        nonfinite_rows=stats.nonfinite_rows,
        class_rows=None,
        class_unit_on=None,
        sumsq=stats.sumsq,
        max_abs=stats.max_abs,
        scale_only=stats.scale_only,
    )
    if stats.class_rows and not stats.scale_only:
        summary.class_rows = {str(k): v for k, v in sorted(stats.class_rows.items())}
        summary.class_unit_on = {str(k): v.tolist() for k, v in sorted(stats.class_unit_on.items())}
    return summary
