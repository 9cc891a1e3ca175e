"""Every activation form reaches the capture, with the right names, kinds and modes; hooks exist
only on scheduled steps; training is bit-identical with the monitor on."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
import torchvision
from memory_transport import ListTransport
from torch import nn

from monitor.client.capture import ModuleTracker
from monitor.client.handle import Monitor


class EveryForm(nn.Module):
    """One of each activation form the issue lists."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.relu = nn.ReLU()
        self.leaky = nn.LeakyReLU()
        self.prelu = nn.PReLU()
        self.relu6 = nn.ReLU6()
        self.relu_inplace = nn.ReLU(inplace=True)
        self.leaky_inplace = nn.LeakyReLU(inplace=True)
        self.gelu = nn.GELU()
        self.silu = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        for module in (self.relu, self.leaky, self.prelu, self.relu6):
            x = module(x - 0.5)
        x = self.relu_inplace(x - 0.5)
        x = self.leaky_inplace(x - 0.5)
        x = F.relu(x - 0.5)
        x = torch.relu(x - 0.5)
        x = (x - 0.5).relu()
        x = x - 0.5
        x.relu_()
        x = x - 0.5
        F.relu_(x)
        x = x - 0.5
        torch.relu_(x)
        x = F.leaky_relu(x - 0.5, 0.1)
        x = x - 0.5
        F.leaky_relu_(x)
        x = F.relu(x - 0.5, inplace=True)
        x = F.relu6(x - 0.5)
        x = self.gelu(x - 0.5)
        x = self.silu(x)
        return F.hardtanh(x)  # min_val -1: not a ReLU-like site


EXPECTED_RELU = ["relu#0", "leaky#0", "prelu#0", "relu6#0", "relu_inplace#0", "leaky_inplace#0"]
EXPECTED_RELU += [f"model#{k}" for k in range(10)]


def capture_names(model: nn.Module, x: torch.Tensor, sign_mode: bool) -> list[tuple]:
    seen: list[tuple] = []

    def on_site(name, mode, pre):
        seen.append((name, mode, tuple(pre.shape), bool((pre < 0).any())))

    tracker = ModuleTracker(model, on_site, sign_mode=sign_mode)
    tracker.armed = True
    model(x)
    tracker.close()
    return seen


def test_every_activation_form_reaches_the_capture():
    torch.manual_seed(0)
    seen = capture_names(EveryForm(), torch.randn(5, 4), sign_mode=False)
    assert [s[0] for s in seen] == EXPECTED_RELU
    assert {s[1] for s in seen} == {"relu"}
    # the preactivation is seen before the (possibly in-place) call overwrites it
    assert all(s[3] for s in seen)


def test_sign_mode_adds_smooth_sites_marked_sign():
    torch.manual_seed(0)
    seen = capture_names(EveryForm(), torch.randn(5, 4), sign_mode=True)
    names = [s[0] for s in seen]
    assert names == [*EXPECTED_RELU, "gelu#0", "silu#0"]
    assert [s[1] for s in seen[-2:]] == ["sign", "sign"]
    transport = ListTransport()
    model = EveryForm()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, opt, transport, sign_mode=True):
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
    modes = {s.name: s.mode for s in transport.sites}
    assert modes["gelu#0"] == "sign" and modes["silu#0"] == "sign" and modes["relu#0"] == "relu"


def test_torchvision_basic_block_reuses_relu_as_two_sites():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    transport = ListTransport()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, opt, transport):
        F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
        opt.step()
    sites = {s.name: s for s in transport.sites}
    assert len(sites) == 17  # stem + 8 blocks x 2
    for name in ("layer1.0.relu#0", "layer1.0.relu#1", "layer4.1.relu#1", "relu#0"):
        assert sites[name].kind == "conv"
    assert sites["layer1.0.relu#0"].units == 64 and sites["layer4.1.relu#1"].units == 512
    summary = {s.site: s for s in transport.summaries[0].sites}
    assert summary["layer1.0.relu#0"].rows == 2 * 8 * 8  # one row per spatial position


def test_sequence_site_counts_one_row_per_token():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    transport = ListTransport()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(3, 7, 6)
    with Monitor(model, opt, transport):
        model(x).sum().backward()
        opt.step()
    (info,) = transport.sites
    assert (info.name, info.kind, info.units) == ("1#0", "seq", 5)
    site = transport.summaries[0].sites[0]
    assert site.rows == 21 and len(site.unit_on) == 5


@pytest.mark.parametrize("capture_rows", [None, 1, 32, 199, 200, 500])
def test_dense_summary_equals_brute_force(capture_rows: int | None) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(200, 3)
    rows = 200 if capture_rows is None else min(capture_rows, 200)
    pre = (model[0](x[:rows]) > 0).tolist()  # the summary covers the batch's first rows
    transport = ListTransport()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, opt, transport, capture_rows=capture_rows):
        model(x).sum().backward()
        opt.step()
    site = transport.summaries[0].sites[0]
    counter = Counter(tuple(r) for r in pre)
    assert site.rows == rows and site.distinct == len(counter)
    assert sorted(site.spectrum) == sorted(Counter(counter.values()).items())
    assert site.unit_on == [sum(r[j] for r in pre) for j in range(4)]
    assert site.patterns_exact and sorted(c for _, c in site.patterns) == sorted(counter.values())


def test_include_exclude_by_name():
    model = torchvision.models.resnet18(num_classes=10)
    transport = ListTransport()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, opt, transport, include=["layer1.*", "relu#*"], exclude=["*#1"]):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        opt.step()
    assert sorted(s.name for s in transport.sites) == [
        "layer1.0.relu#0",
        "layer1.1.relu#0",
        "relu#0",
    ]


def _hooked(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules() if m is not model
    )


def test_module_hooks_exist_only_on_scheduled_steps_and_go_on_close():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    transport = ListTransport()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, opt, transport, every=3)
    hooked = []
    for _ in range(6):
        hooked.append(_hooked(model))
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert [h > 0 for h in hooked] == [True, False, False, True, False, False]
    assert [s.step for s in transport.summaries] == [0, 3]
    monitor.close()
    assert [s.step for s in transport.summaries] == [0, 3]
    assert _hooked(model) == 0
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_forward_without_grad_is_not_captured():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    transport = ListTransport()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, opt, transport):
        with torch.no_grad():
            model(torch.randn(50, 3))  # a validation pass
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert transport.summaries[0].sites[0].rows == 4


def test_nonfinite_rows_are_counted():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    transport = ListTransport()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(10, 3)
    x[2, 0] = float("nan")
    x[7, 1] = float("inf")
    with Monitor(model, opt, transport):
        model(x).sum().backward()
        opt.step()
    assert transport.summaries[0].sites[0].nonfinite_rows == 2


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(self.drop(x.flatten(1)))


@pytest.mark.parametrize("with_probe_set", [False, True])
def test_training_is_bit_identical_with_the_monitor(with_probe_set):
    torch.manual_seed(0)
    base = SmallConvNet()
    data = torch.randn(6, 16, 3, 8, 8)
    labels = torch.randint(0, 10, (6, 16))
    probe = torch.randn(40, 3, 8, 8) if with_probe_set else None
    results = []
    for monitored in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(1)
        monitor = None
        if monitored:
            monitor = Monitor(model, opt, ListTransport(), probe_set=probe, probe_every=2)
        for x, y in zip(data, labels, strict=True):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        if monitor is not None:
            monitor.close()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        results.append((state, torch.get_rng_state(), opt.state_dict()["state"][0]["exp_avg"]))
    (plain, rng_plain, avg_plain), (watched, rng_watched, avg_watched) = results
    assert plain.keys() == watched.keys()
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key
    assert torch.equal(rng_plain, rng_watched)
    assert torch.equal(avg_plain, avg_watched)


def test_recorded_sample_indices_reach_the_step_summary() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    transport = ListTransport()
    with Monitor(model, optimizer, transport) as mon:
        for step in range(3):
            mon.record_indices(torch.arange(step * 8, step * 8 + 8))
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
        model(torch.randn(8, 4)).sum().backward()  # a step without indices
        optimizer.step()
    got = [s.sample_indices for s in transport.summaries]
    assert got == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24)), None]
