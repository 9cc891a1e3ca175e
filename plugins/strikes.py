"""Bad-batch strike detector: a step whose patterns leave their own recent band in most sites."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from monitor.measures import Event, PluginResult, RunContext, RunFinished
from monitor.schema import AlertValue, SiteSummary, StepSummary
from plugins._robust import median_mad, push
from plugins.apt import temperature
from plugins.entropy import entropy_family


@dataclass(frozen=True)
class StrikeSettings:
    """Thresholds (defaults chosen on the scenario suite, see benchmarks/scenarios).

    Three statistics per site and step, each judged against the site's own last ``window``
    non-strike values (after ``warmup`` of them) with a robust band: a value x leaves the band when
    x - median > max(k * MAD, floor) (``T``, ``shift``: upward only) or |x - median| >
    max(k * MAD, floor) (``rel_entropy``). The floors (``min_rise``, ``min_shift``,
    ``min_entropy``) keep a site whose statistic is near-constant (MAD ~ 0) from firing on noise.

    - ``T`` = -ln(1 - D), the APT temperature of the step's probe (``plugins.apt.temperature``);
    - ``shift`` = (1/d) sum_u |on_u / rows - b_u|, the mean distance of the training batch's
      per-unit on-rates from b, the on-rates of the last non-strike step (a batch of the wrong
      scale or content turns other units on than the batches before it);
    - ``rel_entropy`` of the training batch's patterns (``plugins.entropy.entropy_family``; a
      constant image collapses the batch onto a few patterns).

    A site is out of band when any of its statistics is; a strike needs more than ``quorum`` of
    the judged sites out of band at once, and one statistic of one site beyond ``decisive`` times
    its band (a corrupted batch lands far outside; several sites only just outside is how a
    clean step's noise looks). The ``refractory`` steps after a strike are not judged: a
    bad step's update also disturbs the next batches' patterns (the "pairs" of strikes in the
    source), which is its echo, not a second bad batch. They do enter the baseline, which therefore
    follows a network that the bad step moved to another regime instead of alerting on every
    later step; the strike step itself never enters it.
    """

    window: int = 30
    warmup: int = 10
    k: float = 5.0
    min_rise: float = 0.7
    min_shift: float = 0.05
    min_entropy: float = 0.05
    quorum: float = 0.5
    decisive: float = 2.5
    refractory: int = 2


SIGNALS = ("T", "shift", "rel_entropy")
TWO_SIDED = frozenset({"rel_entropy"})


class StrikeDetector:
    """Alerts ``bad_batch`` when most sites' patterns leave their own recent band at one step.

    Source: Hartmann et al. 2021, Sec. 3.2 and 4: pattern changes that "strike from the lower to
    the top layers simultaneously" are "evidence for unfavorable batches"; SPEC "Detectors". A step
    is judged once its APT probe (D = changed / rows, as temperature T) and its training summary
    (per-unit on-rates and relative entropy of the batch's own patterns) are both in, in either
    order, or with what came when the next step's first event arrives. Each statistic is compared
    with the site's robust baseline (median and scaled MAD of its recent values, Hampel 1974; see
    ``StrikeSettings``); a strike is a step where more than ``quorum`` of the judged sites are out
    of band. Strike values stay out of the baseline. The alert names the step, the sites with the
    statistics that left their band and the thresholds, and the batch's sample indices when the
    step's training summary carried them.
    """

    name = "strikes"
    version = "2.0"
    requires: tuple[str, ...] = ()

    def __init__(self, settings: StrikeSettings | None = None) -> None:
        self.settings = settings or StrikeSettings()

    def process(
        self,
        event: Event,
        context: RunContext,
        state: dict[str, Any],
        upstream: Mapping[str, PluginResult],
    ) -> PluginResult:
        """Gather a step's statistics; judge the step once both its events are in, or later."""
        result = PluginResult()
        if isinstance(event, RunFinished):
            self._flush(state, result)
            return result
        indices: list[int] | None = None
        if isinstance(event, StepSummary):
            if event.source != "train":
                return result
            kind, indices = "summary", event.sample_indices
            values = self._summary_values(event.sites)
        elif event.kind == "apt":
            kind = "apt"
            values = {
                site.site: {
                    "D": site.changed[0] / site.rows,
                    "T": temperature(site.changed[0] / site.rows, site.rows),
                }
                for site in event.sites
                if site.changed
            }
        else:
            return result
        if event.step <= state.get("judged_step", -1):
            return result  # a late duplicate of a step already judged
        pending = state.get("pending")
        if pending is not None and pending["step"] != event.step:
            self._flush(state, result)
            pending = None
        if pending is None:
            pending = {"step": event.step, "have": [], "values": {}, "indices": None}
        if kind == "summary":
            pending["indices"] = indices
        pending["have"] = sorted({*pending["have"], kind})
        for site, stats in values.items():
            pending["values"].setdefault(site, {}).update(stats)
        state["pending"] = pending
        if pending["have"] == ["apt", "summary"]:
            self._flush(state, result)
        return result

    @staticmethod
    def _summary_values(sites: list[SiteSummary]) -> dict[str, dict[str, Any]]:
        """Per site: rel_entropy, and the on-rates (the shift is taken against the baseline).

        Without per-unit counts the entropy's ceiling is log2 n (``units`` = rows >= log2 n).
        """
        values: dict[str, dict[str, Any]] = {}
        for site in sites:
            if site.rows == 0:
                continue
            stats: dict[str, Any] = {}
            if site.spectrum:
                units = len(site.unit_on) or site.rows
                stats["rel_entropy"] = entropy_family(site, units)["rel_entropy"]
            if site.unit_on:
                stats["on"] = [c / site.rows for c in site.unit_on]
            if stats:
                values[site.site] = stats
        return values

    def _flush(self, state: dict[str, Any], result: PluginResult) -> None:
        pending = state.pop("pending", None)
        if pending is None:
            return
        state["judged_step"] = pending["step"]
        strike = self._judge(pending, state)
        if strike is not None:
            result.alerts.append(self._alert(strike, pending["indices"]))

    def _judge(self, pending: dict[str, Any], state: dict[str, Any]) -> dict[str, Any] | None:
        s = self.settings
        step = pending["step"]
        last = state.get("last_strike")
        echo = last is not None and 0 < step - last <= s.refractory
        baselines: dict[str, dict[str, list[float]]] = state.setdefault("baseline", {})
        on_rates: dict[str, list[float]] = state.setdefault("on_rate", {})
        floors = {"T": s.min_rise, "shift": s.min_shift, "rel_entropy": s.min_entropy}
        exceeded: dict[str, dict[str, float]] = {}
        values: dict[str, dict[str, float]] = {}
        judged = 0
        decisive = False
        for site, stats in pending["values"].items():
            current = {k: float(v) for k, v in stats.items() if k in SIGNALS}
            rates = stats.get("on")
            base = on_rates.get(site)
            if rates is not None and base is not None and len(base) == len(rates):
                distance = sum(abs(r - b) for r, b in zip(rates, base, strict=True))
                current["shift"] = distance / len(rates)
            values[site] = current
            series = baselines.get(site, {})
            out: dict[str, float] = {}
            seen = False
            for name, x in current.items():
                history = series.get(name, [])
                if len(history) < s.warmup:
                    continue
                seen = True
                centre, mad = median_mad(history)
                band = max(s.k * mad, floors[name])
                deviation = abs(x - centre) if name in TWO_SIDED else x - centre
                decisive = decisive or deviation > s.decisive * band
                if deviation > band:
                    out.update({name: x, f"{name}_median": centre, f"{name}_band": band})
                    if name not in TWO_SIDED:
                        out[f"{name}_threshold"] = centre + band
            judged += seen
            if out:
                if "D" in stats:
                    out["D"] = float(stats["D"])
                exceeded[site] = out
        if not echo and decisive and judged > 0 and len(exceeded) > s.quorum * judged:
            state["last_strike"] = step
            return {"step": step, "sites": exceeded, "judged": judged}
        for site, current in values.items():
            series = baselines.setdefault(site, {})
            for name, x in current.items():
                series[name] = push(series.get(name, []), x, s.window)
            rates = pending["values"][site].get("on")
            if rates is not None:
                on_rates[site] = list(rates)
        return None

    @staticmethod
    def _alert(strike: dict[str, Any], indices: list[int] | None) -> AlertValue:
        sites = strike["sites"]
        return AlertValue(
            kind="bad_batch",
            step=strike["step"],
            severity="warning",
            message=(
                f"pattern-change strike at step {strike['step']}: patterns out of their recent "
                f"band in {len(sites)} of {strike['judged']} sites"
            ),
            evidence={"sites": sites, "judged": strike["judged"], "sample_indices": indices},
        )
