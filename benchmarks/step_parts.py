"""Where a monitored step's time goes once a run is warm: one process, embedded store and MLflow.

``e2e.py`` times whole runs in fresh processes; this script looks inside one. It trains a model
under ``watch(model, opt)`` at its defaults (SQLite store and MLflow in a temporary folder),
lets ``--warm`` seconds pass (the host's start-up and MLflow's connection), then times
``--steps`` monitored steps and as many plain ones in the same process, and prints per step:
the monitored and plain times, what the training thread spent in the embedded transport's
calls (pickling onto the pipe, marks, reading answers, waiting for the host), and the host
process's CPU by thread (its main thread runs the plugins, the others store and mirror).

    python benchmarks/step_parts.py                         # small MLP, torch's default threads
    python benchmarks/step_parts.py --model digits_cnn --threads 1
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import MODELS, stat_cpu_s, training

TRANSPORT_CALLS = ("send_summary", "send_probe", "mark", "wait_for_mark", "poll_alerts")


def time_transport_calls(spent: collections.defaultdict[str, float]) -> None:
    """Wrap the embedded transport's public calls so that their seconds add up in ``spent``."""
    from monitor.client.embedded import EmbeddedTransport

    for name in TRANSPORT_CALLS:
        original = getattr(EmbeddedTransport, name)

        def timed(
            self: Any,
            *args: Any,
            _call: Callable[..., Any] = original,
            _name: str = name,
            **kwargs: Any,
        ) -> Any:
            began = time.perf_counter()
            try:
                return _call(self, *args, **kwargs)
            finally:
                spent[_name] += time.perf_counter() - began

        setattr(EmbeddedTransport, name, timed)


def host_cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of process ``pid`` (keyed by thread id and name)."""
    seconds: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as file:
                stat = file.read()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        seconds[f"{tid} {name}"] = stat_cpu_s(stat)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mlp_small")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    parser.add_argument("--warm", type=float, default=6.0, help="seconds of monitored warm-up")
    parser.add_argument("--steps", type=int, default=4000)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import monitor
    from monitor.settings import Settings

    spent: collections.defaultdict[str, float] = collections.defaultdict(float)
    time_transport_calls(spent)
    model, opt, step = training(args.model)

    with tempfile.TemporaryDirectory(prefix="apmon-step-parts-") as tmp:
        settings = Settings(
            database_url=f"sqlite:///{Path(tmp) / 'apmon.db'}",
            mlflow_tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}",
        )
        mon = monitor.watch(model, opt, settings=settings)
        monitored = mon(step)
        began = time.perf_counter()
        while time.perf_counter() - began < args.warm:
            monitored()
        pid = mon.transport._process.pid  # type: ignore[attr-defined]
        spent.clear()
        before = host_cpu_by_thread(pid)
        began = time.perf_counter()
        for _ in range(args.steps):
            monitored()
        monitored_s = (time.perf_counter() - began) / args.steps
        after = host_cpu_by_thread(pid)
        mon.close()
        mon.transport.wait_for_host(300)  # type: ignore[attr-defined]
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    plain_s = (time.perf_counter() - began) / args.steps
    print(
        f"{args.model}, torch threads {torch.get_num_threads()}, {args.steps} steps after "
        f"{args.warm:g} s of warm-up: monitored {monitored_s * 1e3:.3f} ms/step, plain "
        f"{plain_s * 1e3:.3f} ms/step, added {(monitored_s - plain_s) * 1e3:+.3f} ms/step"
    )
    print("training thread in the transport (ms/step):")
    for name in TRANSPORT_CALLS:
        print(f"  {name:15s} {spent[name] / args.steps * 1e3:.3f}")
    print("host process CPU by thread (ms/step):")
    for thread, seconds in after.items():
        used = seconds - before.get(thread, 0.0)
        if used > 0:
            print(f"  {thread:25s} {used / args.steps * 1e3:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
