"""Scale of a training batch's inputs: RMS and max |x| of the first floating tensor argument."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch

logger = logging.getLogger(__name__)

RMS = "input/rms"
MAX_ABS = "input/max_abs"


def first_floating(args: Any, kwargs: Mapping[str, Any] | None = None) -> torch.Tensor | None:
    """The first floating-point tensor among a forward's positional, then keyword arguments."""
    for value in (*(args or ()), *(kwargs or {}).values()):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
    return None


def batch_sums(x: torch.Tensor, rows: int | None) -> torch.Tensor:
    """(count, sum of squares, max |x|) of the first ``rows`` rows (all with None), float64.

    The result stays on ``x``'s device: nothing here waits for an accelerator. A 0-d or empty
    tensor has count 0.
    """
    with torch.no_grad():
        x = x.detach()
        if rows is not None and x.dim() > 1 and x.shape[0] > rows:
            x = x[:rows]
        if x.numel() == 0:
            return torch.zeros(3, dtype=torch.float64, device=x.device)
        flat = x.reshape(-1)
        if flat.element_size() < 4:  # half precision: a sum of squares overflows float16
            flat = flat.float()
        sumsq = torch.dot(flat, flat).to(torch.float64)
        top = flat.abs().max().to(torch.float64)
        count = torch.tensor(float(flat.numel()), dtype=torch.float64, device=x.device)
        return torch.stack([count, sumsq, top])


class InputStats:
    """Sums of the inputs of the training forwards of one step, merged over micro-batches.

    Sums and a maximum only (STYLE.md 4): ``add`` of two batches equals ``add`` of them together.
    ``take`` turns them into the step's scalars, RMS = sqrt(sumsq / count) and max |x|, and
    starts the next step empty. Nothing here raises into the training forward.
    """

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None
        self._failed = False  # logged once: a failure repeats at every step

    def add(self, args: Any, kwargs: Mapping[str, Any] | None, rows: int | None) -> None:
        """Count the first floating tensor argument's first ``rows`` rows (if any)."""
        if self._failed:
            return
        try:
            x = first_floating(args, kwargs)
            if x is None:
                return
            sums = batch_sums(x, rows)
            if self._sums is None:
                self._sums = sums
            else:
                merged = self._sums.to(sums.device)
                self._sums = torch.stack(
                    [merged[0] + sums[0], merged[1] + sums[1], torch.maximum(merged[2], sums[2])]
                )
        except Exception:
            self._failed = True
            logger.exception("apmon cannot measure the forward's inputs; it stops trying")

    def take(self) -> dict[str, float]:
        """``input/rms`` and ``input/max_abs`` of the step (finite ones only); then reset."""
        sums, self._sums = self._sums, None
        if sums is None:
            return {}
        count, sumsq, top = sums.tolist()
        if count <= 0:
            return {}
        values = {RMS: math.sqrt(sumsq / count), MAX_ABS: top}
        return {k: v for k, v in values.items() if math.isfinite(v)}
