"""Bad-batch strike detector: APT D above each site's own recent baseline in most sites at once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from monitor.measures import Event, PluginResult, RunContext
from monitor.schema import AlertValue, ProbeRecord, StepSummary
from plugins._robust import median_mad, push
from plugins.apt import temperature


@dataclass(frozen=True)
class StrikeSettings:
    """Thresholds (defaults chosen on the scenario suite, see benchmarks/scenarios).

    Values are temperatures T = -ln(1 - D) (``plugins.apt.temperature``), which keep a site whose D
    is already near 1 able to show a spike. A site exceeds its baseline when T > median +
    max(k * MAD, min_rise) over its last ``window`` non-strike values (after ``warmup`` of them); a
    strike needs more than ``quorum`` of the sites exceeding at once. ``min_rise`` keeps a site
    with a near-constant T from firing on noise. The ``refractory`` steps after a strike are not
    judged and stay out of the baseline: a bad step's update also disturbs the next batch's
    patterns (the "pairs" of strikes in the source), which is its echo, not a second bad batch.
    """

    window: int = 30
    warmup: int = 10
    k: float = 5.0
    min_rise: float = 0.7
    quorum: float = 0.5
    refractory: int = 1


class StrikeDetector:
    """Alerts ``bad_batch`` when the APT distance D spikes in most sites at the same step.

    Source: Hartmann et al. 2021, Sec. 3.2 and 4: pattern changes that "strike from the lower to
    the top layers simultaneously" are "evidence for unfavorable batches"; SPEC "Detectors". Per APT
    probe and site, D = changed / rows (as its temperature T) is compared with the site's robust
    baseline (median and
    scaled MAD of its recent values, Hampel 1974); a strike is a step where more than ``quorum`` of
    the sites exceed it. Strike values are kept out of the baseline. The alert names the step, the
    sites, D and the thresholds, and the batch's sample indices when the step's training summary
    carried them (the summary may arrive just before or just after the probe).
    """

    name = "strikes"
    version = "1.0"
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
        """A strike alert for an APT probe, or the pending one once its batch's indices arrive."""
        if isinstance(event, StepSummary):
            if event.source != "train":
                return PluginResult()
            pending = state.get("pending")
            if pending is not None and pending["step"] == event.step:
                state["pending"] = None
                return PluginResult(alerts=[self._alert(pending, event.sample_indices)])
            if event.sample_indices is not None:
                state["indices"] = {"step": event.step, "indices": event.sample_indices}
            return PluginResult()
        if not isinstance(event, ProbeRecord) or event.kind != "apt":
            return PluginResult()
        result = PluginResult()
        pending = state.get("pending")
        if pending is not None and pending["step"] < event.step:
            state["pending"] = None  # its summary never came: alert without indices
            result.alerts.append(self._alert(pending, None))
        strike = self._judge(event, state)
        if strike is not None:
            known = state.get("indices")
            if known is not None and known["step"] == event.step:
                result.alerts.append(self._alert(strike, known["indices"]))
            else:
                state["pending"] = strike
        return result

    def _judge(self, event: ProbeRecord, state: dict[str, Any]) -> dict[str, Any] | None:
        s = self.settings
        last = state.get("last_strike")
        if last is not None and 0 < event.step - last <= s.refractory:
            return None
        baselines: dict[str, list[float]] = state.setdefault("baseline", {})
        exceeded: dict[str, dict[str, float]] = {}
        values: dict[str, float] = {}
        judged = 0
        for site in event.sites:
            if not site.changed:
                continue
            d = site.changed[0] / site.rows
            t = temperature(d, site.rows)
            values[site.site] = t
            series = baselines.get(site.site, [])
            if len(series) < s.warmup:
                continue
            judged += 1
            centre, mad = median_mad(series)
            threshold = centre + max(s.k * mad, s.min_rise)
            if t > threshold:
                exceeded[site.site] = {"D": d, "T": t, "T_threshold": threshold, "T_median": centre}
        is_strike = judged > 0 and len(exceeded) > s.quorum * judged
        if not is_strike:
            for site_name, t in values.items():
                baselines[site_name] = push(baselines.get(site_name, []), t, s.window)
            return None
        state["last_strike"] = event.step
        return {"step": event.step, "sites": exceeded, "judged": judged}

    @staticmethod
    def _alert(strike: dict[str, Any], indices: list[int] | None) -> AlertValue:
        sites = strike["sites"]
        return AlertValue(
            kind="bad_batch",
            step=strike["step"],
            severity="warning",
            message=(
                f"pattern-change strike at step {strike['step']}: APT D above baseline in "
                f"{len(sites)} of {strike['judged']} sites"
            ),
            evidence={"sites": sites, "judged": strike["judged"], "sample_indices": indices},
        )
