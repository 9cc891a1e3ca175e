"""APT probes and learning-rate sensitivity sweeps: a step's own batch forwarded again, aside."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from monitor.client.capture import ModuleTracker
from monitor.client.schedules import Schedule
from monitor.schema import ProbeRecord, SiteInfo, SiteKind, SiteMode, SiteProbe

logger = logging.getLogger(__name__)


def log_grid(low: float, high: float, points: int) -> tuple[float, ...]:
    """``points`` learning rates evenly spaced in log between ``low`` and ``high`` (inclusive)."""
    if not 0 < low <= high or points < 1:
        raise ValueError(f"need 0 < low <= high and points >= 1, got {low}, {high}, {points}")
    if points == 1:
        return (low,)
    step = (math.log(high) - math.log(low)) / (points - 1)
    return tuple(math.exp(math.log(low) + i * step) for i in range(points))


# The thesis grid (Section 3.2.3) is 1e-4 .. 1e2 with 50 points; 16 points over the same range
# keep a sweep cheap and still give the transition fit several points inside the transition.
THESIS_SWEEP_ETAS = log_grid(1e-4, 1e2, 50)
DEFAULT_SWEEP_ETAS = log_grid(1e-4, 1e2, 16)
# Thesis Appendix A.4, Table A.1: probing_step_size = 8.
DEFAULT_APT_EVERY = 8
# ``watch()``'s default APT schedule (``RateTriggered``): a probe when the learning rate rose by
# more than 10% since the last probe, else one every 25 steps (costs: benchmarks/scenarios/
# probe_cost.py and the README there).
DEFAULT_PROBE_BASELINE = 25
DEFAULT_PROBE_RISE = 0.1


class RateTriggered:
    """A cost-budgeted APT schedule: probe when the learning rate rose, else at a slow cadence.

    Step s is probed when its learning rate (``reconsider``, as its forward starts; else that of
    the last step seen, ``observe``) is more than ``1 + rise`` times that of the last probe, or
    ``every`` steps have passed since the last probe (the first probe: step ``start``). A rising
    rate is where the transition position z = (ln eta - mu) / sigma moves (thesis Sec. 3.2.4),
    so probes come densely while the rate climbs (every 2-3 steps of a 4-8% per step ramp) and
    rarely while it holds or falls. Each step's answer is fixed the first time it is asked
    (a "no" may still turn into a "yes" at ``reconsider``), so that every part of the client
    agrees on it; it is a plain ``step -> bool`` callable otherwise (STYLE.md 5), fed by the
    prober.
    Measured (``python benchmarks/scenarios/probe_cost.py --rounds 5``, one thread): the default
    probes add 0.1% (2.5% from the fastest rounds) to a plain step of an MLP 3072-512x3 at batch
    128 and 3.8% (4.1%) to a small digits CNN's at a steady rate; 10.5% and 15.1% while the rate
    climbs 4% per step.
    """

    def __init__(
        self,
        every: int = DEFAULT_PROBE_BASELINE,
        rise: float = DEFAULT_PROBE_RISE,
        start: int = 0,
    ) -> None:
        if every < 1 or not rise > 0:
            raise ValueError(f"need every >= 1 and rise > 0, got {every}, {rise}")
        self.every = every
        self.rise = rise
        self.start = start
        self._lr: float | None = None  # the rate of the last step seen
        self._probed_lr: float | None = None
        self._probed_step: int | None = None
        self._decided: tuple[int, bool] | None = None

    def __call__(self, step: int) -> bool:
        """Whether step ``step`` is probed (decided on the rate of the last step seen)."""
        if self._decided is not None and self._decided[0] == step:
            return self._decided[1]
        due = step >= self.start and (
            self._probed_step is None or step - self._probed_step >= self.every or self._rose()
        )
        self._decided = (step, due)
        return due

    def _rose(self) -> bool:
        return (
            self._lr is not None
            and self._probed_lr is not None
            and self._lr > (1 + self.rise) * self._probed_lr
        )

    def observe(self, step: int, lr: float) -> None:
        """The learning rate that step ``step`` used (read before its optimizer step)."""
        self._lr = lr

    def reconsider(self, step: int, lr: float) -> None:
        """Step ``step``'s own rate, read as its training forward starts.

        The step may have been asked about at the end of the step before, when its rate was
        not set yet (a scheduler steps, or a loop sets the rate, after that): a "no" turns into
        a "yes" when this rate rose past the trigger, so the very step whose rate jumped is
        probed. Before its forward nothing has acted on the "no" but the arming of the
        forward, which the step's summary arms anyway at ``watch()``'s defaults.
        """
        self._lr = lr
        if self._decided is not None and self._decided[0] == step and not self._decided[1]:
            self._decided = (step, step >= self.start and self._rose())

    def probed(self, step: int, lr: float) -> None:
        """A probe ran at ``step`` with rate ``lr``: the reference for the next rise."""
        self._probed_step, self._probed_lr = step, lr


def apt_temperature(d: float) -> float:
    """Activation Pattern Temperature T = -ln(1 - D) of a change fraction D.

    Thesis Definition 6, Eq. 3.16; infinite when every row changed.
    """
    if d >= 1.0:
        return math.inf
    return -math.log1p(-d)


def unit_dim(x: torch.Tensor) -> int:
    """The dimension of a site's units, as in ``capture.rows_of``.

    It is 1 for dense (N, d) and conv (N, C, ...) inputs, the last for sequences (N, T, d) and
    for a single row (d,).
    """
    return 1 if x.dim() == 2 or x.dim() >= 4 else x.dim() - 1


def site_kind_of(x: torch.Tensor) -> SiteKind:
    """Dense, sequence or conv, as in ``capture.rows_of``."""
    return "dense" if x.dim() <= 2 else "seq" if x.dim() == 3 else "conv"


def changed_rows(before: torch.Tensor, after: torch.Tensor, dim: int = 1) -> int:
    """Rows whose pattern differs between two boolean masks of the same rows.

    ``dim`` holds the units; a row is every index of the other dimensions (e.g. a sample and
    position of a conv). Masks stay in the activation's own layout: no permuted copy of conv
    activations.
    """
    return int((before != after).any(dim=dim).sum())


@dataclass
class SitePatterns:
    """Patterns of one probe forward, per site in call order.

    Each site has its boolean mask (preactivation > 0, in the activation's layout) and the
    dimension of its units.
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)
    infos: dict[str, SiteInfo] = field(default_factory=dict)
    nonfinite: bool = False

    def rows(self, name: str) -> int:
        """Rows of a site: elements of its mask over its units."""
        mask = self.masks[name]
        units = mask.shape[self.dims.get(name, 1)] if mask.dim() else 1
        return mask.numel() // units if units else 0


@dataclass
class StepBatch:
    """The inputs of a training forward and the state it ran in, for replaying it.

    That state is the RNG state it started from (same dropout masks) and its autocast setting
    (device type, dtype, enabled), so that probes compute as the training forward did.
    """

    step: int
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    cpu_rng: torch.Tensor
    cuda_rng: dict[int, torch.Tensor]
    autocast: tuple[str, torch.dtype, bool] = ("cpu", torch.bfloat16, False)
    # The module whose forward ran (None: the watched model) and its path in the model.
    module: nn.Module | None = None
    path: str = ""


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The first dimension of the first tensor input (None without one)."""
    tensors = _tensors((args, kwargs))
    if not tensors or tensors[0].dim() == 0:
        return None
    return int(tensors[0].shape[0])


def take_rows(args: tuple[Any, ...], kwargs: dict[str, Any], rows: int | None) -> tuple[Any, Any]:
    """The first ``rows`` samples of a batch.

    Every tensor whose first dimension is the batch size (that of the first tensor input) is
    cut; other values pass unchanged.
    """
    batch = batch_size(args, kwargs)
    if rows is None or batch is None or rows >= batch:
        return args, kwargs

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[:rows]
        return value

    return tree_map(cut, args), tree_map(cut, kwargs)


def capture_batch(
    step: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    module: nn.Module | None = None,
    path: str = "",
) -> StepBatch:
    """Keep references to a training forward's inputs and the RNG states it starts from.

    The states kept are the CPU generator's and that of every CUDA device among the inputs.
    ``module`` and ``path`` name a submodule whose forward was the outermost one.
    """
    tensors = _tensors((args, kwargs))
    devices = {t.device.index or 0 for t in tensors if t.is_cuda}
    cuda = {d: torch.cuda.get_rng_state(d) for d in sorted(devices)}
    kind = "cuda" if devices else "cpu"
    autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
    return StepBatch(step, args, kwargs, torch.get_rng_state(), cuda, autocast, module, path)


@contextmanager
def replayed_rng(batch: StepBatch) -> Iterator[None]:
    """Run a block from the RNG state of ``batch``'s training forward (same dropout masks).

    Afterwards the generators are put back exactly where they were.
    """
    cpu = torch.get_rng_state()
    cuda = {d: torch.cuda.get_rng_state(d) for d in batch.cuda_rng}
    torch.set_rng_state(batch.cpu_rng)
    for device, state in batch.cuda_rng.items():
        torch.cuda.set_rng_state(state, device)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        for device, state in cuda.items():
            torch.cuda.set_rng_state(state, device)


SiteFilterFn = Callable[[str], bool]


def probe_forward(
    model: nn.Module,
    tracker: ModuleTracker,
    site_filter: SiteFilterFn,
    batch: StepBatch,
    args: Any,
    kwargs: Any,
    params: dict[str, torch.Tensor] | None = None,
) -> SitePatterns:
    """Forward without autograd from ``batch``'s RNG state; collect each site's pattern mask.

    The mask of a site is preactivation > 0 per row.

    ``params`` replaces parameters by name (``torch.func.functional_call``); the live parameters
    are never written. Buffers are cloned and passed in, so batch norm runs in whatever mode the
    model is in (training mode during training: batch statistics, as in the thesis) while its
    running statistics and ``num_batches_tracked`` stay untouched. A module without buffers
    probed at its live parameters (the APT "after" forward) is called directly.
    """
    found = SitePatterns()
    module = model if batch.module is None else batch.module
    state = {name: b.clone() for name, b in module.named_buffers()}
    if params:
        prefix = f"{batch.path}." if batch.module is not None else ""
        state.update(
            (name[len(prefix) :], p) for name, p in params.items() if name.startswith(prefix)
        )
    device, dtype, enabled = batch.autocast
    with (
        torch.no_grad(),
        torch.autocast(device, dtype=dtype, enabled=enabled),
        replayed_rng(batch),
        tracker.probing(pattern_collector(found, site_filter)),
    ):
        if state:
            functional_call(module, state, args, kwargs)
        else:  # nothing to swap in (no buffers, live parameters): the plain call, less overhead
            module(*args, **(kwargs or {}))
    return found


def pattern_collector(
    found: SitePatterns, site_filter: SiteFilterFn
) -> Callable[[str, SiteMode, torch.Tensor], None]:
    """A tracker callback that stores each site's pattern mask (and info) in ``found``."""

    def on_site(name: str, mode: SiteMode, preactivation: torch.Tensor) -> None:
        if not site_filter(name):
            return
        with torch.no_grad():
            x = preactivation.detach()
            # One reduction instead of an elementwise test: the sum is non-finite iff some value
            # is (or, harmlessly, when finite preactivations sum past float range).
            if not found.nonfinite and not math.isfinite(float(x.sum())):
                found.nonfinite = True
            found.masks[name] = x > 0
        dim = unit_dim(x)
        found.dims[name] = dim
        units = int(x.shape[dim]) if x.dim() else 1
        found.infos[name] = SiteInfo(name=name, kind=site_kind_of(x), mode=mode, units=units)

    return on_site


def count_changes(before: SitePatterns, after: SitePatterns) -> dict[str, int | None]:
    """Per site of ``before``, the rows whose pattern differs in ``after``.

    None where the site is missing from ``after`` or has other row counts (data-dependent
    control flow).
    """
    counts: dict[str, int | None] = {}
    for name, mask in before.masks.items():
        other = after.masks.get(name)
        dim = before.dims.get(name, 1)
        same = other is not None and other.shape == mask.shape and mask.dim() > dim
        counts[name] = changed_rows(mask, other, dim) if same and other is not None else None
    return counts


def site_probes(
    before: SitePatterns, changes: Sequence[dict[str, int | None]], etas: Sequence[float]
) -> list[SiteProbe]:
    """Wire records of the changed-row counts, one count per eta (D = changed / rows).

    Sites without rows or without a count for every eta are left out.
    """
    probes = []
    for name in before.masks:
        counts = [change.get(name) for change in changes]
        rows = before.rows(name)
        if rows == 0 or any(c is None for c in counts):
            continue
        changed = [int(c) for c in counts if c is not None]
        probes.append(SiteProbe(site=name, rows=rows, etas=list(etas), changed=changed))
    return probes


class AptProber:
    """APT probes and sensitivity sweeps on scheduled steps (thesis Section 3.2).

    Step t's own batch is forwarded twice more, with the same inputs and the same dropout
    masks (the RNG state of the training forward is replayed): once before ``optimizer.step()``
    (parameters theta_t) and once after it (theta_{t+1} = Opt(theta_t, eta_t)). Per site,
    D = (rows whose pattern changed) / rows is the empirical P(D(eta_t)) of Definition 5 and
    T = -ln(1 - D) the temperature of Definition 6.

    A sweep measures D(eta) for trial rates eta with the step's update direction: with
    delta = theta_{t+1} - theta_t (everything the optimizer did: momentum, Adam moments, weight
    decay, all linear in the learning rate given the optimizer state), the trial parameters are
    theta_t + (eta / eta_t) * delta. eta_t is the learning rate of the first parameter group;
    other groups keep their ratio to it, as a learning-rate scheduler scales them, so the APT
    probe is the sweep's point at eta = eta_t.

    When the probe rows are the whole batch, the "before" patterns are those of the training
    forward itself (recorded through the tracker, as thesis Appendix A.4 does: one extra forward
    per probe): same inputs, parameters, batch statistics and dropout masks as a replay. On a
    sub-batch (``probe_rows``) a "before" forward on the probe rows is run instead, since batch
    norm's batch statistics and the dropout masks depend on the rows forwarded.
    """

    def __init__(
        self,
        model: nn.Module,
        tracker: ModuleTracker,
        site_filter: SiteFilterFn,
        *,
        apt: Schedule,
        sweep: Schedule,
        etas: Sequence[float] = DEFAULT_SWEEP_ETAS,
        probe_rows: int | None = None,
        rate: Callable[[], float] | None = None,
    ) -> None:
        if probe_rows is not None and probe_rows < 1:
            raise ValueError(f"probe_rows must be >= 1, got {probe_rows}")
        if not etas or any(not eta > 0 for eta in etas):
            raise ValueError("sweep etas must be positive and not empty")
        self.model = model
        self.tracker = tracker
        self.site_filter = site_filter
        self.apt = apt
        self.sweep = sweep
        self.etas = tuple(float(eta) for eta in etas)
        self.probe_rows = probe_rows
        # The optimizer's current rate, asked when a training forward starts: a schedule that
        # follows the rate then probes the very step whose rate rose (a scheduler's step, or
        # a rate set at the top of the loop, comes before the forward), not the step after it.
        self.rate = rate
        self.probing = False
        self._names = {id(p): name for name, p in model.named_parameters()}
        self._batch: StepBatch | None = None
        self._before: SitePatterns | None = None
        self._params: dict[str, torch.Tensor] = {}
        self._lr = 0.0
        self.last_sites: dict[str, SiteInfo] = {}
        self._training: SitePatterns | None = None
        # The site callback of the training forward being kept for probes (None: none is).
        self.collecting: Callable[[str, SiteMode, torch.Tensor], None] | None = None
        self._in_step = False  # between the optimizer's pre- and post-hook of a probed step
        self._in_step_seen = False
        self._warned = False
        # What ``capture`` replaced, until the forward's end says whether it had sites.
        self._saved: tuple[Any, ...] | None = None

    def scheduled(self, step: int) -> bool:
        """Whether step ``step`` is probed or swept."""
        return self.apt(step) or self.sweep(step)

    def _tell_schedules(self, method: str, step: int, lr: float) -> None:
        """Give the rate of ``step`` to the schedules that follow it (``RateTriggered``).

        ``method``: "observe" (before the optimizer step) or "reconsider" (forward start).
        """
        for schedule in (self.apt, self.sweep):
            told = getattr(schedule, method, None)
            if told is not None:
                told(step, lr)

    def capture(
        self,
        step: int,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        module: nn.Module | None = None,
        path: str = "",
    ) -> None:
        """Keep the inputs of a training forward of a scheduled step (the tracker's on_forward).

        Only forwards with autograd on count. The probed batch is the last forward before
        ``optimizer.step()`` or, if a forward runs inside it (a closure: LBFGS, Lightning's
        automatic optimization), the first forward inside it, which still sees theta_t; later
        evaluations of the closure are ignored. With gradient accumulation that is the step's
        last micro-batch either way. ``module``/``path``: the outermost module that ran, when it
        is a submodule of the watched model.
        """
        if self.probing or not torch.is_grad_enabled():
            return
        if self.rate is not None:
            self._tell_schedules("reconsider", step, self.rate())
        if not self.scheduled(step):
            return
        self.collecting = None
        saved = (self._batch, self._training, self._before, self._in_step_seen)
        self._saved = saved
        if self._in_step:
            if self._in_step_seen:
                return
            self._in_step_seen = True
        self._training = None
        self._batch = batch = capture_batch(step, args, kwargs, module, path)
        rows = batch_size(args, kwargs)
        if self.probe_rows is None or rows is None or self.probe_rows >= rows:
            self._training = SitePatterns()
            self.collecting = pattern_collector(self._training, self.site_filter)
        if self._in_step:  # the optimizer has not moved the parameters yet
            self._before = self._training if self._training is not None else self._forward(batch)

    def forward_end(self, sites: int) -> None:
        """The end of a forward that ``capture`` saw, with its number of activation calls.

        A forward without activation sites (a loss module called on its own) does not replace
        the batch kept before it.
        """
        saved, self._saved = self._saved, None
        self.collecting = None
        if saved is not None and sites == 0:
            self._batch, self._training, self._before, self._in_step_seen = saved

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer pre-hook work: the "before" patterns; on sweep steps, copy the parameters.

        With no forward yet (a closure), the "before" patterns come from the first forward
        inside the step (``capture``).
        """
        self.collecting = None
        self._saved = None
        self._before = None
        self._params = {}
        self._in_step_seen = False
        batch, training = self._batch, self._training
        self._training = None
        self._lr = reference_lr(optimizer)
        self._tell_schedules("observe", step, self._lr)
        if not self.scheduled(step) or self._lr <= 0:
            self._batch = None
            return
        self._in_step = True
        if batch is not None and batch.step == step:
            self._before = training if training is not None else self._forward(batch)
        else:
            self._batch = None
        if self.sweep(step):
            self._params = {
                self._names[id(p)]: p.detach().clone()
                for group in optimizer.param_groups
                for p in group["params"]
                if id(p) in self._names
            }

    def after_step(self, step: int) -> list[ProbeRecord]:
        """Optimizer post-hook work: the APT probe and the sweep of this step, as wire records."""
        batch, before, saved = self._batch, self._before, self._params
        self._batch, self._before, self._params = None, None, {}
        self.collecting = None
        in_step, self._in_step, self._in_step_seen = self._in_step, False, False
        if batch is None or before is None or batch.step != step:
            if in_step and not self._warned:
                self._warned = True
                logger.warning(
                    "apmon: APT probes need the training forward before or inside "
                    "optimizer.step(); none was seen at step %d, so it has no probe (said once)",
                    step,
                )
            return []
        self.last_sites = before.infos
        records = []
        if self.apt(step):
            after = self._forward(batch)
            records.append(
                ProbeRecord(
                    step=step,
                    kind="apt",
                    lr=self._lr,
                    sites=site_probes(before, [count_changes(before, after)], [self._lr]),
                    nonfinite=before.nonfinite or after.nonfinite,
                )
            )
            probed = getattr(self.apt, "probed", None)
            if probed is not None:
                probed(step, self._lr)
        if saved:
            # Counted forward by forward, so one trial's masks are alive at a time.
            changes = [
                count_changes(before, self._forward(batch, params))
                for params in self.trial_params(saved)
            ]
            records.append(
                ProbeRecord(
                    step=step,
                    kind="sweep",
                    lr=self._lr,
                    sites=site_probes(before, changes, self.etas),
                    nonfinite=before.nonfinite,
                )
            )
        return records

    def trial_params(self, before: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """For each trial eta, theta_t + (eta / eta_t) * (theta_{t+1} - theta_t) by name.

        The trials share one set of tensors, overwritten for each eta: use each before the next.
        """
        live = dict(self.model.named_parameters())
        deltas = {name: live[name].detach() - p for name, p in before.items()}
        trial = {name: torch.empty_like(p) for name, p in before.items()}
        for eta in self.etas:
            factor = eta / self._lr
            for name, p in before.items():
                torch.add(p, deltas[name], alpha=factor, out=trial[name])
            yield trial

    def _forward(
        self, batch: StepBatch, params: dict[str, torch.Tensor] | None = None
    ) -> SitePatterns:
        args, kwargs = take_rows(batch.args, batch.kwargs, self.probe_rows)
        self.probing = True
        try:
            return probe_forward(
                self.model, self.tracker, self.site_filter, batch, args, kwargs, params
            )
        finally:
            self.probing = False


def reference_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group with a positive one (0 if none)."""
    for group in optimizer.param_groups:
        lr = float(group.get("lr", 0.0))
        if lr > 0:
            return lr
    return 0.0
