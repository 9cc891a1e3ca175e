"""How often a captured step gets full pattern statistics, so that capture fits a cost budget.

Every captured step gets the detectors' statistics (per-unit on-counts, preactivation scale,
non-finite rows: ``summary.measure_scale``), which cost little. Counting the patterns
(``summary.measure``: packing, exact counting, the wire's spectrum and sketch) costs a fixed
tenth of a millisecond or more per site, which is a large share of a small model's step. So
the monitor measures its own time on the training thread per step, and ``CaptureBudget`` gives
full statistics to every ``stride``-th step only, the stride being the smallest power of two
that keeps the monitor's average cost within ``fraction`` of the plain step.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# The monitor's share of a plain step that ``watch()`` spends on capture by default. The whole
# run's cost (issue "What a user pays") must also hold the APT probes (about 2% of a ResNet-20
# step at a steady rate), the first probe and the host beside training within 10%. ResNet-20's
# own time on a 2-core machine, probes off: 21.6 ms a step at 0.05 (patterns every 2nd step),
# 13.8 ms at 0.03 (every 8th; ``benchmarks/budget_own.py``). The detectors read only the
# scale statistics, which every step has.
DEFAULT_CAPTURE_BUDGET = 0.03
MAX_STRIDE = 64
ADJUST_EVERY = 16  # steps between re-estimates
_SMOOTHING = 0.2  # weight of a new step in the running means


class CaptureBudget:
    """Decides which captured steps count patterns: the first, then ``step % stride == 0``.

    ``note(full, own, wall)`` reports a finished step: whether it counted patterns, the seconds
    of the monitor's own work on the training thread in it, and its wall time. The stride
    becomes the smallest power of two k (at most ``MAX_STRIDE``) with
    (c_full + (k - 1) c_scale) / k <= fraction x plain, where c_full and c_scale are the running
    mean costs of the two kinds of step and plain = wall - own: first as soon as one step of
    each kind was measured, then every ``ADJUST_EVERY`` steps. It starts at ``MAX_STRIDE``
    (the first measured step counts patterns, the next the scale only), so that a large model
    does not pay for patterns on every one of its first steps before the budget knows their
    cost (ResNet-20's first 16 steps took seconds that way). ``fraction`` None: every captured
    step counts patterns.
    """

    def __init__(self, fraction: float | None = DEFAULT_CAPTURE_BUDGET) -> None:
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"capture_budget must be in (0, 1] or None, got {fraction}")
        self.fraction = fraction
        self.stride = 1 if fraction is None else MAX_STRIDE
        self.full_steps = 0
        self.scale_steps = 0
        self._cost_full: float | None = None
        self._cost_scale: float | None = None
        self._plain: float | None = None
        self._since_adjust = 0

    def full(self, step: int) -> bool:
        """Whether this captured step counts patterns.

        Until one such step was measured every one does (whatever its number: a resumed run;
        the monitor cannot time its first step), so that the first estimate has its cost.
        """
        return self.full_steps == 0 or step % self.stride == 0

    def note(self, full: bool, own: float, wall: float) -> None:
        """A finished captured step's figures (seconds)."""
        if self.fraction is None or wall <= 0:
            return
        if full:
            self.full_steps += 1
            self._cost_full = _running(self._cost_full, own)
        else:
            self.scale_steps += 1
            self._cost_scale = _running(self._cost_scale, own)
        self._plain = _running(self._plain, max(wall - own, 0.0))
        self._since_adjust += 1
        first = self.full_steps == 1 and self.scale_steps == 1
        if first or self._since_adjust >= ADJUST_EVERY:
            self._since_adjust = 0
            self._adjust()

    def _adjust(self) -> None:
        if self.fraction is None or self._cost_full is None or self._plain is None:
            return
        full = self._cost_full
        scale = self._cost_scale if self._cost_scale is not None else 0.3 * full
        allowed = self.fraction * self._plain
        stride = 1
        while stride < MAX_STRIDE and (full + (stride - 1) * scale) / stride > allowed:
            stride *= 2
        if stride != self.stride:
            logger.debug(
                "apmon: patterns counted every %d captured steps (%.3g ms full, %.3g ms scale "
                "only, plain step %.3g ms)",
                stride,
                1e3 * full,
                1e3 * scale,
                1e3 * self._plain,
            )
        self.stride = stride


def _running(mean: float | None, value: float) -> float:
    return value if mean is None else (1 - _SMOOTHING) * mean + _SMOOTHING * value
