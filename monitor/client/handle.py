"""``watch(model, optimizer)``: the one handle that owns every hook of a monitored training job.

Step boundaries come from the optimizer (a step post-hook), activation sites from the model's
forward (see ``capture``), so the user's loop does not change. The handle is a context manager
and a decorator of the per-step function; closing it removes every hook and ends the run.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import logging
import math
import re
import statistics
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from monitor.client import kernel_loader
from monitor.client.apt import DEFAULT_SWEEP_ETAS, AptProber, RateTriggered, reference_lr
from monitor.client.budget import DEFAULT_CAPTURE_BUDGET, CaptureBudget
from monitor.client.capture import ModuleTracker, SiteFilter, site_kind
from monitor.client.diagram import DEFAULT_DIAGRAM_ROWS, DiagramSchedule, sample_diagram
from monitor.client.distributed import SilentTransport, all_gather_stats, is_leader
from monitor.client.input_stats import InputStats, as_scalars, gather_ranks
from monitor.client.mlflow_link import learning_rates, link_mlflow_run, run_origin
from monitor.client.probeset import ProbeSet, as_probe_set, probe_summary
from monitor.client.probeset import evaluate as evaluate_probe_set
from monitor.client.schedules import Schedule, as_schedule
from monitor.client.summary import (
    DEFAULT_SKETCH_K,
    SiteStats,
    measure,
    measure_scale,
    settle,
    to_wire,
)
from monitor.client.transport import Transport
from monitor.rate_surge import SURGE_RATE, SURGE_WINDOW
from monitor.schema import (
    MAX_SCALARS,
    MAX_SITES,
    AlertValue,
    RunStart,
    SiteInfo,
    SiteMode,
    SiteSummary,
    StepSummary,
)
from monitor.settings import Settings

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
AlertCallback = Callable[[AlertValue], None]
# ``on_alert`` policies: log the alert, raise ``AlertRaised``, or set ``Monitor.should_stop``
# (the integrations turn that into the trainer's own way of stopping).
ALERT_POLICIES = ("warn", "raise", "stop")


class AlertRaised(RuntimeError):
    """Raised into the training loop by ``on_alert="raise"``; ``alert`` is what was raised."""

    def __init__(self, alert: AlertValue) -> None:
        super().__init__(f"apmon alert at step {alert.step}: {alert.kind}: {alert.message}")
        self.alert = alert


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that keep it as ``.optimizer``.

    accelerate's ``AcceleratedOptimizer`` and Lightning's ``LightningOptimizer`` call the inner
    optimizer's ``step``, whose hooks therefore see every real step (and no skipped one).
    """
    seen = {id(optimizer)}
    while not (
        isinstance(optimizer, torch.optim.Optimizer)
        and hasattr(optimizer, "_optimizer_step_post_hooks")
    ):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        optimizer = inner
    return optimizer  # type: ignore[no-any-return]


# The training forward's summary covers the first rows (samples) of each batch: the detectors
# judge a batch by a sample of it, and the capture costs a quarter of a 128-batch's (see
# benchmarks/e2e.py). ``capture_rows=None`` summarises every row.
DEFAULT_CAPTURE_ROWS = 32
_SCALAR_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,64}")


class Monitor:
    """A monitored training run. Build it with ``watch``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        transport: Transport,
        *,
        every: int | Schedule = 1,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        sign_mode: bool = False,
        sketch_k: int = DEFAULT_SKETCH_K,
        name: str = "",
        on_alert: AlertCallback | str | None = None,
        config: dict[str, Any] | None = None,
        apt_every: int | Schedule | str | None = "rate",
        sweep_every: int | Schedule | None = None,
        sweep_etas: Sequence[float] = DEFAULT_SWEEP_ETAS,
        probe_rows: int | None = None,
        capture_rows: int | None = DEFAULT_CAPTURE_ROWS,
        capture_budget: float | None = DEFAULT_CAPTURE_BUDGET,
        probe_set: ProbeSet | torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
        probe_every: int | Schedule = 100,
        apd_every: int | Schedule | None = None,
        apd_rows: int = DEFAULT_DIAGRAM_ROWS,
        merge_ranks: bool = False,
        process_group: Any = None,
        mlflow_run_id: str | None = None,
        start_step: int = 0,
    ) -> None:
        # torch.compile(model): sites, probes and probe sets use the module it wraps (names
        # without "_orig_mod."); a step that is captured or probed runs that module's forward
        # eagerly (``_eager_when_armed``), so no capture code enters a compiled graph.
        self.compiled: nn.Module | None = None
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            self.compiled, model = model, inner
        self._eager = contextlib.ExitStack()
        self.model = model
        optimizer = unwrap_optimizer(optimizer)
        self.optimizer = optimizer
        self.transport = transport
        self.schedule = as_schedule(every)
        self.site_filter = SiteFilter(tuple(include), tuple(exclude))
        self.sketch_k = sketch_k
        if capture_rows is not None and capture_rows < 1:
            raise ValueError(f"capture_rows must be >= 1, got {capture_rows}")
        self.capture_rows = capture_rows
        # Which captured steps count patterns (budget.py); the others carry only the detectors'
        # statistics. Merged ranks always count them (the merge needs the patterns).
        self.capture_budget = CaptureBudget(None if merge_ranks else capture_budget)
        self._full = True  # the step being captured counts patterns
        self._own = 0.0  # seconds of the monitor's own work in this step, on this thread
        self._step_ended_at: float | None = None
        self.on_alert = self._alert_policy(on_alert)
        # Set by ``on_alert="stop"``: the integrations stop the trainer at the end of the step.
        self.should_stop = False
        self.step = start_step
        self.sites: dict[str, SiteInfo] = {}
        self.alerts: list[AlertValue] = []
        self.closed = False
        self._stats: dict[str, SiteStats] = {}
        self._new_sites: list[SiteInfo] = []
        self._pending: StepSummary | None = None
        self._labels: torch.Tensor | None = None
        self._inputs = InputStats()  # scale of the training forwards' inputs (input_stats.py)
        self._sample_indices: list[int] | None = None
        # Step ends and marks (see ``_flush_and_mark``); transports without marks skip the wait.
        self._holds_for_loss = False
        self._in_step_function = False
        self._ends_own_steps = False  # ``hold_step_ends``
        self._marks: list[int] = []
        # The learning rates of the last SURGE_WINDOW steps, and whether this step's surged.
        self._rates: collections.deque[float] = collections.deque(maxlen=SURGE_WINDOW)
        self._surging = False
        # The mark that follows this step's APT probe and sweep, waited for at this step's end.
        self._probe_mark: int | None = None
        self._losses: list[float] = []  # values returned by decorated calls of this step
        # -- step semantics: forwards seen in this step, inside optimizer.step() (closures) ----
        self._recording = False  # the training forward's summary is scheduled in this step
        self._in_optimizer_step = False
        self._forwards = 0
        self._closure_calls = 0  # calls of this step's optimizer.step(closure) closure
        self._checked_capture = False
        self._forward_module: nn.Module | None = None  # a submodule training calls directly
        self._entered: nn.Module | None = None
        # -- fixed probe set (probeset.py) and data-parallel merging (distributed.py) ---------
        self.probe_set: ProbeSet | None = None if probe_set is None else as_probe_set(probe_set)
        self.probe_schedule = as_schedule(probe_every)
        self.diagrams = DiagramSchedule(apd_every)  # diagrams of the labelled probe subset
        self.apd_rows = apd_rows
        self._last_probe_step: int | None = None
        # The latest probe-set summary waits one step, so that the run's end can still add a
        # diagram to it when it was measured on the final parameters.
        self._pending_probe: StepSummary | None = None
        self.merge_ranks = merge_ranks
        self.process_group = process_group
        if merge_ranks and not is_leader(process_group):
            self.transport = transport = SilentTransport()  # the leader ships for all ranks
        self._mark: Callable[[], int] | None = getattr(transport, "mark", None)
        self._wait_for_mark: Callable[..., None] | None = getattr(transport, "wait_for_mark", None)
        # -- end of probe set and merging -----------------------------------------------------
        self.tracker = ModuleTracker(model, self._record_site, sign_mode=sign_mode)
        self.tracker.on_forward = self._on_forward
        self.tracker.on_forward_end = self._on_forward_end
        self._compile_hooks: list[torch.utils.hooks.RemovableHandle] = []
        if self.compiled is not None:
            self._compile_hooks = [
                self.compiled.register_forward_pre_hook(self._eager_when_armed),
                self.compiled.register_forward_hook(self._compiled_again, always_call=True),
            ]
        _warn_in_place_compile(model)
        self._step_hook = optimizer.register_step_post_hook(self._after_optimizer_step)
        self._pre_step_hook = optimizer.register_step_pre_hook(self._before_optimizer_step)
        # -- APT probes and sweeps (apt.py): hooks exist only when some probe is scheduled ----
        self.prober: AptProber | None = None
        self._probe_hooks: list[torch.utils.hooks.RemovableHandle] = []
        if apt_every == "rate":  # the default: a probe when the rate rose 10%, else every 25 steps
            apt_every = RateTriggered()
        if isinstance(apt_every, str):
            raise ValueError(
                f'apt_every must be an int, a schedule, None or "rate", got {apt_every!r}'
            )
        if apt_every is not None or sweep_every is not None:
            self.prober = AptProber(
                model,
                self.tracker,
                self.site_filter,
                apt=as_schedule(apt_every),
                sweep=as_schedule(sweep_every),
                etas=sweep_etas,
                probe_rows=probe_rows,
                rate=lambda: reference_lr(optimizer),
            )
        # -- end of APT probes and sweeps ----------------------------------------------------
        user, source_name = run_origin()
        start = RunStart(
            name=name,
            config=_plain_config(config or {}),
            mlflow_run_id=mlflow_run_id,
            user=user,
            source_name=source_name,
        )
        self.run_id = transport.start_run(start)
        self._arm()
        self._atexit = _register_atexit(self)

    def _alert_policy(self, on_alert: AlertCallback | str | None) -> AlertCallback | None:
        if on_alert is None or callable(on_alert):
            return on_alert
        if on_alert == "warn":
            return lambda alert: logger.warning("apmon alert at step %d: %s", alert.step, alert)
        if on_alert == "raise":

            def raise_it(alert: AlertValue) -> None:
                raise AlertRaised(alert)

            return raise_it
        if on_alert == "stop":

            def stop(alert: AlertValue) -> None:
                logger.warning("apmon alert at step %d, stopping: %s", alert.step, alert)
                self.should_stop = True

            return stop
        raise ValueError(f"on_alert must be callable or one of {ALERT_POLICIES}, got {on_alert!r}")

    def _arm(self) -> None:
        """Arm the tracker for the step about to run: for its summary or its APT probe."""
        self._recording = self.schedule(self.step)
        self._full = self._recording and self.capture_budget.full(self.step)
        probed = self.prober is not None and self.prober.scheduled(self.step)
        self.tracker.armed = self._recording or probed
        self._forwards = 0
        self._closure_calls = 0

    # -- capture -----------------------------------------------------------------------------

    def _eager_when_armed(self, _module: nn.Module, _args: Any) -> None:
        if self.tracker.armed and torch.is_grad_enabled():
            self._eager.enter_context(torch.compiler.set_stance("force_eager"))

    def _compiled_again(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self._eager.close()

    def _on_forward(self, path: str, module: nn.Module, args: Any, kwargs: Any) -> None:
        """The tracker's word that an outermost training forward begins (see ``capture``)."""
        self._forwards += 1
        self._entered = module
        if self._recording and self._closure_calls <= 1:
            self._inputs.add(args, kwargs, self.capture_rows)
        if self.prober is None:
            return
        try:
            if module is self.model:
                self.prober.capture(self.step, args, kwargs)
            else:
                self.prober.capture(self.step, args, kwargs, module, path)
        except Exception:
            logger.exception("apmon could not keep the inputs of step %d for probes", self.step)

    def _on_forward_end(self, sites: int) -> None:
        if sites and self._forward_module is None and self._entered is not self.model:
            self._forward_module = self._entered
        if self.prober is not None:
            self.prober.forward_end(sites)

    def _record_site(self, name: str, mode: SiteMode, preactivation: torch.Tensor) -> None:
        if self.prober is not None and self.prober.collecting is not None:
            try:  # this runs inside the user's training forward: never raise into it
                self.prober.collecting(name, mode, preactivation)
            except Exception:
                logger.exception("apmon could not record site %s for a probe", name)
        # A closure evaluated again inside optimizer.step() (LBFGS) is not summarised twice.
        if not self._recording or self._closure_calls > 1 or not self.site_filter(name):
            return
        began = time.perf_counter()
        try:
            x = preactivation.detach()
            kind = site_kind(x)
            labels = self._labels
            if self.capture_rows is not None and x.dim() > 1 and x.shape[0] > self.capture_rows:
                x = x[: self.capture_rows]
                labels = None if labels is None else labels[: self.capture_rows]
            # x is detached: nothing below records autograd history, no no_grad() needed
            stats = measure(x, kind, labels) if self._full else measure_scale(x, kind)
            if name not in self.sites:
                info = SiteInfo(name=name, kind=kind, mode=mode, units=stats.units)
                self.sites[name] = info
                self._new_sites.append(info)
            previous = self._stats.get(name)
            self._stats[name] = stats if previous is None else previous.merge(stats)
        except Exception:
            logger.exception("apmon could not capture site %s; training continues", name)
        self._own += time.perf_counter() - began

    # -- APT probes and sweeps (apt.py); a failing probe is logged, training goes on --------

    def _before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> Any:
        self._in_optimizer_step = True
        self._closure_calls = 0
        if self.prober is not None:
            try:
                self.prober.before_step(self.step, optimizer)
            except Exception:
                logger.exception("apmon probe failed before step %d; training continues", self.step)
        return self._count_closure_calls(args, kwargs)

    def _count_closure_calls(self, args: Any, kwargs: Any) -> Any:
        """``step(closure)``'s arguments with the closure wrapped to count its calls (or None).

        The hook's ``args`` start with the optimizer itself.
        """
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1:2] or (None,))[0]
        if not callable(closure):
            return None

        def counted(*a: Any, **k: Any) -> Any:
            self._closure_calls += 1
            return closure(*a, **k)

        if "closure" in kwargs:
            return args, {**kwargs, "closure": counted}
        return (args[0], counted, *args[2:]), kwargs

    def _run_probes(self) -> None:
        if self.prober is None:
            return
        try:
            records = self.prober.after_step(self.step)
            seen = {s.site for r in records for s in r.sites}
            for name, info in self.prober.last_sites.items():
                if name in seen and name not in self.sites:
                    self.sites[name] = info
                    self._new_sites.append(info)
            if records and self._new_sites:  # the store must know a site before its probes
                self.transport.add_sites(self._new_sites)
                self._new_sites = []
            for record in records:
                self.transport.send_probe(record)
            if records and self._mark is not None:
                self._probe_mark = self._mark()
        except Exception:
            logger.exception("apmon probe failed after step %d; training continues", self.step)

    # -- end of APT probes and sweeps ----------------------------------------------------------

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        began = time.perf_counter()
        self._in_optimizer_step = False
        self._check_capture()
        # Records still held (a summary waiting for its loss, the last probe-set summary) go
        # first: records reach the host in step order.
        self._send_pending_probe()
        self._flush_and_mark()
        self._run_probes()
        self._run_probe_set()
        try:
            stats, inputs = self._stats, self._inputs.take()
            settle(list(stats.values()))  # an accelerator's values: one copy for the step
            if self.merge_ranks and self.schedule(self.step):
                stats = all_gather_stats(stats, self.process_group)
                inputs = gather_ranks(inputs, self.process_group)
                if not is_leader(self.process_group):
                    stats = {}
            if stats:
                self._pending = _train_summary(
                    self.step,
                    [to_wire(n, s, self.sketch_k) for n, s in stats.items()],
                    self._sample_indices,
                    # MLflow's lr/group<i>, and input/rms, input/max_abs (for ``strikes``)
                    {**learning_rates(optimizer), **as_scalars(inputs)} or None,
                )
            self._stats = {}
            self._sample_indices = None
            self._note_rate(reference_lr(optimizer))
            self._note_cost(began)
            self.step += 1
            self._arm()
        except Exception:
            logger.exception("apmon failed at the end of step %d; training continues", self.step)
        if self._losses and not self._in_step_function:
            # A decorated micro-batch function with optimizer.step() outside it: the values it
            # returned since the last step are this step's.
            self._attach_loss(sum(self._losses) / len(self._losses))
            self._losses = []
        if not self._holds_for_loss:
            self._flush_and_mark()
        if not self._in_step_function and not self._ends_own_steps:
            self._deliver_alerts()

    def _note_rate(self, rate: float) -> None:
        """Whether this step's learning rate surged: >= SURGE_RATE x the recent median.

        While it surges (``monitor.rate_surge``: a ramp, a jump, a steep warm-up), the step waits
        at its end for the host to judge its own summary, not only the previous step's: the
        divergence detector's heat rules judge each step's loss under that very condition, and
        their alert then arrives within the step whose loss raised it, a step earlier. At a
        steady rate the host's work on a step overlaps the next step, as before.
        """
        if rate > 0:
            self._rates.append(rate)
            self._surging = rate >= SURGE_RATE * statistics.median(self._rates)

    def _note_cost(self, began: float) -> None:
        """Tell the capture budget what this step cost the training thread (see budget.py).

        The step's wall time runs from the previous step's end to this one's; the monitor's
        own time is its capture and summary work in this step plus the previous step's send.
        """
        now = time.perf_counter()
        if self._recording and self._step_ended_at is not None:
            own = self._own + (now - began)
            self.capture_budget.note(self._full, own, now - self._step_ended_at)
        self._step_ended_at = now
        self._own = 0.0

    def _check_capture(self) -> None:
        """Say once, at the first summarised step, why nothing was captured, if nothing was."""
        if self._checked_capture or not self._recording:
            return
        self._checked_capture = True
        if self._stats:
            return
        if self._forwards == 0:
            logger.warning(
                "apmon: no forward of the watched model or of its submodules ran with autograd "
                "on in step %d; nothing is captured (watch the module whose forward runs; a "
                "torch.compile'd forward is not seen, see the README)",
                self.step,
            )
        else:
            logger.warning(
                "apmon: no activation site ran in step %d's forward (%d forwards seen); apmon "
                "captures ReLU-family activations (sign_mode=True adds GELU/SiLU)",
                self.step,
                self._forwards,
            )

    # -- fixed probe set (probeset.py) ---------------------------------------------------------

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """Labels (N,) of the next training forwards' batch, for per-class unit counts.

        ``None`` stops them.
        """
        self._labels = None if labels is None else labels.detach()

    def _run_probe_set(self) -> None:
        if self.probe_set is None or not self.probe_schedule(self.step):
            return
        self._evaluate_probe_set(self.step, diagram=self.diagrams.due(self.step))

    def _evaluate_probe_set(self, step: int, diagram: bool) -> None:
        if self.probe_set is None:
            return
        self._last_probe_step = step
        try:
            result = evaluate_probe_set(
                self._probe_target(), self.tracker, self.probe_set, self.site_filter
            )
            if self.merge_ranks:
                stats = all_gather_stats(result.stats, self.process_group)
                if not is_leader(self.process_group):
                    return
                result.stats = stats
            for name, info in result.sites.items():
                if name not in self.sites:
                    self.sites[name] = info
                    self._new_sites.append(info)
            if self._new_sites:
                self.transport.add_sites(self._new_sites)
                self._new_sites = []
            summary = probe_summary(step, result, self.sketch_k)
            if diagram:  # with merged ranks: the leader's own probe subset
                summary.diagram = sample_diagram(
                    self._probe_target(),
                    self.tracker,
                    self.probe_set,
                    self.site_filter,
                    self.apd_rows,
                )
                if summary.diagram is not None:
                    self.diagrams.last_step = step
            self._send_pending_probe()
            self._pending_probe = summary
        except Exception:
            logger.exception("apmon probe set failed at step %d; training continues", step)

    def _probe_target(self) -> nn.Module:
        """The module the probe set goes through: the one whose forward training runs.

        That is the watched model, or the submodule training calls directly (a LightningModule
        whose ``training_step`` calls ``self.net``); site names are the same either way.
        """
        return self._forward_module if self._forward_module is not None else self.model

    def _send_pending_probe(self) -> None:
        try:
            if self._pending_probe is not None:
                self.transport.send_summary(self._pending_probe)
        except Exception:
            logger.exception("apmon could not queue a probe-set summary; training continues")
        self._pending_probe = None

    def _final_diagram(self) -> None:
        """A diagram of the final parameters, unless the last evaluation there has one."""
        final = self.step - 1
        if self.probe_set is None or not self.diagrams.final_due(final):
            return
        pending = self._pending_probe
        if pending is None or pending.step != final:
            self._evaluate_probe_set(final, diagram=True)
            return
        try:  # the last evaluation saw the final parameters: its summary gets the diagram
            pending.diagram = sample_diagram(
                self._probe_target(), self.tracker, self.probe_set, self.site_filter, self.apd_rows
            )
        except Exception:
            logger.exception("apmon could not draw the final diagram; training is done anyway")

    # -- end of fixed probe set ---------------------------------------------------------------

    def _flush_pending(self) -> bool:
        """Send new sites and the held summary; whether a summary went out."""
        if self._new_sites:
            self.transport.add_sites(self._new_sites)
            self._new_sites = []
        if self._pending is not None:
            self.transport.send_summary(self._pending)
            self._pending = None
            return True
        return False

    def _flush_and_mark(self) -> None:
        """Send the held summary; follow a step's records with a mark when the transport has marks.

        The end of the next step waits for that mark (``_deliver_alerts``), or the end of this
        one while the rate surges (``SURGE_RATE``): by then the host has run the plugins over
        this step's records.
        """
        began = time.perf_counter()
        try:
            if self._flush_pending() and self._mark is not None:
                self._marks = [*self._marks[-1:], self._mark()]
        except Exception:
            logger.exception("apmon could not send step %d's summary", self.step)
        self._own += time.perf_counter() - began

    def _deliver_alerts(self) -> None:
        """At the end of a step: wait for the previous step's mark, then hand alerts over.

        A step with an APT probe or sweep also waits for the mark that followed them: the
        divergence detectors judge probes, and a probe's alert that came a step later would
        often come during the step in which the loss blows up (the scenario suite's residual
        nets). The host got the probe before the step's loss, so this wait is usually short.
        While the rate surges the step waits for its own summary's mark too (``SURGE_RATE``).
        The user's callback runs on the training thread and may raise to stop training.
        """
        if self._wait_for_mark is not None:
            previous = self._marks.pop(0) if len(self._marks) == 2 else None
            # The probe's mark was sent after the previous step's: waiting for it waits for both.
            target = previous if self._probe_mark is None else self._probe_mark
            probed, self._probe_mark = self._probe_mark is not None, None
            if self._surging and self._marks:  # this step's own summary (see SURGE_RATE)
                target = self._marks[-1]
            if target is not None:
                try:
                    # A probe's mark the whole way, even behind a host that is catching up
                    self._wait_for_mark(target, whole=probed)
                except Exception:
                    logger.exception("apmon could not wait for its host")
        alerts = sorted(self.transport.poll_alerts(), key=lambda alert: alert.step)
        self.alerts.extend(alerts)
        if self.on_alert is not None:
            for alert in alerts:
                self.on_alert(alert)

    def record_indices(self, indices: Any) -> None:
        """Note the data-set indices of this step's batch, before ``optimizer.step()``.

        Bad-batch alerts then name the samples; a tensor, array or sequence of ints is accepted.
        """
        try:
            if isinstance(indices, torch.Tensor):
                indices = indices.detach().reshape(-1).tolist()
            self._sample_indices = [int(i) for i in indices]
        except Exception:
            logger.exception("apmon could not read the batch's sample indices; ignored")

    def record_loss(self, loss: Any) -> None:
        """Attach the step's loss to the summary of the step that just ended.

        Call it after ``optimizer.step()``. From the first call on, each step's summary is held
        until its loss comes (and goes out at the next step), as the decorator does.
        """
        self._holds_for_loss = True
        self._attach_loss(loss)

    def _attach_loss(self, loss: Any) -> None:
        value = _as_float(loss)
        if value is not None and self._pending is not None:
            self._pending.loss = value if math.isfinite(value) else None

    def record_scalars(self, values: Mapping[str, Any]) -> None:
        """Attach named numbers to the step that just ended (call it after ``optimizer.step()``).

        They are stored as run-level measures of that step (``scalars`` plugin) and logged to
        MLflow. Names are 1-64 characters of letters, digits and ``_.:/-``; a bad name is a
        ValueError. Non-finite values are left out; at most ``MAX_SCALARS`` names per step.
        """
        clean: dict[str, float] = {}
        for key, raw in values.items():
            name = str(key)
            if not _SCALAR_NAME.fullmatch(name):
                raise ValueError(f"scalar name {name!r} must be 1-64 of [A-Za-z0-9_.:/-]")
            value = _as_float(raw)
            if value is not None and math.isfinite(value):
                clean[name] = value
        if self.step == 0 or not clean:
            return
        if self._pending is None:
            self._pending = StepSummary(step=self.step - 1, source="train", sites=[])
        merged = {**(self._pending.scalars or {}), **clean}
        if len(merged) > MAX_SCALARS:
            raise ValueError(f"at most {MAX_SCALARS} scalars per step, got {len(merged)}")
        self._pending.scalars = merged

    # -- use as decorator and context manager -------------------------------------------------

    def __call__(self, step_fn: F) -> F:
        """Decorate the per-step (or per-micro-batch) function; it returns the loss.

        The step's loss is the mean of the scalars returned by the calls since the previous
        step ended: one call per step, or one per micro-batch of gradient accumulation (return
        the micro-batch's unscaled loss). The step ends when a call returns in which
        ``optimizer.step()`` ran.
        """
        self._holds_for_loss = True

        @functools.wraps(step_fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = self.step
            self._in_step_function = True
            try:
                result = step_fn(*args, **kwargs)
            finally:
                self._in_step_function = False
            value = _as_float(result)
            if value is not None:
                self._losses.append(value)
            if self.step == start:  # a micro-batch of gradient accumulation: no step ended
                return result
            # The step ends here: its summary goes out with its loss, alerts are delivered.
            self.end_step()
            return result

        wrapper.monitor = self  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    def end_step(self, loss: Any = None) -> None:
        """End the step that just ran: attach its loss, send its records, deliver alerts.

        The loss is ``loss`` if given, else the mean of the values the decorated function
        returned since the previous step ended (one per micro-batch). The decorator and the
        integrations call this; a plain loop need not.
        """
        value = _as_float(loss)
        losses = [value] if value is not None else self._losses
        self._losses = []
        if losses:
            self._attach_loss(sum(losses) / len(losses))
        self._flush_and_mark()
        self._deliver_alerts()

    def hold_step_ends(self) -> None:
        """From now on each step ends at ``end_step``, not at ``optimizer.step()``."""
        self._holds_for_loss = True
        self._ends_own_steps = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook, deliver what is queued, run end-of-run work. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if not self.merge_ranks:  # ranks may close at different times: no collective here
            self._final_diagram()
        self.tracker.close()
        self._step_hook.remove()
        self._pre_step_hook.remove()
        for hook in self._compile_hooks:
            hook.remove()
        self._eager.close()
        for hook in self._probe_hooks:
            hook.remove()
        atexit.unregister(self._atexit)
        kernel_loader.log_forgone_saving()
        self._send_pending_probe()
        try:
            self._flush_pending()
            self.transport.finish(max(self.step - 1, 0))
        except Exception:
            logger.exception("apmon could not finish the run cleanly")
        # Alerts raised by the last steps and by end-of-run work reach the callback too; training
        # is over, so a callback that raises (to stop it) is only logged here.
        alerts = self.transport.poll_alerts()
        self.alerts.extend(alerts)
        if self.on_alert is not None:
            for alert in alerts:
                try:
                    self.on_alert(alert)
                except Exception:
                    logger.exception("on_alert raised for an alert delivered at close")

    def wait_for_mlflow(self, timeout: float | None = None) -> str | None:
        """After ``close``: wait until MLflow has the whole run; the MLflow run's id.

        Embedded, ``close`` returns once the apmon database has the run; the host process then
        brings MLflow up to date, attaches the report and ends the MLflow run in the background
        (unless ``Settings.mlflow_close_waits``). None: no MLflow run, or ``timeout`` seconds
        passed first.
        """
        wait = getattr(self.transport, "wait_for_host", None)
        if wait is not None and not wait(timeout):
            return None
        run_id: str | None = getattr(self.transport, "mlflow_run_id", None)
        return run_id


def _train_summary(
    step: int,
    sites: list[SiteSummary],
    sample_indices: list[int] | None,
    scalars: dict[str, float] | None,
) -> StepSummary:
    """A training step's summary; validated only where it holds what the user gave.

    The sites (``to_wire``) and scalars (finite learning rates and input scales under fixed
    names) are built valid here, and validating them again cost ~5 us a step; the batch's
    sample indices come from the user, and a step or site count out of the wire's range from a
    run set up oddly: those summaries are validated, and an invalid one is not sent.
    """
    values: dict[str, Any] = {
        "step": step,
        "source": "train",
        "sites": sites,
        "loss": None,
        "sample_indices": sample_indices,
        "scalars": scalars,
        "diagram": None,
    }
    if sample_indices is None and step >= 0 and len(sites) <= MAX_SITES:
        return StepSummary.trusted(**values)
    return StepSummary(**values)


def _register_atexit(monitor: Monitor) -> Callable[[], None]:
    """Close the run at interpreter exit if the user never did, without keeping it alive."""
    ref = weakref.ref(monitor)

    def close() -> None:
        live = ref()
        if live is not None:
            live.close()

    atexit.register(close)
    return close


def _warn_in_place_compile(model: nn.Module) -> None:
    """Say that modules compiled in place (``module.compile()``) are not captured reliably."""
    compiled = [n or "model" for n, m in model.named_modules() if m._compiled_call_impl is not None]
    if compiled:
        logger.warning(
            "apmon: %s compiled in place (module.compile()) runs apmon's hooks inside the compiled "
            "graph, where sites may be lost; compile with torch.compile(model) and watch that",
            ", ".join(compiled[:3]),
        )


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (tuple, list)) and value:
        return _as_float(value[0])
    return None


def _plain_config(config: dict[str, Any]) -> dict[str, str | int | float | bool | None]:
    return {
        str(k): v if isinstance(v, (str, int, float, bool)) or v is None else str(v)
        for k, v in config.items()
    }


def watch(
    model: nn.Module,
    optimizer: Any,
    *,
    settings: Settings | None = None,
    transport: Transport | None = None,
    mlflow_run_id: str | None = None,
    **options: Any,
) -> Monitor:
    """Monitor a training job, as a context manager or as a decorator of the step function.

    ``with watch(model, opt):`` or ``@watch(model, opt)``. With no server configured, results go
    to a local SQLite file and MLflow store.

    Options: ``every`` (int k or a step -> bool schedule; each captured step carries the
    detectors' statistics), ``capture_budget`` (the share of a plain step that counting
    patterns may cost, default 0.03: patterns are counted on every k-th captured step, k the
    smallest power of two that fits, see ``monitor.client.budget``; ``None`` counts them on every
    captured step), ``capture_rows`` (rows of each batch summarised, default 32; ``None``: all),
    ``include``/``exclude`` (site name
    patterns), ``sign_mode`` (also capture GELU/SiLU sites by preactivation sign), ``sketch_k``,
    ``name``, ``on_alert`` (a callable, called on the training thread, that may raise to stop
    training, or a policy: ``"warn"``, ``"raise"`` (``AlertRaised``), ``"stop"`` (sets
    ``should_stop``)), ``mlflow_run_id`` (log into this MLflow run), ``start_step`` (resume),
    ``config`` (logged with the run); a fixed probe set: ``probe_set`` (tensor, DataLoader or
    ``ProbeSet``) evaluated every ``probe_every`` steps (int k or schedule; see
    ``monitor.client.probeset``; a tuple ``(inputs, labels)`` or a DataLoader of labelled batches
    adds the sample-set measures and activation pattern diagrams of ``apd_rows`` samples on the
    evaluations ``apd_every`` selects, see ``monitor.client.diagram``); ``merge_ranks`` (merge
    data-parallel ranks' statistics exactly, rank 0 ships; ``process_group``); APT probes (see
    ``monitor.client.apt``): ``apt_every``
    (int k or schedule; the thesis probes every 8 steps; default ``"rate"``: a probe when the
    learning rate rose by more than 10% since the last one, else every 25 steps, ``RateTriggered``;
    None: no probes), ``sweep_every`` (sensitivity sweeps),
    ``sweep_etas`` (trial learning rates, default 16 log-spaced in 1e-4..1e2), ``probe_rows``
    (probe only the first rows of the batch; default the whole batch). ``mlflow_run_id``: the
    MLflow run to log into; default the active one when mlflow is imported, else a new run.
    ``settings.compiled_kernels`` (``APMON_COMPILED_KERNELS``) says when this process loads the
    compiled CPU kernels (``monitor.client.kernel_loader``).
    """
    settings, mlflow_run_id = link_mlflow_run(settings or Settings(), mlflow_run_id)
    kernel_loader.set_policy(settings.compiled_kernels)
    if transport is None:
        if settings.server_url:
            from monitor.client.http import HttpTransport

            transport = HttpTransport(settings)
        else:
            from monitor.client.embedded import EmbeddedTransport

            transport = EmbeddedTransport(settings)
    return Monitor(model, optimizer, transport, mlflow_run_id=mlflow_run_id, **options)
