"""ActCoolLR: a learning-rate scheduler that steers the activation-pattern temperature."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from monitor.client.apt import (
    SitePatterns,
    StepBatch,
    capture_batch,
    count_changes,
    pattern_collector,
    probe_forward,
)
from monitor.client.capture import ModuleTracker, SiteFilter
from monitor.client.handle import Monitor
from monitor.schedulers import actcool_model as m
from monitor.schema import AlertValue

logger = logging.getLogger(__name__)

DIVERGENCE_KIND = "actcool_divergence"
SCALAR_PREFIX = "actcool/"
# Section 3.3: "T_start = 3.17, i.e. D = 89%"; Eq. 3.45's gamma (see ActCoolLR for the choice).
T_START = 3.17
GAMMA = 1.0
# Trial rates more than this many times the step's own count as changing every pattern (the
# update direction cannot be scaled further in float32).
_MAX_FACTOR = 1e30
# Keys of ``state_dict``: the schedule's own numbers and its hyperparameters, nothing live.
_STATE_KEYS = (
    "last_epoch",
    "base_lrs",
    "_last_lr",
    "_step_count",
    "total_steps",
    "t_start",
    "gamma",
    "eta_min",
    "remeasure_init",
    "initlrs",
    "error_num",
    "error_muthresh",
    "remeasure_jump",
    "max_while_loop",
    "probing_step_size",
    "sigma",
    "mu",
    "error_count",
    "full_updates",
    "initialised",
    "probe_forwards",
)


class ActCoolDivergence(RuntimeError):
    """The model asked for a learning rate above 1e10 (or NaN): the run is diverging.

    ``alert`` is the divergence alert, also given to the attached monitor.
    """

    def __init__(self, message: str, alert: AlertValue) -> None:
        super().__init__(message)
        self.alert = alert


def patterns_probability(before: SitePatterns, after: SitePatterns) -> float | None:
    """The change probability P of the mean temperature over sites.

    Per site D_l = changed rows / rows and T_l = -log2(1 - D_l); P = 1 - 2^-mean(T_l), i.e. one
    minus the geometric mean of the sites' unchanged fractions (Section 3.3 controls "the mean
    temperature over all layers"). 1 when some site changed every row; None without sites.
    """
    changes = count_changes(before, after)
    stay: list[float] = []
    for name, changed in changes.items():
        rows = before.rows(name)
        if changed is None or rows == 0:
            continue
        stay.append(1.0 - changed / rows)
    if not stay:
        return None
    if min(stay) <= 0.0:
        return 1.0
    return 1.0 - math.exp(sum(math.log(s) for s in stay) / len(stay))


def find_monitor(optimizer: torch.optim.Optimizer) -> Monitor | None:
    """The open ``Monitor`` watching ``optimizer`` (the owner of one of its step post-hooks).

    Reads torch's private ``_optimizer_step_post_hooks``, so that ``Monitor`` needs no new
    attribute; None where that attribute is missing.
    """
    hooks = getattr(optimizer, "_optimizer_step_post_hooks", {})
    for hook in hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, Monitor) and not owner.closed:
            return owner
    return None


class ActCoolLR(LRScheduler):
    """Learning rates that make the activation-pattern temperature follow a cooling curve.

    Thesis (Hartmann 2025) Section 3.3 and Appendix A.4. The probability that a ReLU pattern
    changes in one step is modelled as P(eta) = (1 + erf((log eta - mu) / (sigma sqrt2))) / 2
    (Eq. 3.17). Before step t the scheduler sets eta_t = eta(0.99 P_wish(t)) with
    P_wish(t) = 1 - 2^-T(t) and T(t) = T_start (1 - t/t_max)^gamma (Eq. 3.45), clamped below at
    ``eta_min``; above 1e10 or NaN it raises ``ActCoolDivergence`` (and alerts the monitor).

    Measurements. Every ``probing_step_size`` steps the step's own batch is forwarded once more
    after ``optimizer.step()`` (same inputs and dropout masks, batch norm buffers untouched; see
    ``monitor.client.apt``), and compared with the patterns of the training forward itself,
    recorded on the way: P_now at the step's eta. Other learning rates are measured with the
    step's update direction, theta_t + (eta / eta_t) (theta_{t+1} - theta_t), which is the step
    that eta would have made for SGD (with momentum) and Adam-type optimizers. Nothing is ever
    written to the parameters, buffers, RNG or optimizer state, so training is bit-identical to
    the same learning rates set by hand.

    Model upkeep. On a measured step, P_now in {0, 1} or the first measurement trigger a full
    update (Appendix A.4 step 4, ``actcool_model.full_update``); otherwise mu is moved to
    log eta_now - sigma sqrt2 erfinv(2 P_now - 1); a move larger than ``error_muthresh``
    counts as an error, and the ``error_num``-th error since the last full update triggers a
    full update instead. A full update also uses the step's own (eta_now, P_now) pair (the
    appendix's optional "previous measurement").

    Table A.1 hyperparameters, named as there: ``eta_min`` (1e-10, smallest learning rate),
    ``remeasure_init`` ((0.25, 0.5, 0.75), probabilities measured in a full update),
    ``initlrs`` (10^linspace(-4, 2, 25), fallback grid when those all give P in {0, 1}),
    ``error_num`` (5), ``error_muthresh`` (2.5), ``remeasure_jump`` (2, search factor),
    ``max_while_loop`` (100, search bound), ``probing_step_size`` (8). Also ``t_start`` (3.17)
    and ``gamma``.

    Choices where the thesis is ambiguous:

    - Temperature in bits, T = -log2(1 - P): the thesis pairs T_start = 3.17 with D = 89%,
      which holds for log2 (with ln, 3.17 would be D = 96%). ``monitor.client.apt`` reports
      T in nats; the ``actcool/T_*`` scalars are in bits.
    - gamma defaults to 1 (linear temperature, Fig. 3.22 right and Table 3.1); the text also
      says gamma = 4 "yields good results in most cases", but (1 - t/t_max)^4 cools *faster*
      than linear, against the stated intent of spending longer at high temperature.
    - ``_search_eta``'s printed break condition is read as its loop condition, and the SVD's
      "threshold of 10" as a bound on the condition number (``actcool_model.search_eta``,
      ``actcool_model.fit`` say why).
    - The error counter counts since the last full update (Section 3.3: "more than 4 times
      since the last model update"); Table A.1 says "consecutive".
    - Step 0 runs at the optimizer's own learning rate: the model needs one update direction
      before it can predict a rate; its full update is fitted from step 0's direction, and the
      schedule takes over at step 1. Choose the optimizer's lr small enough to be harmless.
    - Each measured step costs one extra forward without autograd (the "before" patterns come
      from the training forward, as in App. A.4 step 2); a full update costs one per trial
      rate, typically 3 to 10; ``probe_forwards`` counts them.
    - Trial rates scale the step's update, which float32 parameters resolve only down to about
      1e-7 of their size: a step run at a rate near ``eta_min`` gives a direction of rounding
      noise, so keep ``eta_min`` where the update is still visible if the schedule can get there
      (the thesis's 1e-10 is reached only at t = t_max, where T = 0).

    With a monitor (``monitor=`` or found on the optimizer), after every ``step()`` the state of
    the step that ended goes to ``Monitor.record_scalars``: ``actcool/T_target``,
    ``actcool/T_measured`` (measured steps), ``actcool/P_measured``, ``actcool/mu``,
    ``actcool/sigma``, ``actcool/full_updates``, ``actcool/lr``.

    Call ``close()`` to remove the scheduler's hooks from the model and optimizer.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        model: nn.Module | None = None,
        *,
        monitor: Monitor | None = None,
        t_start: float = T_START,
        gamma: float = GAMMA,
        eta_min: float = m.ETA_MIN,
        remeasure_init: Sequence[float] = m.REMEASURE_INIT,
        initlrs: Sequence[float] = m.INITLRS,
        error_num: int = m.ERROR_NUM,
        error_muthresh: float = m.ERROR_MUTHRESH,
        remeasure_jump: float = m.REMEASURE_JUMP,
        max_while_loop: int = m.MAX_WHILE_LOOP,
        probing_step_size: int = m.PROBING_STEP_SIZE,
        include: Sequence[str] = ("*",),
        exclude: Sequence[str] = (),
        last_epoch: int = -1,
    ) -> None:
        if total_steps < 1 or probing_step_size < 1:
            raise ValueError("total_steps and probing_step_size must be >= 1")
        if t_start <= 0 or gamma <= 0:
            raise ValueError(f"t_start and gamma must be positive, got {t_start}, {gamma}")
        self.monitor = monitor if monitor is not None else find_monitor(optimizer)
        if model is None and self.monitor is not None:
            model = self.monitor.model
        if model is None:
            raise ValueError("ActCoolLR needs the model (model=...) or a monitor watching it")
        self.model = model
        self.total_steps = int(total_steps)
        self.t_start = float(t_start)
        self.gamma = float(gamma)
        self.eta_min = float(eta_min)
        self.remeasure_init = tuple(float(p) for p in remeasure_init)
        self.initlrs = tuple(float(eta) for eta in initlrs)
        self.error_num = int(error_num)
        self.error_muthresh = float(error_muthresh)
        self.remeasure_jump = float(remeasure_jump)
        self.max_while_loop = int(max_while_loop)
        self.probing_step_size = int(probing_step_size)
        self.sigma = m.SIGMA_INIT
        self.mu = m.MU_INIT
        self.error_count = 0
        self.full_updates = 0
        self.initialised = False
        self.probe_forwards = 0
        # Per step, reset as it goes: what the step measured.
        self.p_measured: float | None = None
        self.last_scalars: dict[str, float] = {}
        self._site_filter = SiteFilter(tuple(include), tuple(exclude))
        self._tracker = ModuleTracker(model, lambda *_: None, sign_mode=False)
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._batch: StepBatch | None = None
        self._before: SitePatterns | None = None
        self._theta: dict[str, torch.Tensor] = {}
        self._eta_ref = 0.0
        self._probing = False
        self._hooks = [
            model.register_forward_pre_hook(self._capture, with_kwargs=True, prepend=True),
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        super().__init__(optimizer, last_epoch)

    # -- the schedule ----------------------------------------------------------------------

    def target_temperature(self, step: int) -> float:
        """T(step) of Eq. 3.45, in bits."""
        return m.temperature_target(step, self.total_steps, self.t_start, self.gamma)

    def planned_lr(self, step: int) -> float:
        """The learning rate for ``step`` from the current model (App. A.4 step 5).

        Raises ``ActCoolDivergence`` when it is above 1e10 or NaN.
        """
        p_wish = m.probability_of_temperature(self.target_temperature(step))
        eta = m.learning_rate(m.SAFETY * p_wish, self.sigma, self.mu)
        if math.isnan(eta) or eta > m.ETA_OUT_OF_RANGE:
            message = (
                f"ActCoolLR: learning rate {eta:.3g} out of range at step {step} "
                f"(sigma={self.sigma:.4g}, mu={self.mu:.4g}): the training run is diverging"
            )
            alert = AlertValue(
                kind=DIVERGENCE_KIND,
                step=max(step - 1, 0),
                severity="critical",
                message=message,
                evidence={"eta": str(eta), "sigma": self.sigma, "mu": self.mu},
            )
            raise ActCoolDivergence(message, alert)
        return max(eta, self.eta_min)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """Learning rates of the coming step: the optimizer's own at step 0, then the model's."""
        if self.last_epoch <= 0:
            return [float(lr) for lr in self.base_lrs]
        eta = self.planned_lr(self.last_epoch)
        reference = float(self.base_lrs[0]) or 1.0
        return [eta * (float(base) / reference) for base in self.base_lrs]

    def step(self, epoch: int | None = None) -> None:
        """Set the learning rate of the next step; report the step that ended to the monitor."""
        if epoch is not None:
            raise ValueError("ActCoolLR does not support step(epoch)")
        initial = not hasattr(self, "_last_lr")
        ended = self.last_epoch
        used = float(self._last_lr[0]) if not initial else 0.0
        measured, self.p_measured = self.p_measured, None
        try:
            super().step()
        except ActCoolDivergence as exc:
            self._report_divergence(exc.alert)
            raise
        if initial:
            return
        scalars = {
            "T_target": self.target_temperature(ended),
            "mu": self.mu,
            "sigma": self.sigma,
            "full_updates": float(self.full_updates),
            "lr": used,
        }
        if measured is not None:
            scalars["P_measured"] = measured
            scalars["T_measured"] = m.temperature_of_probability(measured)
        self.last_scalars = scalars
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.record_scalars({SCALAR_PREFIX + k: v for k, v in scalars.items()})

    def _report_divergence(self, alert: AlertValue) -> None:
        logger.error("%s", alert.message)
        monitor = self.monitor
        if monitor is None or monitor.closed:
            return
        monitor.record_scalars({SCALAR_PREFIX + "diverged": 1.0})
        monitor.alerts.append(alert)
        if monitor.on_alert is not None:
            monitor.on_alert(alert)

    # -- measurements (hooks) --------------------------------------------------------------

    def _measured_step(self, step: int) -> bool:
        return step >= 0 and step % self.probing_step_size == 0

    def _capture(self, _model: nn.Module, args: Any, kwargs: Any) -> None:
        """Forward pre-hook: on a measured step, record the training forward's patterns."""
        if self._probing or not torch.is_grad_enabled() or not self._measured_step(self.last_epoch):
            return
        self._batch = capture_batch(self.last_epoch, args, kwargs)
        self._before = SitePatterns()
        self._tracker.on_site = pattern_collector(self._before, self._site_filter)
        self._tracker.armed = True

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer pre-hook: stop recording; keep theta_t and eta_t for trial rates."""
        self._tracker.armed = False
        self._theta = {}
        if self._batch is None or self._batch.step != self.last_epoch:
            self._batch = None
            return
        self._eta_ref = float(self.optimizer.param_groups[0]["lr"])
        self._theta = {
            self._names[id(p)]: p.detach().clone()
            for group in self.optimizer.param_groups
            for p in group["params"]
            if id(p) in self._names
        }

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Optimizer post-hook: measure P at the step's eta and keep the model up to date."""
        batch, before, theta = self._batch, self._before, self._theta
        self._batch, self._before, self._theta = None, None, {}
        if batch is None or before is None or not theta or self._eta_ref <= 0:
            return
        p_now = patterns_probability(before, self._forward(batch, None))
        if p_now is None:
            logger.warning("ActCoolLR found no ReLU sites in the model; nothing to steer by")
            return
        self.p_measured = p_now
        eta_now = self._eta_ref
        update = m.fast_update(
            self.sigma,
            self.mu,
            self.error_count,
            eta_now,
            p_now,
            error_num=self.error_num,
            error_muthresh=self.error_muthresh,
        )
        self.mu, self.error_count = update.mu, update.error_count
        if update.full or not self.initialised:
            self._full_update(batch, before, theta, (eta_now, p_now))

    def _full_update(
        self,
        batch: StepBatch,
        before: SitePatterns,
        theta: dict[str, torch.Tensor],
        last: tuple[float, float],
    ) -> None:
        live = dict(self.model.named_parameters())
        delta = {name: live[name].detach() - p for name, p in theta.items()}
        trial = {name: torch.empty_like(p) for name, p in theta.items()}

        def measure(eta: float) -> float:
            factor = eta / self._eta_ref
            if not factor < _MAX_FACTOR:  # past what the parameters' dtype can scale: chaos
                return 1.0
            for name, start in theta.items():
                torch.add(start, delta[name], alpha=factor, out=trial[name])
            p = patterns_probability(before, self._forward(batch, trial))
            return 1.0 if p is None else p

        result = m.full_update(
            measure,
            self.sigma,
            self.mu,
            last,
            remeasure_init=self.remeasure_init,
            initlrs=self.initlrs,
            remeasure_jump=self.remeasure_jump,
            max_while_loop=self.max_while_loop,
            eta_min=self.eta_min,
        )
        self.full_updates += 1
        self.error_count = 0
        self.initialised = True
        if result.model is not None:
            self.sigma, self.mu = result.model
        logger.debug(
            "ActCoolLR full update at step %d: %d measurements, sigma=%.4g mu=%.4g",
            batch.step,
            len(result.etas),
            self.sigma,
            self.mu,
        )

    def _forward(self, batch: StepBatch, params: dict[str, torch.Tensor] | None) -> SitePatterns:
        self._probing = True
        self.probe_forwards += 1
        try:
            return probe_forward(
                self.model,
                self._tracker,
                self._site_filter,
                batch,
                batch.args,
                batch.kwargs,
                params,
            )
        finally:
            self._probing = False

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The schedule's numbers and hyperparameters (no model, hooks or monitor)."""
        return {key: getattr(self, key) for key in _STATE_KEYS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the optimizer's learning rates are set to match."""
        for key in _STATE_KEYS:
            if key in state_dict:
                setattr(self, key, state_dict[key])
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=False):
            group["lr"] = lr

    def close(self) -> None:
        """Remove the scheduler's hooks from the model and the optimizer."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._tracker.close()
