"""Activation pattern diagrams of a labelled probe subset, built in the training job.

**What it is** (Craighero et al., seed 003, Sec. 2 and its extended APD): nodes are the (site,
pattern) pairs met by the subset's samples plus the predicted labels; each sample adds one to the
edge from its pattern at one site to its pattern at the next site, and from its pattern at the
last site to its predicted label. A sample's pattern at a site is the sign of every value the
site computes for it: its units for a dense site, every (channel, position) of a conv site, every
(token, unit) of a sequence site. Samples are grouped by these bits: exactly up to 128 bits,
above that by a 128-bit digest of them (``_key``: no collision in practice, n^2 / 2^129 at most,
and bounded memory for wide conv sites). Sites are levels in the order the forward first calls
them.

**Flow clusters** (seed 003, Sec. 3, Fig. 3): the samples that share their patterns at two
consecutive levels; strength = their number, purity = the share of their most frequent predicted
label. The error share of an edge (how it is coloured) is the share of its samples whose
predicted label is not their true label.

**Bounded size.** Per level the ``max_nodes`` most frequent patterns are kept as nodes and the
rest merged into one "other patterns" node; per pair of levels the ``max_edges`` largest edges
are kept and the rest summed into one remainder. Cluster statistics (counts, sums and the Fig. 3
histogram of strength in log2 bins x purity in tenths) are exact over all clusters, before any
merging. A level thus holds at most 2 (max_nodes + 1) counts and a pair at most 5 max_edges + 3
integers plus at most 4 x 10 x (1 + log2 samples) for the histogram. In JSON, for fewer than 1000
samples at the defaults (20 nodes, 40 edges), that is at most about 2.5 kB per level, whatever
the model's size. Measured (``tests/client/test_diagram.py``): 300 samples through torchvision's
ResNet-18 at initialisation (17 sites, every sample its own pattern at every site) give 10.0 kB
per diagram (0.55 kB per level; 0.6 kB gzip-compressed).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from monitor.client.capture import ModuleTracker, SiteFilter
from monitor.client.patterns import pack_signs
from monitor.client.probeset import ProbeSet, untouched
from monitor.client.schedules import Schedule, as_schedule
from monitor.schema import ActivationDiagram, DiagramFlows, DiagramLevel, SiteMode

logger = logging.getLogger(__name__)

DEFAULT_DIAGRAM_ROWS = 300
DEFAULT_MAX_NODES = 20
DEFAULT_MAX_EDGES = 40
PURITY_BINS = 10
LABEL_LEVEL = "predicted label"
KEY_BYTES = 16


def _level(
    name: str, ids: np.ndarray, wrong: np.ndarray, max_nodes: int, labels: bool = False
) -> tuple[DiagramLevel, np.ndarray, np.ndarray]:
    """The level of per-sample ids: kept nodes by count (ties by id), and each sample's node.

    Returns the level, each sample's node (-1 for "other") and each sample's exact group.
    """
    values, group, counts = np.unique(ids, axis=0, return_inverse=True, return_counts=True)
    group = group.reshape(-1)
    errors = np.bincount(group, weights=wrong, minlength=len(counts)).astype(np.int64)
    order = np.argsort(-counts, kind="stable")  # np.unique sorted the ids: ties go by id
    kept = order[:max_nodes]
    node_of_group = np.full(len(counts), -1, dtype=np.int64)
    node_of_group[kept] = np.arange(len(kept))
    rest = np.ones(len(counts), dtype=bool)
    rest[kept] = False
    level = DiagramLevel(
        name=name,
        distinct=len(counts),
        counts=counts[kept].tolist(),
        errors=errors[kept].tolist(),
        other=int(counts[rest].sum()),
        other_errors=int(errors[rest].sum()),
        labels=[int(v) for v in values[kept]] if labels else None,
    )
    return level, node_of_group[group], group


def _groups(*columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's group among equal tuples of the columns, and the groups' sizes."""
    _, group, sizes = np.unique(
        np.stack(columns, axis=1), axis=0, return_inverse=True, return_counts=True
    )
    return group.reshape(-1), sizes


def _top_counts(group: np.ndarray, groups: int, predicted: np.ndarray) -> np.ndarray:
    """Per group, the count of its most frequent predicted label."""
    pair, pair_sizes = _groups(group, predicted)
    owner = np.zeros(len(pair_sizes), dtype=np.int64)
    owner[pair] = group
    top = np.zeros(groups, dtype=np.int64)
    np.maximum.at(top, owner, pair_sizes)
    return top


def _flows(
    source: tuple[np.ndarray, np.ndarray],
    target: tuple[np.ndarray, np.ndarray],
    predicted: np.ndarray,
    wrong: np.ndarray,
    max_edges: int,
) -> DiagramFlows:
    """Flows between two levels, given each sample's (node, exact group) at both."""
    cluster, sizes = _groups(source[1], target[1])
    top = _top_counts(cluster, len(sizes), predicted)
    cluster_errors = np.bincount(cluster, weights=wrong, minlength=len(sizes)).astype(np.int64)
    strength_bin = np.floor(np.log2(sizes)).astype(np.int64)
    purity_bin = np.minimum(PURITY_BINS * top // sizes, PURITY_BINS - 1)
    cell, _ = _groups(strength_bin, purity_bin)
    cells: dict[int, list[int]] = {}
    for index in range(len(sizes)):
        entry = cells.setdefault(
            int(cell[index]), [int(strength_bin[index]), int(purity_bin[index]), 0, 0]
        )
        entry[2] += int(sizes[index])
        entry[3] += int(cluster_errors[index])
    edge, edge_sizes = _groups(source[0], target[0])
    edge_top = _top_counts(edge, len(edge_sizes), predicted)
    edge_errors = np.bincount(edge, weights=wrong, minlength=len(edge_sizes)).astype(np.int64)
    ends = np.zeros((len(edge_sizes), 2), dtype=np.int64)
    ends[edge] = np.stack([source[0], target[0]], axis=1)
    order = np.argsort(-edge_sizes, kind="stable")
    kept, dropped = order[:max_edges], order[max_edges:]
    return DiagramFlows(
        edges=[
            (
                int(ends[e, 0]),
                int(ends[e, 1]),
                int(edge_sizes[e]),
                int(edge_errors[e]),
                int(edge_top[e]),
            )
            for e in kept
        ],
        rest=(int(edge_sizes[dropped].sum()), int(edge_errors[dropped].sum()), len(dropped)),
        clusters=len(sizes),
        strength_sum=int((sizes.astype(np.int64) ** 2).sum()),
        top_sum=int(top.sum()),
        cells=[tuple(entry) for _, entry in sorted(cells.items())],  # type: ignore[misc]
    )


def build_diagram(
    sites: Sequence[tuple[str, np.ndarray]],
    predicted: np.ndarray,
    truth: np.ndarray,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> ActivationDiagram:
    """The diagram of samples whose per-site pattern ids and labels are given.

    ``sites`` holds, in forward order, each site's name and an (N,) or (N, k) array whose equal
    rows are equal patterns; ``predicted`` and ``truth`` are the (N,) predicted and true labels.
    """
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    wrong = (predicted != np.asarray(truth, dtype=np.int64).reshape(-1)).astype(np.float64)
    levels: list[DiagramLevel] = []
    assigned: list[tuple[np.ndarray, np.ndarray]] = []
    for name, ids in sites:
        level, node, group = _level(name, ids, wrong, max_nodes)
        levels.append(level)
        assigned.append((node, group))
    level, node, group = _level(LABEL_LEVEL, predicted, wrong, max_nodes, labels=True)
    levels.append(level)
    assigned.append((node, group))
    flows = [
        _flows(assigned[i], assigned[i + 1], predicted, wrong, max_edges)
        for i in range(len(assigned) - 1)
    ]
    return ActivationDiagram(samples=len(predicted), levels=levels, flows=flows)


def predictions(output: Any) -> torch.Tensor:
    """Predicted labels of a model output: the arg max over classes of (N, C) logits.

    A tuple or list output is read through its first tensor; (N,) or (N, 1) outputs are taken as
    one logit of a binary task (label 1 where it is positive).
    """
    if isinstance(output, (tuple, list)):
        output = next(item for item in output if isinstance(item, torch.Tensor))
    if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
        return (output.reshape(-1) > 0).to(torch.int64)
    return output.argmax(dim=1).reshape(output.shape[0], -1)[:, 0]


def sample_diagram(
    model: nn.Module,
    tracker: ModuleTracker,
    probe: ProbeSet,
    site_filter: SiteFilter | None = None,
    rows: int = DEFAULT_DIAGRAM_ROWS,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_edges: int = DEFAULT_MAX_EDGES,
) -> ActivationDiagram | None:
    """Forward the first ``rows`` labelled samples of ``probe`` and build their diagram.

    Leaves the model as ``probeset.evaluate`` does (no_grad, buffers and RNG restored, dropout
    off). None when the probe set has no labels.
    """
    keys: dict[str, list[bytes]] = {}
    taken = 0

    def on_site(name: str, mode: SiteMode, preactivation: torch.Tensor) -> None:
        if site_filter is not None and not site_filter(name):
            return
        row_bytes, _ = pack_signs(preactivation.detach()[:take].reshape(take, -1), -1)
        keys.setdefault(name, []).extend(_key(row.tobytes()) for row in row_bytes.cpu().numpy())

    predicted: list[torch.Tensor] = []
    truth: list[torch.Tensor] = []
    with torch.no_grad(), untouched(model), tracker.probing(on_site):
        for inputs, labels in probe.chunks():
            if labels is None:
                return None
            take = min(rows - taken, int(labels.shape[0]))
            if take <= 0:
                break
            inputs = inputs[:take] if isinstance(inputs, torch.Tensor) else inputs
            predicted.append(predictions(model(inputs))[:take].cpu())
            truth.append(labels[:take].reshape(-1).cpu())
            taken += take
    if not taken:
        return None
    sites = [(name, _ids(values)) for name, values in keys.items() if len(values) == taken]
    return build_diagram(
        sites, torch.cat(predicted).numpy(), torch.cat(truth).numpy(), max_nodes, max_edges
    )


def _key(packed: bytes) -> bytes:
    """A sample's grouping key: its packed sign bits, or their 128-bit BLAKE2b digest.

    Up to 128 bits the key is the pattern itself; above, the digest bounds memory (16 bytes per
    sample and site, where a conv site's bits can run to hundreds of kB) and two distinct
    patterns among n share a key with probability below n^2 / 2^129.
    """
    if len(packed) <= KEY_BYTES:
        return packed
    return hashlib.blake2b(packed, digest_size=KEY_BYTES).digest()


def _ids(keys: list[bytes]) -> np.ndarray:
    """Small integer ids of byte keys, equal keys equal ids (first-seen order)."""
    seen: dict[bytes, int] = {}
    return np.array([seen.setdefault(key, len(seen)) for key in keys], dtype=np.int64)


class DiagramSchedule:
    """Which probe-set evaluations get a diagram.

    ``every`` None (the default): evaluations 0, 1, 2, 4, 8, ... (log-spaced, as seed 002
    samples training) and, when the run closes, the final parameters. An int k or a step -> bool
    schedule: evaluations at the steps it selects, and the final parameters. 0 turns diagrams off.
    """

    def __init__(self, every: int | Schedule | None = None) -> None:
        self.enabled = every != 0
        self._steps: Schedule | None = None if every is None else as_schedule(every or None)
        self._evaluations = 0
        self.last_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether the probe-set evaluation at ``step`` gets a diagram; counts the evaluation."""
        index = self._evaluations
        self._evaluations += 1
        if not self.enabled:
            return False
        if self._steps is not None:
            return self._steps(step)
        return index & (index - 1) == 0  # 0 and the powers of two

    def final_due(self, final_step: int) -> bool:
        """Whether the run's end needs a diagram of the final parameters.

        Only after an earlier evaluation gave one (so the probe set is labelled).
        """
        return self.last_step is not None and self.last_step != final_step
