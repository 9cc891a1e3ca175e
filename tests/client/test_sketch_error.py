"""The bottom-k sketch's weighted-Jaccard error on real probe sets, against exact values.

Stated bound (``monitor.client.summary``): at the default k = 256, |estimate - exact| <= 0.05 for
weighted Jaccard between probe-set measurements. The nets below are trained on a small synthetic
classification task and measured on a fixed probe set at several steps; every site whose
measurement has more than k distinct patterns exercises the sketch.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monitor.client.capture import ModuleTracker
from monitor.client.probeset import ProbeSet, evaluate
from monitor.client.summary import DEFAULT_SKETCH_K, to_wire
from monitor.sketch import pattern_changes, weighted_jaccard

BOUND = 0.05


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 4),
    )  # fmt: skip


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)
    )


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes of noisy 3x4x4 images around fixed class templates."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, 4, (n,), generator=gen)
    return templates[y] + 0.8 * torch.randn(n, 3, 4, 4, generator=gen), y


def measurements(make: type | object, steps: tuple[int, ...]) -> list[dict]:
    """Exact statistics of the probe set at the given training steps."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    tracker = ModuleTracker(model, lambda *a: None, sign_mode=False)
    probe = ProbeSet(task(600, seed=1)[0], chunk=200)
    x, y = task(4000, seed=2)
    taken = []
    for step in range(max(steps) + 1):
        if step in steps:
            taken.append(evaluate(model, tracker, probe).stats)
        batch = slice((step * 32) % 4000, (step * 32) % 4000 + 32)
        opt.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    tracker.close()
    return taken


@pytest.mark.parametrize("make", [conv_net, mlp])
def test_weighted_jaccard_sketch_error_within_bound(make):
    taken = measurements(make, steps=(0, 1, 5, 20, 60))
    errors = []
    sketched_sites = 0
    for a, b in itertools.combinations(taken, 2):
        for site in a:
            exact_a, exact_b = to_wire(site, a[site], 10**9), to_wire(site, b[site], 10**9)
            sketch_a = to_wire(site, a[site], DEFAULT_SKETCH_K)
            sketch_b = to_wire(site, b[site], DEFAULT_SKETCH_K)
            if sketch_a.patterns_exact and sketch_b.patterns_exact:
                continue
            sketched_sites += 1
            exact = weighted_jaccard(exact_a, exact_b)
            errors.append(abs(weighted_jaccard(sketch_a, sketch_b) - exact))
            # the exact summaries give the exact value: check against a direct computation
            ca, cb = dict(exact_a.patterns), dict(exact_b.patterns)
            union = ca.keys() | cb.keys()
            direct = sum(min(ca.get(p, 0), cb.get(p, 0)) for p in union) / sum(
                max(ca.get(p, 0), cb.get(p, 0)) for p in union
            )
            assert exact == pytest.approx(direct, abs=1e-12)
            # changes are estimated from the same sample; exact summaries give exact changes
            changes = pattern_changes(exact_a, exact_b)
            appeared = len(cb.keys() - ca.keys()) / len(ca)
            assert changes["appeared"] == pytest.approx(appeared, abs=1e-12)
    assert sketched_sites >= 10  # the sketch was really exercised
    assert max(errors) <= BOUND, sorted(errors)[-5:]
