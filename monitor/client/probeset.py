"""Fixed probe sets: the same rows every k steps, the basis of Jaccard, changes and diagrams.

A probe evaluation runs under ``no_grad`` with the model in its current (training) mode, so batch
norm normalises with the chunk's own statistics as in the sources (Hartmann et al. 2021, Sec. 2.2;
thesis Sec. 3.1.2), but leaves no trace: every buffer (batch norm's running mean, running variance
and batch counter) is saved and copied back, the CPU and CUDA random generators are restored,
dropout is off for the probe (a fixed probe set needs fixed rows): dropout modules are switched
to eval, and functional dropout (``F.dropout`` and relatives, ``nn.MultiheadAttention``'s float
``dropout``, ``scaled_dot_product_attention``'s ``dropout_p``) is made the identity, and
parameters and optimizer state are never touched. The set is forwarded in chunks of at most
``chunk`` samples along ``batch_dim`` (or the DataLoader's batches) to bound memory; the
per-site statistics of the chunks are merged exactly. With batch norm in training mode the
chunking is part of the measurement (statistics are per chunk), so keep it fixed within a run.
``Monitor`` evaluates the set at the end of each scheduled optimizer step, so the measurement of
step s sees the parameters after step s's update, and ships it as
``StepSummary(source="probe_set")``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from monitor.client.capture import ModuleTracker, SiteFilter, site_kind
from monitor.client.summary import SiteStats, measure, to_wire
from monitor.schema import SiteInfo, SiteMode, StepSummary

logger = logging.getLogger(__name__)

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class ProbeSet:
    """A fixed probe set and how to chunk it.

    ``data`` is a tensor of inputs (optionally with ``labels``), or an iterable such as a
    DataLoader (not shuffled) yielding inputs or ``(inputs, labels, ...)`` tuples; labels are
    used when ``use_labels`` is set. Tensors are split into chunks of ``chunk`` samples along
    ``batch_dim`` (1 for a ``batch_first=False`` sequence model's (T, N, d) inputs); a tensor of
    3 or more dims that is split along dim 0 is logged once, since dim 0 may be time.
    """

    data: torch.Tensor | Iterable[Any]
    labels: torch.Tensor | None = None
    chunk: int = 256
    use_labels: bool = True
    device: torch.device | str | None = None
    batch_dim: int = 0
    _told: bool = field(default=False, repr=False)

    def chunks(self) -> Iterator[tuple[Any, torch.Tensor | None]]:
        """(inputs, labels or None) per chunk, on ``device`` when one is set."""
        if isinstance(self.data, torch.Tensor):
            samples = self.data.shape[self.batch_dim]
            split = self.data.dim() >= 3 and self.batch_dim == 0 and samples > self.chunk
            if split and not self._told:
                self._told = True
                logger.warning(
                    "apmon: the probe set of shape %s is split along dim 0 into chunks of %d; "
                    "if dim 0 is not the batch (a batch_first=False transformer), pass "
                    "ProbeSet(data, batch_dim=1)",
                    tuple(self.data.shape),
                    self.chunk,
                )
            for start in range(0, samples, self.chunk):
                labels = None
                if self.labels is not None and self.use_labels:
                    labels = self.labels[start : start + self.chunk]
                part = self.data.narrow(self.batch_dim, start, min(self.chunk, samples - start))
                yield self._to(part), labels
            return
        for batch in self.data:
            if isinstance(batch, (tuple, list)):
                labels = batch[1] if self.use_labels and len(batch) > 1 else None
                yield self._to(batch[0]), labels
            else:
                yield self._to(batch), None

    def _to(self, x: Any) -> Any:
        if self.device is not None and isinstance(x, torch.Tensor):
            return x.to(self.device, non_blocking=True)
        return x


def as_probe_set(value: ProbeSet | torch.Tensor | tuple[Any, ...] | Iterable[Any]) -> ProbeSet:
    """What ``watch(probe_set=...)`` accepts, as a ``ProbeSet``.

    A ``ProbeSet`` as it is; a tuple ``(inputs, labels)`` of two tensors as a labelled probe set
    (the per-class counts of seed 002 and the diagrams need labels); a tensor or an iterable such
    as a DataLoader as the data (a DataLoader of ``(inputs, labels)`` batches is labelled).
    """
    if isinstance(value, ProbeSet):
        return value
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(part, torch.Tensor) for part in value)
    ):
        inputs, labels = value
        if labels.shape[0] != inputs.shape[0]:
            raise ValueError(f"probe set of {inputs.shape[0]} inputs but {labels.shape[0]} labels")
        return ProbeSet(inputs, labels=labels)
    return ProbeSet(value)


# Functional dropout, made the identity in probe-set forwards.
_DROPOUT_FUNCTIONS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.dropout_,
    torch.alpha_dropout,
    torch.feature_dropout,
    torch.feature_alpha_dropout,
}
_MHA_TRAINING = 13  # position of ``training`` in F.multi_head_attention_forward
_SDPA_DROPOUT = 4  # position of ``dropout_p`` in F.scaled_dot_product_attention


class _NoDropout(TorchFunctionMode):
    """Makes functional dropout the identity.

    A call nested inside another function's implementation (dropout inside a fused op) is not
    seen; ``multi_head_attention_forward`` and ``scaled_dot_product_attention`` are handled by
    their arguments.
    """

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func in _DROPOUT_FUNCTIONS:
            return args[0] if args else kwargs["input"]
        if func is F.multi_head_attention_forward:
            if len(args) > _MHA_TRAINING:
                args = (*args[:_MHA_TRAINING], False, *args[_MHA_TRAINING + 1 :])
            else:
                kwargs["training"] = False
        elif func is F.scaled_dot_product_attention:
            if len(args) > _SDPA_DROPOUT:
                args = (*args[:_SDPA_DROPOUT], 0.0, *args[_SDPA_DROPOUT + 1 :])
            else:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run a block that forwards ``model``; leave every buffer and random generator as it was.

    Dropout layers are in eval mode inside the block.
    """
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    dropouts = [m for m in model.modules() if isinstance(m, _DROPOUT) and m.training]
    for module in dropouts:
        module.eval()
    try:
        with _NoDropout():
            yield
    finally:
        for module in dropouts:
            module.train()
        with torch.no_grad():
            for name, buf in model.named_buffers():
                saved = buffers.get(name)
                if saved is not None:
                    buf.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


@dataclass
class ProbeResult:
    """Merged statistics of one probe-set evaluation, and the sites it met."""

    stats: dict[str, SiteStats] = field(default_factory=dict)
    sites: dict[str, SiteInfo] = field(default_factory=dict)


def evaluate(
    model: nn.Module,
    tracker: ModuleTracker,
    probe: ProbeSet,
    site_filter: SiteFilter | None = None,
) -> ProbeResult:
    """Forward the probe set through ``model`` and return each site's exact statistics."""
    result = ProbeResult()
    labels: torch.Tensor | None = None

    def on_site(name: str, mode: SiteMode, preactivation: torch.Tensor) -> None:
        if site_filter is not None and not site_filter(name):
            return
        x = preactivation.detach()
        kind = site_kind(x)
        stats = measure(x, kind, labels)
        if name not in result.sites:
            result.sites[name] = SiteInfo(name=name, kind=kind, mode=mode, units=stats.units)
        previous = result.stats.get(name)
        result.stats[name] = stats if previous is None else previous.merge(stats)

    with torch.no_grad(), untouched(model), tracker.probing(on_site):
        for inputs, chunk_labels in probe.chunks():
            labels = chunk_labels
            model(inputs)
    return result


def probe_summary(step: int, result: ProbeResult, sketch_k: int) -> StepSummary:
    """The wire record of a probe-set evaluation."""
    return StepSummary(
        step=step,
        source="probe_set",
        sites=[to_wire(name, stats, sketch_k) for name, stats in result.stats.items()],
    )
