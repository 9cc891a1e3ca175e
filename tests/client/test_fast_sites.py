"""The fast hooks (``monitor.client.fast_sites``) report what the full capture reports, and give
way to it whenever a forward shows a site that they would not see."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from monitor.client.capture import RECHECK_EVERY, VERIFY_FORWARDS, ModuleTracker


class Hookable(nn.Module):
    """ReLU modules (one called twice), a functional ReLU on a submodule's output, a ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 8)
        self.six = nn.ReLU6()
        self.out = nn.Linear(8, 3)
        self.extra = False  # a functional site on an input that no module returned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        x = F.relu(self.fc3(x))
        x = self.six(x)
        if self.extra:
            x = F.relu(x - 0.5)
        return self.out(x)


def record(model: nn.Module, x: torch.Tensor, forwards: int) -> tuple[ModuleTracker, list]:
    """Each forward's sites as sorted (name, mode, preactivation) tuples."""
    per_forward: list[list] = []
    seen: list = []
    tracker = ModuleTracker(model, lambda n, m, p: seen.append((n, m, p.detach().clone())), False)
    tracker.armed = True
    for _ in range(forwards):
        seen.clear()
        model(x).sum().backward()
        per_forward.append(sorted(seen, key=lambda s: s[0]))
    return tracker, per_forward


def assert_same_sites(first: list, other: list) -> None:
    assert [(n, m) for n, m, _ in other] == [(n, m) for n, m, _ in first]
    for (_, _, a), (_, _, b) in zip(first, other, strict=True):
        assert torch.equal(a, b)


def test_fast_hooks_report_the_names_and_tensors_of_the_full_capture():
    torch.manual_seed(0)
    tracker, forwards = record(Hookable(), torch.randn(5, 6), VERIFY_FORWARDS + 3)
    assert tracker.fast_sites is not None
    kinds = {path: site.when for path, site in tracker.fast_sites.items()}
    assert kinds == {"act": "input", "fc3": "output", "six": "input"}
    assert [name for name, _, _ in forwards[0]] == ["act#0", "act#1", "model#0", "six#0"]
    for later in forwards[VERIFY_FORWARDS:]:  # the forwards with the fast hooks
        assert_same_sites(forwards[0], later)


def test_torchvision_resnet_blocks_take_the_fast_hooks():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    tracker, forwards = record(model, torch.randn(2, 3, 32, 32), VERIFY_FORWARDS + 1)
    assert tracker.fast_sites is not None
    assert tracker.fast_sites["layer1.0.relu"].names == ("layer1.0.relu#0", "layer1.0.relu#1")
    assert_same_sites(forwards[0], forwards[-1])


class ShiftedThenRelu(nn.Module):
    """Changes its input in place before the ReLU: a pre-hook would see the wrong values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.add_(1.0)
        return F.relu(x)


def test_sites_no_hook_sees_keep_the_full_capture():
    shifted = nn.Sequential(nn.Linear(4, 4), ShiftedThenRelu(), nn.Linear(4, 2))
    for model in (shifted, nn.Sequential(nn.Linear(4, 4), nn.Tanh())):
        tracker, forwards = record(model, torch.randn(3, 4), VERIFY_FORWARDS + 2)
        assert tracker.fast_sites is None
        assert all(len(f) == len(forwards[0]) for f in forwards)


def test_a_site_that_appears_later_ends_the_fast_hooks_at_the_next_check():
    torch.manual_seed(0)
    model = Hookable()
    x = torch.randn(5, 6)
    tracker, _ = record(model, x, VERIFY_FORWARDS)
    assert tracker.fast_sites is not None
    model.extra = True
    seen: list[str] = []
    tracker.on_site = lambda name, mode, pre: seen.append(name)
    for _ in range(RECHECK_EVERY - VERIFY_FORWARDS):  # fast forwards: the new site is unseen
        model(x)
    assert "model#1" not in seen
    model(x)  # the recheck
    assert tracker.fast_sites is None
    seen.clear()
    model(x)
    assert sorted(seen) == ["act#0", "act#1", "model#0", "model#1", "six#0"]


def test_an_activation_module_called_outside_the_watched_forward_ends_the_fast_hooks():
    torch.manual_seed(0)
    model = Hookable()
    tracker, _ = record(model, torch.randn(5, 6), VERIFY_FORWARDS)
    assert tracker.fast_sites is not None
    with torch.no_grad():  # a validation forward is not captured: nothing changes
        model.act(torch.randn(2, 8))
    assert tracker.fast_sites is not None
    model.act(torch.randn(2, 8))  # a training forward that the root's hook does not see
    assert tracker.fast_sites is None
