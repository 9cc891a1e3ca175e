"""Scores runs against their truth (SPEC "What counts"), for the detectors and the loss rules.

Divergence: the first step after step 20 whose loss is non-finite or above 3 ln C. A divergence
alert is in time when ``on_alert`` received it during a step before that one; lead = divergence
step - that step. Any divergence alert before step 20, on a healthy run or on a bad-batch run is a
false alarm. Bad batches: an alert whose step is an injected step or the one after it is a hit.
The loss rules are judged the same way, a rule "alerting" at the step whose loss trips it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from driver import Result, diverged_at
from families import DIVERGE_FROM

LABELS = "labels"


def loss_spikes(losses: Sequence[float]) -> list[int]:
    """Loss-spike rule: steps whose loss is non-finite or > 2x the mean of the previous 10."""
    steps = []
    for s in range(10, len(losses)):
        window = [v for v in losses[s - 10 : s] if math.isfinite(v)]
        if not math.isfinite(losses[s]) or (window and losses[s] > 2 * statistics.fmean(window)):
            steps.append(s)
    return steps


def megatron_spikes(losses: Sequence[float]) -> list[int]:
    """Megatron-LM's spiky-loss rule: loss non-finite or > 10x the largest loss before it."""
    steps = []
    top = -math.inf
    for s, loss in enumerate(losses):
        if not math.isfinite(loss) or (s > 0 and loss > 10 * top):
            steps.append(s)
        if math.isfinite(loss):
            top = max(top, loss)
    return steps


@dataclass
class DivergenceScore:
    """One detector on the divergence task."""

    diverging: int = 0
    in_time: int = 0
    leads: list[int] = field(default_factory=list)
    false_alarms: int = 0  # runs with a false divergence alarm
    clean_runs: int = 0  # healthy and bad-batch runs judged for false alarms
    signals: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, object]:
        """Plain figures for JSON and tables."""
        return {
            "in_time": f"{self.in_time}/{self.diverging}",
            "median_lead": statistics.median(self.leads) if self.leads else None,
            "leads": sorted(self.leads),
            "false_alarm_runs": f"{self.false_alarms}/{self.clean_runs}",
            "signals": dict(sorted(self.signals.items())),
        }


@dataclass
class BadBatchScore:
    """One detector on the bad-batch task: input corruptions and label shuffles apart."""

    injected: int = 0
    hits: int = 0
    label_injected: int = 0
    label_hits: int = 0
    alerts: int = 0  # alerts on healthy and bad-batch runs, label-shuffle hits left out
    true_alerts: int = 0
    per_kind: dict[str, list[int]] = field(default_factory=dict)
    signals: dict[str, int] = field(default_factory=dict)  # of the alerts that hit

    def figures(self) -> tuple[float, float, float]:
        """Precision, recall and F1 on input corruptions."""
        precision = self.true_alerts / self.alerts if self.alerts else 1.0
        recall = self.hits / self.injected if self.injected else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    def row(self) -> dict[str, object]:
        """Plain figures for JSON and tables."""
        precision, recall, f1 = self.figures()
        return {
            "precision": round(precision, 3),
            "recall": round(recall, 3),
            "f1": round(f1, 3),
            "label_recall": f"{self.label_hits}/{self.label_injected}",
            "per_kind": {k: f"{v[0]}/{v[1]}" for k, v in sorted(self.per_kind.items())},
            "signals": dict(sorted(self.signals.items())),
        }


Alerts = list[tuple[int, int, str]]  # (alert step, step received, signal)


def detector_alerts(result: Result, kind: str) -> Alerts:
    """The run's alerts of ``kind`` as ``on_alert`` received them."""
    return [(a.step, a.at, a.signal) for a in result.received if a.kind == kind]


def rule_alerts(steps: list[int]) -> Alerts:
    """A loss rule's firing steps as alerts received at that step."""
    return [(s, s, "loss") for s in steps]


def score_divergence(score: DivergenceScore, result: Result, alerts: Alerts) -> None:
    """Add one run to a divergence score."""
    group = result.spec.group
    if group == "divergence":
        end = diverged_at(result.losses, result.classes)
        if end is None:
            return  # the schedule did not make this run diverge within its steps
        score.diverging += 1
        early = [a for a in alerts if a[1] < DIVERGE_FROM]
        timely = [a for a in alerts if DIVERGE_FROM <= a[1] < end]
        if early:
            score.false_alarms += 1
        elif timely:
            first = min(timely, key=lambda a: a[1])
            score.in_time += 1
            score.leads.append(end - first[1])
            score.signals[first[2]] = score.signals.get(first[2], 0) + 1
        return
    score.clean_runs += 1
    if diverged_at(result.losses, result.classes, result.spec.corrupt) is not None:
        score.clean_runs -= 1  # a control that diverged is no control: left out, and reported
        return
    if alerts:
        score.false_alarms += 1


def score_bad_batches(score: BadBatchScore, result: Result, alerts: Alerts) -> None:
    """Add one healthy or bad-batch run to a bad-batch score."""
    if result.spec.group == "divergence":
        return
    injected = result.spec.corrupt
    steps = {a[0] for a in alerts}
    signal_at = {a[0]: a[2] for a in alerts}
    for at, kind in injected.items():
        hit = at in steps or at + 1 in steps
        if kind == LABELS:
            score.label_injected += 1
            score.label_hits += hit
        else:
            score.injected += 1
            score.hits += hit
            tally = score.per_kind.setdefault(kind, [0, 0])
            tally[0] += hit
            tally[1] += 1
    for step in steps:
        near = [at for at in (step, step - 1) if at in injected]
        if near and all(injected[at] == LABELS for at in near):
            continue  # a label-shuffle hit: reported apart
        score.alerts += 1
        score.true_alerts += bool(near)
        if near:
            score.signals[signal_at[step]] = score.signals.get(signal_at[step], 0) + 1


def score_all(results: list[Result]) -> dict[str, dict[str, object]]:
    """Divergence and bad-batch figures of the detectors and the loss rules on ``results``."""
    divergence = {name: DivergenceScore() for name in ("apmon", "loss_spike", "megatron")}
    bad = {name: BadBatchScore() for name in ("apmon", "loss_spike")}
    for result in results:
        spikes = rule_alerts(loss_spikes(result.losses))
        score_divergence(divergence["apmon"], result, detector_alerts(result, "divergence"))
        score_divergence(divergence["loss_spike"], result, spikes)
        score_divergence(
            divergence["megatron"], result, rule_alerts(megatron_spikes(result.losses))
        )
        score_bad_batches(bad["apmon"], result, detector_alerts(result, "bad_batch"))
        score_bad_batches(bad["loss_spike"], result, spikes)
    return {
        "divergence": {k: v.row() for k, v in divergence.items()},
        "bad_batch": {k: v.row() for k, v in bad.items()},
    }
