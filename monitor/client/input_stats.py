"""Scale of a training batch's inputs: RMS and max |x| of the first floating tensor argument."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

RMS = "input/rms"
MAX_ABS = "input/max_abs"


def first_floating(args: Any, kwargs: Mapping[str, Any] | None = None) -> torch.Tensor | None:
    """The first floating-point tensor among a forward's positional, then keyword arguments."""
    for value in (*(args or ()), *(kwargs or {}).values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


Extremes = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # sqrt(sum of squares), min, max


def batch_extremes(x: torch.Tensor, rows: int | None) -> tuple[int, Extremes | None]:
    """(count, (sqrt(sum of squares), min, max)) of the first ``rows`` rows (all: None).

    The three 0-dim tensors stay on ``x``'s device (nothing here waits for an accelerator);
    None when the batch is empty. Two passes over the rows: a norm and a min-max. This runs at
    every captured step, where each torch call costs microseconds: ``x`` is detached (no
    ``no_grad`` block needed), a contiguous batch is reduced as it is (the same sums as its
    flattened view), and the values are not stacked into one tensor.
    """
    x = x.detach()
    if rows is not None and x.dim() > 1 and x.shape[0] > rows:
        x = x[:rows]
    count = x.numel()
    if count == 0:
        return 0, None
    if not x.is_contiguous():
        x = x.reshape(-1)
    if x.element_size() < 4:  # half precision: the norm of a large batch overflows float16
        x = x.float()
    low, high = torch.aminmax(x)
    return count, (torch.linalg.vector_norm(x), low, high)


InputSums = tuple[int, float, float]  # values counted, sum of squares, max |x|


class InputStats:
    """The inputs of the training forwards of one step, merged over micro-batches.

    Kept per forward as (count, norm, min, max) until ``take``, which adds the counts and the
    squared norms and keeps max |x| = max(-min, max) (sums and extremes only, STYLE.md 4: two
    micro-batches give what their concatenation gives; ``gather_ranks`` merges ranks the same
    way; ``as_scalars`` makes the step's numbers). Nothing here raises into the training forward.

    Cost per captured step (``python benchmarks/input_stats_cost.py``, one CPU thread, a loaded
    2-core box): 15-34 us on a 64x1x8x8 batch, 40-65 us on a 128x3072 batch (0.2-0.6% of the
    plain training step of the digits CNN and the MLP 3072-512x3 measured beside them).
    """

    def __init__(self) -> None:
        self._parts: list[tuple[int, Extremes]] = []
        self._failed = False  # logged once: a failure repeats at every step

    def add(self, args: Any, kwargs: Mapping[str, Any] | None, rows: int | None) -> None:
        """Count the first floating tensor argument's first ``rows`` rows (if any)."""
        if self._failed:
            return
        try:
            x = first_floating(args, kwargs)
            if x is None:
                return
            count, extremes = batch_extremes(x, rows)
            if extremes is not None:
                self._parts.append((count, extremes))
        except Exception:
            self._failed = True
            logger.exception("apmon cannot measure the forward's inputs; it stops trying")

    def take(self) -> InputSums:
        """The step's (count, sum of squares, max |x|); then start the next step empty.

        max |x| is NaN if any input was not finite.
        """
        parts, self._parts = self._parts, []
        count, sumsq, top = 0, 0.0, 0.0
        for n, (norm_t, low_t, high_t) in parts:
            norm, low, high = float(norm_t), float(low_t), float(high_t)
            count, sumsq = count + n, sumsq + norm * norm
            top = max(top, -low, high) if math.isfinite(low + high) else math.nan
        return count, sumsq, top


def gather_ranks(sums: InputSums, group: Any = None) -> InputSums:
    """Every rank's sums added (maxima kept); without ``torch.distributed``, ``sums``.

    A collective, called where ``merge_ranks`` gathers the site statistics.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, sums, group=group)
    count, sumsq, top = 0, 0.0, 0.0
    for n, squares, largest in gathered:
        count, sumsq = count + n, sumsq + squares
        top = max(top, largest) if math.isfinite(largest) else math.nan
    return count, sumsq, top


def as_scalars(sums: InputSums) -> dict[str, float]:
    """``input/rms`` = sqrt(sum of squares / count) and ``input/max_abs`` of ``sums``.

    None when nothing was counted or an input was not finite (the wire refuses non-finite
    scalars).
    """
    count, sumsq, top = sums
    if count == 0 or not math.isfinite(sumsq + top):
        return {}
    return {RMS: math.sqrt(sumsq / count), MAX_ABS: top}
