"""Activation pattern diagrams: flows counted by hand, a real tiny network, the schedule, size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from memory_transport import ListTransport
from torch import nn

from monitor.client.capture import ModuleTracker
from monitor.client.diagram import DiagramSchedule, build_diagram, sample_diagram
from monitor.client.handle import Monitor
from monitor.client.probeset import ProbeSet
from monitor.schema import ActivationDiagram, StepSummary

# Six samples; wrong = predicted != truth: samples 2 and 5.
SITE_A = np.array([0, 0, 0, 1, 1, 2])
SITE_B = np.array([5, 5, 6, 6, 6, 6])
PREDICTED = np.array([1, 1, 1, 0, 0, 0])
TRUTH = np.array([1, 1, 0, 0, 0, 1])


def test_flows_counted_by_hand() -> None:
    diagram = build_diagram([("a", SITE_A), ("b", SITE_B)], PREDICTED, TRUTH)
    a, b, labels = diagram.levels
    assert diagram.samples == 6
    assert (a.counts, a.errors, a.distinct, a.other) == ([3, 2, 1], [1, 0, 1], 3, 0)
    assert (b.counts, b.errors) == ([4, 2], [2, 0])  # node 0 is pattern 6, node 1 pattern 5
    assert (labels.labels, labels.counts, labels.errors) == ([0, 1], [3, 3], [1, 1])
    a_to_b, b_to_label = diagram.flows
    # clusters (a, b): {0,1} (0,5); {2} (0,6); {3,4} (1,6); {5} (2,6)
    assert a_to_b.edges == [(0, 1, 2, 0, 2), (1, 0, 2, 0, 2), (0, 0, 1, 1, 1), (2, 0, 1, 1, 1)]
    assert (a_to_b.clusters, a_to_b.strength_sum, a_to_b.top_sum) == (4, 2 * 2 + 1 + 2 * 2 + 1, 6)
    # strength 2 (bin 1) purity 1 (bin 9): 4 samples, no errors; strength 1 (bin 0): 2 wrong
    assert a_to_b.cells == [(0, 9, 2, 2), (1, 9, 4, 0)]
    assert a_to_b.rest == (0, 0, 0)
    # clusters (b, label): {3,4,5} (6,0) with sample 5 wrong; {2} (6,1) wrong; {0,1} (5,1)
    assert b_to_label.edges == [(0, 0, 3, 1, 3), (1, 1, 2, 0, 2), (0, 1, 1, 1, 1)]
    assert (b_to_label.clusters, b_to_label.strength_sum, b_to_label.top_sum) == (3, 14, 6)


def test_purity_of_a_mixed_cluster_and_its_bins() -> None:
    # one cluster of 5 samples predicted [0, 0, 0, 1, 2]: purity 3/5 (bin 6), strength 5 (bin 2)
    same = np.zeros(5, dtype=np.int64)
    diagram = build_diagram(
        [("a", same), ("b", same)], np.array([0, 0, 0, 1, 2]), np.array([0, 0, 0, 0, 0])
    )
    flows = diagram.flows[0]
    assert (flows.clusters, flows.top_sum, flows.strength_sum) == (1, 3, 25)
    assert flows.cells == [(2, 6, 5, 2)]
    assert flows.edges == [(0, 0, 5, 2, 3)]


def test_kept_nodes_and_edges_are_bounded_with_an_other_node_and_a_remainder() -> None:
    diagram = build_diagram(
        [("a", SITE_A), ("b", SITE_B)], PREDICTED, TRUTH, max_nodes=2, max_edges=2
    )
    a = diagram.levels[0]
    assert (a.counts, a.other, a.other_errors, a.distinct) == ([3, 2], 1, 1, 3)
    a_to_b = diagram.flows[0]
    assert a_to_b.edges == [(0, 1, 2, 0, 2), (1, 0, 2, 0, 2)]
    assert a_to_b.rest == (2, 2, 2)  # edges (0 -> 0) and (other -> 0), one wrong sample each
    # cluster statistics stay exact
    assert (a_to_b.clusters, a_to_b.strength_sum) == (4, 10)
    ActivationDiagram.model_validate_json(diagram.model_dump_json())


class HandNet(nn.Module):
    """x (N, 1): site 1 is (x > 0, x < 0); site 2 is (|x| > 1, x > 0); logits (r0, r1 + 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1, 2)
        self.fc2 = nn.Linear(2, 2)
        self.out = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
            self.fc2.bias.copy_(torch.tensor([-1.0, 0.0]))
            self.out.weight.copy_(torch.eye(2))
            self.out.bias.copy_(torch.tensor([0.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_a_real_tiny_network_gives_the_hand_counted_diagram() -> None:
    model = HandNet()
    x = torch.tensor([[-2.0], [-0.5], [0.5], [2.0], [3.0]])
    truth = torch.tensor([0, 0, 1, 1, 0])
    tracker = ModuleTracker(model, lambda *a: None, sign_mode=False)
    try:
        diagram = sample_diagram(model, tracker, ProbeSet(x, labels=truth, chunk=2))
    finally:
        tracker.close()
    assert diagram is not None
    assert [level.name for level in diagram.levels] == ["model#0", "model#1", "predicted label"]
    site1, site2, labels = diagram.levels
    # site 1: (0,1) for -2, -0.5; (1,0) for 0.5, 2, 3.  Predicted: 0, 1, 1, 1, 1.
    assert (site1.counts, site1.errors) == ([3, 2], [1, 1])
    # site 2: (1,0) for -2; (0,0) for -0.5; (0,1) for 0.5; (1,1) for 2 and 3 (3 is wrong)
    assert (site2.distinct, sorted(site2.counts)) == (4, [1, 1, 1, 2])
    assert (labels.labels, labels.counts, labels.errors) == ([1, 0], [4, 1], [2, 0])
    first, last = diagram.flows
    assert (first.clusters, first.strength_sum, first.top_sum) == (4, 7, 5)
    assert sorted(edge[2] for edge in first.edges) == [1, 1, 1, 2]
    assert (last.clusters, last.strength_sum) == (4, 7)
    # the diagram of the patterns written down by hand (ids in first-seen order) is the same
    by_hand = build_diagram(
        [("model#0", np.array([0, 0, 1, 1, 1])), ("model#1", np.array([0, 1, 2, 3, 3]))],
        np.array([0, 1, 1, 1, 1]),
        truth.numpy(),
    )
    assert by_hand == diagram


def test_schedule_log_spaced_then_final() -> None:
    schedule = DiagramSchedule()
    assert [schedule.due(step) for step in range(0, 100, 10)] == [
        True, True, True, False, True, False, False, False, True, False,
    ]  # fmt: skip
    assert not schedule.final_due(99)  # no diagram was made: nothing at the end
    schedule.last_step = 80
    assert schedule.final_due(99) and not schedule.final_due(80)
    off = DiagramSchedule(0)
    assert not any(off.due(step) for step in range(5))
    every = DiagramSchedule(20)
    assert [every.due(step) for step in (0, 10, 20, 30)] == [True, False, True, False]


def test_monitor_ships_diagrams_of_a_labelled_tuple_probe_set() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    transport = ListTransport()
    with Monitor(
        model, opt, transport, every=100, probe_set=(x, y), probe_every=2, apd_rows=25
    ) as monitor:
        for _ in range(11):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert monitor.step == 11
    probes = [s for s in transport.summaries if s.source == "probe_set"]
    # evaluations at steps 0, 2, ..., 10 (indices 0-5); diagrams at indices 0, 1, 2, 4; the
    # last evaluation (step 10) saw the final parameters: close adds the diagram to it
    assert [s.step for s in probes] == [0, 2, 4, 6, 8, 10]
    assert [s.step for s in probes if s.diagram is not None] == [0, 2, 4, 8, 10]
    for summary in probes:
        assert summary.sites[0].class_rows is not None  # labelled: per-class counts travel
        if summary.diagram is not None:
            assert summary.diagram.samples == 25
            assert [lv.name for lv in summary.diagram.levels] == ["1#0", "3#0", "predicted label"]
    StepSummary.model_validate_json(probes[0].model_dump_json())


def test_close_adds_a_final_diagram_and_unlabelled_sets_get_none() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    for probe_set, expected in (((x, y), [0, 4, 6]), (x, [])):
        transport = ListTransport()
        with Monitor(model, opt, transport, every=100, probe_set=probe_set, probe_every=4):
            for _ in range(7):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        probes = [s for s in transport.summaries if s.source == "probe_set"]
        assert [s.step for s in probes if s.diagram is not None] == expected
        assert len({s.step for s in probes}) == len(probes)


def test_diagram_of_a_resnet_sized_model_is_small() -> None:
    """Bytes of the JSON of a diagram of 300 samples through torchvision's ResNet-18."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(300, 3, 32, 32), torch.randint(0, 10, (300,))
    tracker = ModuleTracker(model, lambda *a: None, sign_mode=False)
    try:
        diagram = sample_diagram(model, tracker, ProbeSet(x, labels=y, chunk=100))
    finally:
        tracker.close()
    assert diagram is not None
    sites = len(diagram.levels) - 1
    assert sites == 17  # the stem, two per basic block
    size = len(diagram.model_dump_json())
    # the bound of monitor/client/diagram.py at the default sizes: 2.5 kB per level
    assert size <= 2500 * len(diagram.levels), size
    assert size > 200 * len(diagram.levels)  # a level at the least: 20 nodes, 20 edges


class Wide(nn.Module):
    """One site of 300 units that is the input itself, then a fixed read-out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)[:, :2]


def test_wide_sites_group_samples_by_every_bit() -> None:
    x = -torch.ones(4, 300)
    x[:, 0] = 1.0
    x[2, 299] = 1.0  # sample 2 differs from 0 and 1 in the last unit only
    x[3, 150] = 1.0
    model = Wide()
    tracker = ModuleTracker(model, lambda *a: None, sign_mode=False)
    try:
        diagram = sample_diagram(model, tracker, ProbeSet(x, labels=torch.zeros(4).long()))
    finally:
        tracker.close()
    assert diagram is not None
    site = diagram.levels[0]
    assert (site.distinct, site.counts) == (3, [2, 1, 1])
