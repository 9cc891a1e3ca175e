"""Fixed probe sets: scheduled, chunked exactly, and leaving no trace on the model or the RNG."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from memory_transport import ListTransport
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from monitor.client.capture import ModuleTracker
from monitor.client.handle import Monitor
from monitor.client.probeset import ProbeSet, evaluate
from monitor.client.summary import measure, to_wire


class Net(nn.Module):
    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6) if batch_norm else nn.Identity()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 16, 12)
        self.out = nn.Linear(12, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = torch.relu(self.fc(self.drop(x.flatten(1))))
        return self.out(x)


def wire(result, k=64):
    return [to_wire(name, stats, k) for name, stats in result.stats.items()]


def without_sumsq(summaries):
    """The summaries with the scale zeroed: chunks of another size give float32 preactivations
    that differ in the last bits (the patterns do not)."""
    return [s.model_copy(update={"sumsq": 0.0, "max_abs": 0.0}) for s in summaries]


def run_probe(model, probe):
    tracker = ModuleTracker(model, lambda *a: None, sign_mode=False)
    try:
        return evaluate(model, tracker, probe)
    finally:
        tracker.close()


def test_probe_leaves_buffers_rng_params_and_modes_untouched():
    torch.manual_seed(0)
    model = Net()
    model(torch.randn(8, 3, 6, 6))  # running stats away from their initial values
    probe = ProbeSet(torch.randn(30, 3, 6, 6), chunk=8)
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    result = run_probe(model, probe)
    assert set(result.stats) == {"model#0", "model#1"}
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and model.drop.training and model.bn.training


def test_probe_matches_a_manual_forward_per_chunk():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(20, 3, 6, 6)
    y = torch.randint(0, 3, (20,))
    result = run_probe(model, ProbeSet(x, labels=y, chunk=8))
    reference = copy.deepcopy(model)
    reference.drop.eval()
    expected = {}
    with torch.no_grad():
        for xs, ys in zip(x.split(8), y.split(8), strict=True):
            pre = reference.bn(reference.conv(xs))  # batch norm on the chunk's statistics
            hidden = reference.fc(F.relu(pre).flatten(1))
            for name, value, kind in (("model#0", pre, "conv"), ("model#1", hidden, "dense")):
                stats = measure(value, kind, ys)
                expected[name] = stats if name not in expected else expected[name].merge(stats)
    assert wire(result) == [to_wire(n, s, 64) for n, s in expected.items()]


def test_chunks_and_dataloader_give_the_same_summary():
    torch.manual_seed(0)
    model = Net(batch_norm=False)
    x = torch.randn(23, 3, 6, 6)
    y = torch.randint(0, 3, (23,))
    one = wire(run_probe(model, ProbeSet(x, labels=y, chunk=1000)))
    chunked = wire(run_probe(model, ProbeSet(x, labels=y, chunk=5)))
    loader = DataLoader(TensorDataset(x, y), batch_size=6, shuffle=False)
    loaded = wire(run_probe(model, ProbeSet(loader)))
    assert without_sumsq(one) == without_sumsq(chunked) == without_sumsq(loaded)
    for a, b in zip(chunked + loaded, one + one, strict=True):
        assert a.sumsq == pytest.approx(b.sumsq, rel=1e-6)
        assert a.max_abs == pytest.approx(b.max_abs, rel=1e-6)
    assert one[0].class_rows == {str(c): int((y == c).sum()) * 16 for c in range(3)}
    # the same rows give the same patterns with dropout in the model: dropout is off in probes
    assert wire(run_probe(model, ProbeSet(x, labels=y))) == one


def test_monitor_evaluates_the_probe_set_on_its_schedule():
    torch.manual_seed(0)
    model = Net()
    transport = ListTransport()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = torch.randn(16, 3, 6, 6)
    with Monitor(model, opt, transport, every=100, probe_set=probe, probe_every=2):
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(8, 3, 6, 6)), torch.randint(0, 3, (8,))).backward()
            opt.step()
    probes = [s for s in transport.summaries if s.source == "probe_set"]
    assert [s.step for s in probes] == [0, 2, 4]
    assert all(s.sites[0].rows == 16 * 16 for s in probes)
    assert [s.step for s in transport.summaries if s.source == "train"] == [0]
    assert {s.name for s in transport.sites} == {"model#0", "model#1"}
