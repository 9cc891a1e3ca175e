"""Trains one scenario run through the public API: ``watch(model, opt, on_alert=...)`` at defaults.

The alerts are what the training job's ``on_alert`` received, each with the step at which it was
received; ``mon.alerts`` after ``close()`` is kept too. With ``record=True`` the wire events the
client sent are kept (in the order sent, with the step during which each was sent) so that
``replay.py`` can feed them through the real plugin host again without training.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from families import BATCH, DIVERGE_FROM, RunSpec, build_model, corrupt, load_data, schedule
from torch import nn

import monitor
from monitor.schema import AlertValue
from monitor.settings import Settings

AFTER_DIVERGENCE = 3  # steps a run goes on after its loss diverged


@dataclass
class Received:
    """One alert as ``on_alert`` got it: during training step ``at`` (the run's end: last step)."""

    kind: str
    step: int
    at: int
    signal: str
    message: str


@dataclass
class Result:
    """What one run measured: its losses, the alerts received and stored, its events if kept."""

    spec: RunSpec
    losses: list[float]
    classes: int
    received: list[Received] = field(default_factory=list)
    stored: list[tuple[str, int]] = field(default_factory=list)
    events: list[tuple[int, str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def signal_of(alert: AlertValue) -> str:
    """Which signal carried an alert: the ``signal`` in its evidence, else its ``sign``."""
    evidence = alert.evidence or {}
    return str(evidence.get("signal") or evidence.get("sign") or "?")


class Tee:
    """A transport that records what the client sends before handing it on.

    Only used with ``--record``; the scored runs use the default transport directly.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.events: list[tuple[int, str, Any]] = []
        self.step = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def add_sites(self, sites: Any) -> None:
        self.events.append((self.step, "sites", [s.model_copy() for s in sites]))
        self.inner.add_sites(sites)

    def send_summary(self, summary: Any) -> None:
        self.events.append((self.step, "summary", summary.model_copy(deep=True)))
        self.inner.send_summary(summary)

    def send_probe(self, probe: Any) -> None:
        self.events.append((self.step, "probe", probe.model_copy(deep=True)))
        self.inner.send_probe(probe)


def wait_for_host(transport: Any, limit: float = 60.0) -> None:
    """Before step 0: wait until the embedded host process has started (at most ``limit`` s).

    A real job spends its first seconds loading data; these runs of a few seconds do not, and
    the training thread does not wait for a host that has not started yet (``EmbeddedTransport.
    wait_for_mark``), so without this pause a whole run could pass before the first plugin runs.
    The flag read is the transport's own (private) one: this is benchmark scaffolding.
    """
    deadline = time.perf_counter() + limit
    while not getattr(transport, "_started", True) and time.perf_counter() < deadline:
        transport.poll_alerts()  # reads the host's messages, "started" among them
        time.sleep(0.01)


def diverged_at(losses: list[float], classes: int, bad: Iterable[int] = ()) -> int | None:
    """SPEC "What counts": the first step after step 20 whose loss is non-finite or > 3 ln C.

    The loss of a bad batch ``bad`` (and of the step after it) is the batch's, not the run's:
    those steps are left out.
    """
    limit = 3 * math.log(classes)
    skip = {s + k for s in bad for k in (0, 1)}
    for step, loss in enumerate(losses):
        if step > DIVERGE_FROM and step not in skip and (not math.isfinite(loss) or loss > limit):
            return step
    return None


def train(spec: RunSpec, record: bool = False, options: dict[str, Any] | None = None) -> Result:
    """Train ``spec`` under ``watch()`` at its defaults (MLflow off, a temporary SQLite store).

    ``options`` are passed on to ``watch()`` (e.g. ``apt_every=1, sweep_every=5`` for a dense
    recording to study offline); the scored runs pass none.
    """
    torch.set_num_threads(1)
    torch.manual_seed(spec.seed)
    data = load_data(spec.data, spec.seed)
    model = build_model(spec.model, (int(data.x.shape[1]), int(data.x.shape[2])), data.classes)
    if spec.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=spec.base_lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=spec.base_lr, momentum=0.9)
    multiple = schedule("constant" if spec.group == "bad_batch" else spec.scenario, spec.steps)
    g = torch.Generator().manual_seed(spec.seed)
    result = Result(spec, [], data.classes)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(database_url=f"sqlite:///{folder}/apmon.db", mlflow_tracking_uri="")
        tee = None
        if record:
            from monitor.client.embedded import EmbeddedTransport

            tee = Tee(EmbeddedTransport(settings))
        now = {"step": 0}

        def on_alert(alert: AlertValue) -> None:
            result.received.append(
                Received(alert.kind, alert.step, now["step"], signal_of(alert), alert.message)
            )

        mon = monitor.watch(
            model, opt, settings=settings, on_alert=on_alert, transport=tee, **(options or {})
        )

        @mon
        def step(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> float:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            mon.record_indices(idx)
            opt.step()
            return float(loss.detach())

        wait_for_host(mon.transport)
        order, cursor = torch.randperm(len(data.y), generator=g), 0
        try:
            for s in range(spec.steps):
                now["step"] = s
                if tee is not None:
                    tee.step = s
                if cursor + BATCH > len(data.y):
                    order, cursor = torch.randperm(len(data.y), generator=g), 0
                idx = order[cursor : cursor + BATCH]
                cursor += BATCH
                xb, yb = data.x[idx], data.y[idx]
                if s in spec.corrupt:
                    xb, yb = corrupt(spec.corrupt[s], xb, yb, g)
                for group in opt.param_groups:
                    group["lr"] = spec.base_lr * multiple(s)
                result.losses.append(step(xb, yb, idx))
                end = diverged_at(result.losses, data.classes, spec.corrupt)
                if spec.group == "divergence" and end is not None and s >= end + AFTER_DIVERGENCE:
                    break
        finally:
            now["step"] = len(result.losses) - 1
            mon.close()
        result.stored = [(a.kind, a.step) for a in mon.alerts]
        if tee is not None:
            result.events = tee.events
    result.seconds = time.perf_counter() - started
    return result
