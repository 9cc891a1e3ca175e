"""Figures of the activation pattern diagrams (seed 003), as pure functions of stored diagrams.

- ``sankey``: the diagram of one step as a plotly Sankey (the source's Fig. 2): one column per
  site and one for the predicted labels, node height = samples, node colour intensity = samples,
  edge width = samples, edge colour = the share of the edge's samples that are misclassified.
- ``flow_clusters``: the source's Fig. 3 for the chosen steps: how samples (second row) and
  misclassified samples (first row) spread over flow clusters of given strength (size, log2
  bins) and purity, for the clusters between the last two sites.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from monitor.schema import ActivationDiagram, DiagramFlows

if TYPE_CHECKING:
    import plotly.graph_objects as go

NODE_RGB = (31, 119, 180)
RIGHT_RGB = (150, 150, 150)
WRONG_RGB = (214, 39, 40)
PURITY_BINS = 10


def error_colour(share: float, alpha: float = 0.55) -> str:
    """Edge colour for an error share in [0, 1]: grey (all right) to red (all wrong)."""
    share = min(max(share, 0.0), 1.0)
    r, g, b = (round(c0 + (c1 - c0) * share) for c0, c1 in zip(RIGHT_RGB, WRONG_RGB, strict=True))
    return f"rgba({r},{g},{b},{alpha})"


def _node_colour(count: int, largest: int) -> str:
    alpha = 0.2 + 0.8 * count / max(largest, 1)
    return f"rgba({NODE_RGB[0]},{NODE_RGB[1]},{NODE_RGB[2]},{alpha:.3f})"


def sankey(diagram: ActivationDiagram, step: int) -> go.Figure:
    """The diagram of one step as a plotly Sankey figure.

    Nodes are placed by level (x) and stacked by size within a level (y), most frequent first;
    every level's patterns beyond the kept ones form one "other" node, and each pair of levels'
    edges beyond the kept ones one edge between the two "other" nodes. A kept node whose every
    edge went into such a remainder has no link and is left out.
    """
    import plotly.graph_objects as go

    labels: list[str] = []
    colours: list[str] = []
    xs: list[float] = []
    ys: list[float] = []
    hover: list[str] = []
    index: list[dict[int, int]] = []  # per level: node (-1 other) -> figure node
    largest = max((max(lv.counts, default=0) for lv in diagram.levels), default=1)
    columns = max(len(diagram.levels) - 1, 1)
    for position, level in enumerate(diagram.levels):
        nodes = dict(enumerate(level.counts))
        node_errors = dict(enumerate(level.errors))
        if level.other or _has_rest(diagram, position):  # edges to node -1 need other > 0
            nodes[-1], node_errors[-1] = level.other, level.other_errors
        mapping: dict[int, int] = {}
        total = max(sum(nodes.values()), 1)
        below = 0.0
        for node, count in nodes.items():
            mapping[node] = len(labels)
            if node == -1:
                name = f"{level.name}: other patterns"
            elif level.labels is not None:
                name = f"label {level.labels[node]}"
            else:
                name = f"{level.name} p{node}"
            labels.append(name)
            colours.append(_node_colour(count, largest))
            xs.append(0.001 + 0.998 * position / columns)
            share = count / total
            ys.append(min(max(below + share / 2, 0.001), 0.999))
            below += share
            hover.append(f"{count} samples, {node_errors[node]} misclassified")
        index.append(mapping)
    sources: list[int] = []
    targets: list[int] = []
    values: list[int] = []
    link_colours: list[str] = []
    link_hover: list[str] = []
    for position, flows in enumerate(diagram.flows):
        here, there = index[position], index[position + 1]
        for source, target, samples, errors, top in flows.edges:
            sources.append(here[source])
            targets.append(there[target])
            values.append(samples)
            link_colours.append(error_colour(errors / samples if samples else 0.0))
            link_hover.append(
                f"{samples} samples, error share {errors / max(samples, 1):.2f}, "
                f"purity {top / max(samples, 1):.2f}"
            )
        samples, errors, edges = flows.rest
        if samples:
            sources.append(here[-1])
            targets.append(there[-1])
            values.append(samples)
            link_colours.append(error_colour(errors / samples))
            link_hover.append(f"{edges} smaller flows: {samples} samples, {errors} misclassified")
    # plotly leaves nodes without links out of its layout and then misplaces the nodes after
    # them, so a kept pattern whose only edges went into a remainder is not drawn
    linked = sorted(set(sources) | set(targets))
    renumber = {old: new for new, old in enumerate(linked)}
    sources = [renumber[i] for i in sources]
    targets = [renumber[i] for i in targets]
    labels, colours, hover = ([texts[i] for i in linked] for texts in (labels, colours, hover))
    xs, ys = ([places[i] for i in linked] for places in (xs, ys))
    figure = go.Figure(
        go.Sankey(
            arrangement="snap",
            node={
                "label": labels,
                "color": colours,
                "x": xs,
                "y": ys,
                "pad": 4,
                "thickness": 14,
                "customdata": hover,
                "hovertemplate": "%{label}<br>%{customdata}<extra></extra>",
            },
            link={
                "source": sources,
                "target": targets,
                "value": values,
                "color": link_colours,
                "customdata": link_hover,
                "hovertemplate": "%{customdata}<extra></extra>",
            },
        )
    )
    accuracy = _accuracy(diagram)
    figure.update_layout(
        title=f"activation pattern diagram, step {step}: {diagram.samples} samples, "
        f"accuracy {accuracy:.2f} (edge colour: grey right, red misclassified)",
        height=520,
        margin={"l": 10, "r": 10, "t": 50, "b": 10},
        font={"size": 10},
    )
    return figure


def _has_rest(diagram: ActivationDiagram, position: int) -> bool:
    """Whether a remainder edge ends or starts at level ``position``."""
    before = position > 0 and diagram.flows[position - 1].rest[0] > 0
    after = position < len(diagram.flows) and diagram.flows[position].rest[0] > 0
    return before or after


def _accuracy(diagram: ActivationDiagram) -> float:
    labels = diagram.levels[-1]
    wrong = sum(labels.errors) + labels.other_errors
    return 1.0 - wrong / max(diagram.samples, 1)


def cluster_flows(diagram: ActivationDiagram) -> DiagramFlows:
    """The flows whose clusters Fig. 3 shows: between the last two sites (the label if one)."""
    return diagram.flows[-2] if len(diagram.flows) >= 2 else diagram.flows[-1]


def cluster_grid(flows: DiagramFlows, strength_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(purity bins x strength bins) matrices of all samples and of misclassified samples."""
    samples = np.zeros((PURITY_BINS, strength_bins))
    wrong = np.zeros_like(samples)
    for strength, purity, count, errors in flows.cells:
        samples[purity, strength] += count
        wrong[purity, strength] += errors
    return samples, wrong


def flow_clusters(diagrams: Sequence[tuple[int, ActivationDiagram]]) -> Figure:
    """The source's Fig. 3: samples over flow-cluster strength and purity, per chosen step."""
    chosen = [(step, d) for step, d in diagrams if d.flows and d.samples]
    columns = max(len(chosen), 1)
    figure, axes = plt.subplots(2, columns, figsize=(2.6 * columns + 1.2, 5.2), squeeze=False)
    bins = max((int(np.log2(max(d.samples, 1))) + 1 for _, d in chosen), default=1)
    for column, (step, diagram) in enumerate(chosen):
        samples, wrong = cluster_grid(cluster_flows(diagram), bins)
        for row, (matrix, what) in enumerate(((wrong, "misclassified"), (samples, "all"))):
            ax = axes[row, column]
            shown = np.where(matrix > 0, matrix, np.nan)
            image = ax.imshow(
                shown,
                origin="lower",
                aspect="auto",
                extent=(-0.5, bins - 0.5, 0.0, 1.0),
                cmap="viridis",
            )
            figure.colorbar(image, ax=ax, fraction=0.08)
            ax.set_xticks(range(bins), labels=[str(2**b) for b in range(bins)], fontsize=7)
            if column == 0:
                ax.set_ylabel(f"purity ({what})")
            if row == 0:
                ax.set_title(f"step {step}", fontsize=9)
            else:
                ax.set_xlabel("strength (cluster size, log2 bins)", fontsize=8)
    level = chosen[0][1].levels[max(len(chosen[0][1].levels) - 3, 0)].name if chosen else ""
    figure.suptitle(
        f"flow clusters between the last two levels (from {level}): samples per strength x purity"
    )
    figure.tight_layout()
    return figure
