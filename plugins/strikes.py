"""Bad-batch detector: a training step whose loss, patterns or scale leave their recent band."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import AlertValue, SiteSummary, StepSummary
from plugins._robust import medians_mads, push

INPUT_SCALARS = {"input_rms": "input/rms", "input_max_abs": "input/max_abs"}


@dataclass(frozen=True)
class StrikeSettings:
    """Thresholds in units of each statistic's robust band (tuned on the suite's tuning half).

    See benchmarks/scenarios/README.md for the suite.
    Every statistic x of a step is judged against its own last ``window`` values from steps
    that were not strikes (after ``warmup`` of them, and from step ``start``): its excess is
    (x - centre) / max(MAD, floor), the centre the median of those values and MAD their scaled
    median absolute deviation (Hampel 1974). A step is a strike when one excess passes its limit:

    - ``loss`` (upward): ln of the step's loss; floor ``loss_floor``;
    - ``input_rms`` and ``input_max_abs`` (both ways): ln of the RMS and of the largest
      magnitude of the batch's inputs (the client's ``input/rms``, ``input/max_abs`` scalars);
    - ``rms`` and ``max_abs`` (both ways, largest over sites): ln of the site's preactivation
      RMS = sqrt(sumsq / (rows d)) and of its largest magnitude max |x|;
    - ``shift`` (upward): (1/d) sum_u |on_u / rows - b_u|, the distance of the batch's
      per-unit on-rates from those of the last step that was not a strike. Its centre is the
      median of only the last ``shift_recent`` values (a level that follows a slow drift, as
      while a one-cycle rate rises), its band the MAD of the whole window; and the sites' shifts
      count only when at least ``ceil(shift_quorum * sites)`` of them pass the limit together.

    A strike step stays out of the baselines. The ``refractory`` steps after it are not judged
    (a bad step's update disturbs the next batches too; that echo is not a second bad batch),
    but their values join the baselines: a lasting change of level (a rate that jumped, a net
    that a bad batch rewired) becomes the new normal within a window instead of freezing the
    baselines and striking once per alert cool-down for the rest of the run (strikes 3.0 did).
    """

    window: int = 30
    warmup: int = 10
    start: int = 20
    loss: float = 5.0
    shift: float = 12.0
    rms: float = 40.0
    max_abs: float = 25.0
    input_rms: float = 8.0
    input_max_abs: float = 10.0
    loss_floor: float = 0.05
    shift_floor: float = 0.01
    rms_floor: float = 0.03
    max_abs_floor: float = 0.05
    input_rms_floor: float = 0.02
    input_max_abs_floor: float = 0.05
    shift_recent: int = 5
    shift_quorum: float = 0.5
    refractory: int = 1


UPWARD = frozenset({"loss", "shift"})
RECENT = "recent:"  # prefix of a shift's recent values among the windows given medians_mads


def on_rates_of(site: SiteSummary) -> np.ndarray | None:
    """The site's per-unit on-rates on_u / rows (None without rows or unit counts)."""
    if site.rows == 0 or not site.unit_on:
        return None
    return on_rates(site.rows, site.unit_on)


def on_rates(rows: int, unit_on: list[int]) -> np.ndarray:
    """Per-unit on-rates on_u / rows of on-counts taken over ``rows`` rows."""
    # numpy: a 512-unit site in pure Python took most of the host's time per step
    return np.asarray(unit_on, dtype=np.float64) / rows


def site_values(
    site: SiteSummary, previous_on: np.ndarray | None, rates: np.ndarray | None
) -> dict[str, float]:
    """A site's judged statistics at one step: ln RMS, ln max |x|, on-rate shift (see above).

    ``rates``: the site's ``on_rates_of`` (computed once per step: they also become the next
    step's ``previous_on``).
    """
    values: dict[str, float] = {}
    units = len(site.unit_on)
    if site.rows == 0 or units == 0:
        return values
    if site.sumsq is not None and site.sumsq > 0:
        values["rms"] = 0.5 * math.log(site.sumsq / (site.rows * units))
    if site.max_abs is not None and site.max_abs > 0:
        values["max_abs"] = math.log(site.max_abs)
    if rates is not None and previous_on is not None and len(previous_on) == units:
        values["shift"] = float(np.abs(rates - previous_on).sum()) / units
    return values


def step_values(
    event: StepSummary,
    on_rates: Mapping[str, np.ndarray],
    rates: Mapping[str, np.ndarray | None],
) -> dict[str, float]:
    """Every judged statistic of a training step, keyed ``kind`` or ``kind:site``.

    ``on_rates``: each site's on-rates at the last step that was not a strike; ``rates``: each
    site's ``on_rates_of`` at this step.
    """
    values: dict[str, float] = {}
    if event.loss is not None and event.loss > 0:
        values["loss"] = math.log(event.loss)
    scalars = event.scalars or {}
    for kind, name in INPUT_SCALARS.items():
        x = scalars.get(name)
        if x is not None and x > 0:
            values[kind] = math.log(x)
    for site in event.sites:
        for name, x in site_values(site, on_rates.get(site.site), rates.get(site.site)).items():
            values[f"{name}:{site.site}"] = x
    return values


class StrikeDetector:
    """Alerts ``bad_batch`` when a training step's statistics leave their own recent band.

    Sources: Hartmann et al. 2021, Sec. 3.2 and 4: pattern changes that strike "the lower to the
    top layers simultaneously" are "evidence for unfavorable batches" (here: the batch's per-unit
    on-rates jumping away from the last step's in at least half the sites); SPEC
    "Detectors" (training summary statistics, preactivation scale and the loss, on the training
    summary the client sends every step; the inputs' scale rides on it as two scalars). Each
    statistic is compared with its robust baseline (median and MAD of its recent values;
    see ``StrikeSettings``). The alert names the step, the statistic that carried it
    (``signal``: the one furthest past its limit), every statistic past its limit
    with its band, and the batch's sample indices when the summary carried them.

    Measured at ``watch()`` defaults on ``benchmarks/scenarios`` (``python
    benchmarks/scenarios/run.py --jobs 1``, real training, alerts as ``on_alert`` got them;
    thresholds tuned on recordings of the tuning half only): on input corruptions, held-out
    precision 1.00, recall 0.969 (31 of 32), F1 0.984 (tuning half 1.00 / 1.00 / 1.00; the
    loss-spike rule 0.076 / 0.719 / 0.137 held-out). The held-out hits were carried by the
    inputs' RMS 20 times, the loss 10, the inputs' max |x| 1 (tuning: 21, loss 8, shift 3).
    The one miss is N(0, 1) noise in place of inputs whose RMS is 1.04 (the ``fake`` data)
    into the residual net: no scale moves and the loss and patterns stayed in their bands.
    Label shuffles (reported apart): 6 of 8 in each half, through the loss. On a second machine
    of the same kind, whose runs take other float paths, the held-out half gave 0.967 / 0.906 /
    0.935 (tuning 1.00 / 1.00 / 1.00): two sign-inverted batches, seen only through the loss,
    were missed, and a max |x| strike came 3 steps after one of them. strikes 3.0 had
    0.844 / 0.844 held-out: it missed scalings that batch norm divides out of every site
    (the inputs' scale sees them), and struck once per alert cool-down on a healthy one-cycle
    run (none in 4.0, which lets echoes into the baselines, centres the shift on its recent
    values and asks half the sites; 3.0's baselines froze after a strike, as seen on the tuning
    half's resnet jump run, which struck every 50 steps to its end). 4.1 decides as 4.0 did (the
    same alerts on recorded runs, with states kept in memory or read back as JSON) in 70% of
    its time on an MLP 3072-512x3 (250 against 363 us a step): its state keeps each site's
    on-counts, and the on-rate arrays made from them are reused by the next step.
    """

    name = "strikes"
    version = "4.1"
    requires: tuple[str, ...] = ()

    def __init__(self, settings: StrikeSettings | None = None) -> None:
        self.settings = settings or StrikeSettings()
        self._arrays_run = ""
        self._arrays: dict[str, tuple[list[Any], np.ndarray]] = {}  # see ``_rates_of``
        s = self.settings
        # kind -> (floor of its band, limit of its excess, judged upward only)
        self._rules = {
            kind: (getattr(s, f"{kind}_floor"), getattr(s, kind), kind in UPWARD)
            for kind in ("loss", "shift", "rms", "max_abs", *INPUT_SCALARS)
        }

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Judge a training step on its summary (every statistic is on it)."""
        if not isinstance(event, StepSummary) or event.source != "train":
            return PluginResult()
        if event.step <= state.get("judged_step", -1):
            return PluginResult()  # a repeated summary
        state["judged_step"] = event.step
        s = self.settings
        # each site's (rows, unit_on) at the last step that was not a strike
        on_counts: dict[str, list[Any]] = state.setdefault("on_count", {})
        rates = {site.site: on_rates_of(site) for site in event.sites}
        if context.run_id != self._arrays_run:  # see ``_rates_of``
            self._arrays_run, self._arrays = context.run_id, {}
        previous = {name: self._rates_of(name, stored) for name, stored in on_counts.items()}
        values = step_values(event, previous, rates)
        baselines: dict[str, list[float]] = state.setdefault("baseline", {})
        exceeded = self._exceeded(event.step, values, baselines)
        last = state.get("last_strike")
        echo = last is not None and 0 < event.step - last <= s.refractory
        if exceeded and not echo:
            state["last_strike"] = event.step
            return PluginResult(alerts=[self._alert(event, exceeded)])
        for key, x in values.items():
            baselines[key] = push(baselines.get(key, []), x, s.window)
        for site in event.sites:
            site_rates = rates[site.site]
            if site_rates is not None:
                on_counts[site.site] = stored = [site.rows, site.unit_on]
                self._arrays[site.site] = (stored, site_rates)
        return PluginResult()

    def _rates_of(self, site: str, stored: list[Any]) -> np.ndarray:
        """The on-rates of a stored (rows, unit_on); the array made at that step if it is kept.

        Converting a 512-unit site's list to an array took 20-30 us, most of this plugin's time
        on an MLP 3072-512x3, and the step that stored the counts has just made it. Only the
        arrays of the run judged last are kept (``process`` drops them when another run comes),
        each with the very list it was made from: a state read back from the database (another
        list) is converted again, to the same values.
        """
        kept = self._arrays.get(site)
        if kept is not None and kept[0] is stored:
            return kept[1]
        rows, unit_on = stored
        return on_rates(rows, unit_on)

    def _exceeded(
        self, step: int, values: Mapping[str, float], baselines: Mapping[str, list[float]]
    ) -> dict[str, dict[str, float]]:
        """The statistics past their limits at ``step``, each with its band (see the settings).

        Runs on every training step in the host: one ``medians_mads`` call for the windows and
        the shifts' recent values together, and a dict only for a statistic past its limit.
        """
        s = self.settings
        if step < s.start:
            return {}
        windows = {k: baselines[k] for k in values if len(baselines.get(k, ())) >= s.warmup}
        recent = {
            RECENT + k: w[-s.shift_recent :]
            for k, w in windows.items()
            if k.startswith("shift:") and s.shift_recent < len(w)
        }
        bands = medians_mads({**windows, **recent})
        exceeded: dict[str, dict[str, float]] = {}
        shifts: list[float] = []
        for key in windows:
            x = values[key]
            kind = key.partition(":")[0]
            floor, limit, upward = self._rules[kind]
            centre, mad = bands[key]
            if RECENT + key in bands:
                centre = bands[RECENT + key][0]
            band = max(mad, floor)
            excess = (x - centre) / band if upward else abs(x - centre) / band
            if kind == "shift":
                shifts.append(excess)
            if excess > limit:
                exceeded[key] = {
                    "value": x,
                    "median": centre,
                    "band": band,
                    "excess": excess,
                    "limit": limit,
                }
        if shifts and s.shift_quorum > 0:
            shifts.sort(reverse=True)
            needed = max(1, math.ceil(s.shift_quorum * len(shifts)))
            if shifts[needed - 1] <= s.shift:
                exceeded = {k: v for k, v in exceeded.items() if not k.startswith("shift:")}
        return exceeded

    @staticmethod
    def _alert(event: StepSummary, exceeded: dict[str, dict[str, float]]) -> AlertValue:
        top = max(exceeded, key=lambda k: exceeded[k]["excess"] / exceeded[k]["limit"])
        signal = top.split(":")[0]
        return AlertValue(
            kind="bad_batch",
            step=event.step,
            severity="warning",
            message=(
                f"bad batch at step {event.step}: {top} is {exceeded[top]['excess']:.3g} bands "
                f"from its median (limit {exceeded[top]['limit']:.3g})"
            ),
            evidence={
                "signal": signal,
                "statistics": exceeded,
                "sample_indices": event.sample_indices,
            },
        )
