"""A fixed probe set stays fixed: functional dropout off, chunks along the batch dimension."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from monitor.client.capture import ModuleTracker
from monitor.client.probeset import ProbeSet, evaluate
from monitor.client.summary import to_wire


def wire(model: nn.Module, probe: ProbeSet) -> dict:
    tracker = ModuleTracker(model, lambda *_: None, sign_mode=False)
    try:
        result = evaluate(model, tracker, probe)
    finally:
        tracker.close()
    return {name: to_wire(name, stats, 10**6) for name, stats in result.stats.items()}


def encoder(dropout: float, batch_first: bool = True) -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(
        16, 2, dim_feedforward=32, dropout=dropout, activation="relu", batch_first=batch_first
    )


def test_attention_dropout_is_off_in_probe_set_forwards() -> None:
    model = encoder(0.3).train()
    x = torch.randn(40, 5, 16)
    first = wire(model, ProbeSet(x))
    torch.randn(1000)  # training moves the generator between evaluations
    second = wire(model, ProbeSet(x))
    assert list(first) == ["model#0"]
    assert first == second
    # The oracle: the same layer with every dropout probability set to 0, attention's included.
    quiet = copy.deepcopy(model)
    quiet.self_attn.dropout = 0.0
    for module in quiet.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    assert first == wire(quiet, ProbeSet(x))
    # ...and the dropout was on: without the probe set's guard the patterns differ.
    noisy = wire_without_guard(model, x)
    assert noisy != first


def wire_without_guard(model: nn.Module, x: torch.Tensor) -> dict:
    from monitor.client.summary import measure

    seen = {}

    def on_site(name: str, _mode: str, pre: torch.Tensor) -> None:
        seen[name] = to_wire(name, measure(pre.detach(), "seq", None), 10**6)

    tracker = ModuleTracker(model, on_site, sign_mode=False)
    tracker.armed = True
    with torch.no_grad():
        model(x)
    tracker.close()
    return seen


def test_chunks_run_along_batch_dim(caplog: pytest.LogCaptureFixture) -> None:
    model = encoder(0.0, batch_first=False).train()
    x = torch.randn(7, 300, 16)  # (T, N, d)
    whole = wire(model, ProbeSet(x, chunk=1000, batch_dim=1))
    chunked = ProbeSet(x, chunk=128, batch_dim=1)
    assert [tuple(c.shape) for c, _ in chunked.chunks()] == [
        (7, 128, 16),
        (7, 128, 16),
        (7, 44, 16),
    ]
    merged = wire(model, chunked)
    # Exact everywhere, but the sum of squares is added in another order across chunks.
    assert {k: v.model_copy(update={"sumsq": 0.0}) for k, v in merged.items()} == {
        k: v.model_copy(update={"sumsq": 0.0}) for k, v in whole.items()
    }
    for name, summary in merged.items():
        assert summary.sumsq == pytest.approx(whole[name].sumsq, rel=1e-12)
    with caplog.at_level(logging.WARNING, logger="monitor"):
        along_time = ProbeSet(torch.randn(300, 2, 16), chunk=256)
        list(along_time.chunks())
        list(along_time.chunks())
    assert sum("batch_dim=1" in r.getMessage() for r in caplog.records) == 1
