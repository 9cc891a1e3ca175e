"""What attaching the report costs a training job: ``close()`` with and without it.

Each measurement is a fresh process that trains ResNet-20 on random 32x32 images with APT
probes, sweeps and a probe set under ``watch`` (embedded: SQLite store, SQLite MLflow), and
times ``close()`` and, after it, the host's work until it exits: with ``mlflow_report`` on, the
host renders the report (PNGs, HTML page, alerts.json) and uploads it before it ends the MLflow
run. It does that after it has told the job that the run is stored, so ``close`` does not wait
for it; ``attached`` is how much longer the report takes to reach MLflow.

    python benchmarks/report_close.py --steps 100 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import ResNet20


def one_run(folder: Path, steps: int, report: bool) -> dict[str, float]:
    """Train under watch in this process; the seconds of the loop and of ``close()``."""
    from monitor.client import watch
    from monitor.settings import Settings

    torch.manual_seed(0)
    model = ResNet20()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    settings = Settings(
        database_url=f"sqlite:///{folder / 'apmon.db'}",
        mlflow_tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        mlflow_report=report,
    )
    probe = torch.randn(64, 3, 32, 32)
    mon = watch(
        model,
        optimizer,
        settings=settings,
        apt_every=8,
        sweep_every=25,
        probe_set=probe,
        probe_every=25,
    )
    began = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(torch.randn(32, 3, 32, 32)), torch.randint(0, 10, (32,))
        )
        loss.backward()
        optimizer.step()
        mon.record_loss(loss)
    trained = time.perf_counter()
    mon.close()
    closed = time.perf_counter()
    mon.transport.wait_for_host(timeout=600)  # type: ignore[attr-defined]
    return {
        "loop": trained - began,
        "close": closed - trained,
        "attached": time.perf_counter() - closed,
    }


def main() -> None:
    """Alternate report on/off in fresh processes; print each close() and the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(Path(args.folder), args.steps, args.child == "on")))
        return
    closes: dict[str, list[float]] = {"on": [], "off": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            with tempfile.TemporaryDirectory() as folder:
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        mode,
                        "--folder",
                        folder,
                        "--steps",
                        str(args.steps),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                result = json.loads(done.stdout.strip().splitlines()[-1])
                closes[mode].append(result["close"])
                loop, close, attached = result["loop"], result["close"], result["attached"]
                print(
                    f"report {mode:<3}  loop {loop:6.1f} s  close {close:5.2f} s  "
                    f"host done {attached:5.2f} s later",
                    flush=True,
                )
    on, off = statistics.median(closes["on"]), statistics.median(closes["off"])
    print(f"median close(): {off:.2f} s without the report, {on:.2f} s with it (+{on - off:.2f} s)")


if __name__ == "__main__":
    main()
