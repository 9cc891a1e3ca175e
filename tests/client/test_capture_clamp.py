"""ReLUs in all but name: ``clamp(min=0)``, ``clamp_min(0)``, ``clip`` and ``Hardtanh(0, x)``."""

from __future__ import annotations

import torch
from torch import nn

from monitor.client.capture import ModuleTracker


class Clamps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 8)
        self.hardtanh = nn.Hardtanh(0.0, 2.0)
        self.pre: list[torch.Tensor] = []  # what each ReLU-like call received, for the oracle

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        self.pre.append(x.detach().clone())
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lin(x)
        x = torch.clamp(self.keep(x - 0.5), min=0)
        x = self.keep(x - 0.5).clamp(0)
        x = torch.clamp_min(self.keep(x - 0.5), 0.0)
        x = self.keep(x - 0.5).clamp_min(0)
        x = self.keep(x - 0.5).clip(min=0, max=3)
        y = self.keep(x - 0.5)
        y.clamp_(min=0)
        x = self.hardtanh(self.keep(y - 0.5))
        # Not ReLU-like: other lower bounds, a tensor bound, an upper bound only.
        x = torch.clamp(x - 0.5, min=-1.0)
        x = torch.clamp(x, min=torch.zeros(8))
        return torch.clamp(x, max=1.0)


def test_clamp_forms_are_relu_sites() -> None:
    torch.manual_seed(0)
    model = Clamps()
    seen: list[tuple[str, str, torch.Tensor]] = []
    tracker = ModuleTracker(model, lambda n, m, p: seen.append((n, m, p.clone())), False)
    tracker.armed = True
    model(torch.randn(5, 4))
    tracker.close()
    names = [name for name, _, _ in seen]
    assert names == [f"model#{k}" for k in range(6)] + ["hardtanh#0"]
    assert {mode for _, mode, _ in seen} == {"relu"}
    assert len(model.pre) == len(seen)
    for (_, _, got), expected in zip(seen, model.pre, strict=True):
        assert torch.equal(got, expected)  # the preactivation, before an in-place clamp
