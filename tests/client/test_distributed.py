"""Two CPU processes over gloo: the merged statistics equal the single-process ones."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from memory_transport import ListTransport
from torch import nn

from monitor.client.distributed import all_gather_stats, merge_all
from monitor.client.handle import Monitor
from monitor.client.summary import measure, to_wire
from monitor.schema import StepSummary

WORLD = 2


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(16, 8, 5, 5, generator=gen)
    dense = torch.randn(16, 100, generator=gen)  # two words per pattern
    labels = torch.randint(0, 3, (16,), generator=gen)
    return conv, dense, labels


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 70), nn.ReLU()
    )


def dump(summaries: list[StepSummary]) -> str:
    return json.dumps([s.model_dump(mode="json") for s in summaries])


def worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    # Creating a gloo group is not a synchronisation point, and a rank that tears its group down
    # while the peer is still connecting or sending can abort the peer in gloo's C++ threads:
    # both barriers keep the ranks in step at the two ends of the group's life.
    dist.barrier()
    try:
        conv, dense, labels = data()
        part = slice(rank * 8, rank * 8 + 8)
        stats = {
            "conv": measure(conv[part], "conv", labels[part]),
            "dense": measure(dense[part], "dense", labels[part]),
        }
        merged = all_gather_stats(stats)
        wire = [to_wire(name, s, sketch_k=16) for name, s in merged.items()]
        Path(out, f"stats{rank}.json").write_text(
            json.dumps([w.model_dump(mode="json") for w in wire])
        )
        # the same through the Monitor: each rank forwards its half of the batch
        net = model()
        transport = ListTransport()
        opt = torch.optim.SGD(net.parameters(), lr=0.0)  # no DDP here: keep ranks' weights equal
        x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        probe = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(2))
        with Monitor(
            net,
            opt,
            transport,
            merge_ranks=True,
            sketch_k=16,
            probe_set=probe[rank * 5 : rank * 5 + 5],
            probe_every=1,
        ) as monitor:
            monitor.set_labels(labels[part])
            net(x[part]).sum().backward()
            opt.step()
        Path(out, f"monitor{rank}.json").write_text(dump(transport.summaries))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path: Path) -> Path:
    """Run both ranks; their outputs land in the returned folder.

    A rank killed by a signal (gloo's native threads can abort at teardown, rarely, as in
    torch's own gloo tests) is run once more in a fresh folder; an exception or a wrong result in
    a rank is never retried.
    """
    for attempt in range(2):
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        try:
            mp.start_processes(
                worker, args=(str(out / "init"), str(out)), nprocs=WORLD, start_method="spawn"
            )
            return out
        except mp.ProcessExitedException as crash:
            if crash.signal_name is None or attempt == 1:
                raise
            warnings.warn(f"gloo rank crashed ({crash}); running the ranks once more", stacklevel=1)
    raise AssertionError("unreachable")


SCALE = ("sumsq", "max_abs", "input/rms", "input/max_abs")


def same(a, b):
    """Equal JSON values, except the scale: equal to 6 digits (each rank's float32 forward of
    its half of the batch may differ from the whole batch's in the last bits; so may the sums
    of squares of the inputs' halves)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return False
        return all(
            (a[k] == pytest.approx(b[k], rel=1e-6)) if k in SCALE and a[k] else same(a[k], b[k])
            for k in a
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_two_process_gloo_merge_equals_single_process(tmp_path):
    out = run_ranks(tmp_path)
    conv, dense, labels = data()
    single = [
        to_wire("conv", measure(conv, "conv", labels), sketch_k=16).model_dump(mode="json"),
        to_wire("dense", measure(dense, "dense", labels), sketch_k=16).model_dump(mode="json"),
    ]
    for rank in range(WORLD):
        assert same(json.loads((out / f"stats{rank}.json").read_text()), single)
    # Monitor with merge_ranks: rank 0 ships the merged summary, rank 1 ships nothing
    net = model()
    transport = ListTransport()
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # no DDP here: keep ranks' weights equal
    x = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    probe = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with Monitor(net, opt, transport, sketch_k=16, probe_set=probe, probe_every=1) as monitor:
        monitor.set_labels(labels)
        net(x).sum().backward()
        opt.step()
    assert {s.source for s in transport.summaries} == {"train", "probe_set"}
    assert same(
        json.loads((out / "monitor0.json").read_text()), json.loads(dump(transport.summaries))
    )
    assert json.loads((out / "monitor1.json").read_text()) == []


def test_merge_all_keeps_sites_seen_by_some_ranks():
    conv, dense, _ = data()
    parts = [
        {"a": measure(dense[:8], "dense")},
        {"a": measure(dense[8:], "dense"), "b": measure(conv, "conv")},
    ]
    merged = merge_all(parts)
    assert list(merged) == ["a", "b"]
    assert merged["a"].counts.as_dict() == measure(dense, "dense").counts.as_dict()
