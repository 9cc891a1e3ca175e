"""What a user pays: a whole monitored run (loop + ``close()``) against plain training.

Each measurement is a fresh process that builds the model, trains it plainly or under
``@monitor.watch(model, opt, ...)`` with the embedded store (SQLite) and MLflow (SQLite store)
on, and reports its times. Processes of one round run one after another, modes interleaved (in
reverse order every other round), so the machine's load hits every mode alike; ratios are
medians over rounds with a 90% bootstrap interval, and every round's ratio is printed too. Modes:

- ``plain``: no monitor;
- ``defaults``: ``watch(model, opt)`` as a user writes it (detectors on at their defaults);
- ``every10``: ``watch(model, opt, every=10)``;
- ``capture``: ``watch(model, opt)`` with a transport that drops every record: the capture path
  alone, the breakdown of ``defaults``;
- ``nomlflow``: ``defaults`` with MLflow off (``mlflow_tracking_uri=""``): what the MLflow
  mirror (importing mlflow, its store, the metrics) adds, another breakdown;
- ``nokernels``: ``defaults`` with ``compiled_kernels="never"`` (numba never loaded): what a
  user who keeps the job's memory flat pays in time.

``close()`` returns once the apmon database has the run; the host then brings MLflow up to date
and attaches the report at idle priority. The breakdown says how long after ``close()`` that
took and the CPU seconds the host and its MLflow process used in all (the ratios do not include
that work: training is over when it runs, on CPU that nothing else wanted).

Torch's OpenMP threads spin for a while after each parallel region (libgomp's default), and
on a machine whose cores are all training's the host process competes with them; with
``--omp-wait-policy passive`` every process of the run (plain ones too) gets
``OMP_WAIT_POLICY=PASSIVE``, which a user sets in the environment before starting Python.

    python benchmarks/e2e.py                       # the table, torch at its default threads
    python benchmarks/e2e.py --threads 1 --threads 0 --rounds 3
    python benchmarks/e2e.py --soak 10000           # RSS and queue of 10,000 small-MLP steps
    python benchmarks/e2e.py --soak 10000 --compiled-kernels never
    python benchmarks/e2e.py --omp-wait-policy passive --models mlp3072 digits_cnn
    python benchmarks/e2e.py --device cuda --rounds 3   # on a GPU machine (the GPU table)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import ResNet20, mlp
from overhead import median_interval

if TYPE_CHECKING:
    from monitor.client.handle import Monitor
    from monitor.settings import KernelPolicy

# The device every measured process trains on (``--device``; the workers inherit it).
DEVICE_VARIABLE = "APMON_E2E_DEVICE"
MODELS = ("resnet20", "mlp3072", "digits_cnn", "mlp_small")
MODES = ("plain", "defaults", "every10", "capture", "nomlflow", "nokernels")
TARGETS = {"resnet20": 1.10, "mlp3072": 1.15, "digits_cnn": 1.5}
T = TypeVar("T")


def digits_cnn() -> nn.Module:
    """The demo's CNN: two conv ReLU sites and one dense, 8x8 inputs."""
    from monitor.demo import DigitsCNN

    return DigitsCNN()


def small_mlp() -> nn.Module:
    """MLP 32-128-128-64 with three ReLU sites."""
    return nn.Sequential(
        nn.Linear(32, 128),
        nn.ReLU(),
        nn.Linear(128, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The model and one fixed batch (inputs, labels) of the size in the issue's table."""
    torch.manual_seed(0)
    makers: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
        "resnet20": (ResNet20, (128, 3, 32, 32)),
        "mlp3072": (mlp, (128, 3072)),
        "digits_cnn": (digits_cnn, (64, 1, 8, 8)),
        "mlp_small": (small_mlp, (64, 32)),
    }
    make, shape = makers[name]
    return make(), torch.randn(*shape), torch.randint(0, 10, (shape[0],))


def training(
    name: str, device: str = "cpu"
) -> tuple[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]]:
    """The model, its optimizer (SGD, momentum 0.9) and one plain training step on its batch.

    On a GPU each step ends with ``torch.cuda.synchronize()``, monitored or not, so that a
    step's time is its work and not the launch of its kernels (as a loop that reads its loss
    each step would see it).
    """
    model, x, y = build(name)
    model, x, y = model.to(device), x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    wait = torch.cuda.synchronize if device.startswith("cuda") else lambda: None

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        wait()
        return loss.detach()

    return model, opt, step


class DropTransport:
    """Takes every record and keeps nothing: what the capture path costs on its own."""

    run_id = "capture-only"

    def start_run(self, start: Any) -> str:
        return self.run_id

    def add_sites(self, sites: Any) -> None:
        """Drop."""

    def send_summary(self, summary: Any) -> None:
        """Drop."""

    def send_probe(self, probe: Any) -> None:
        """Drop."""

    def poll_alerts(self) -> list[Any]:
        return []

    def finish(self, final_step: int) -> None:
        """Nothing to finish."""


def worker(name: str, mode: str, threads: int, steps: int, folder: Path) -> dict[str, Any]:
    """One measurement in this process; the figures as a dict."""
    if threads:
        torch.set_num_threads(threads)
    device = os.environ.get(DEVICE_VARIABLE, "cpu")
    model, opt, step = training(name, device)
    for _ in range(3):  # allocator and thread-pool warm-up, as a user's first steps
        step()
    figures: dict[str, Any] = {"model": name, "mode": mode, "threads": threads, "steps": steps}
    figures["device"] = device
    stamps: list[float] = []  # after each step: the second half of the loop is the steady state
    if mode == "plain":
        begin, cpu = time.perf_counter(), _own_cpu_s()
        for _ in range(steps):
            step()
            stamps.append(time.perf_counter())
        figures["total_s"] = time.perf_counter() - begin
        figures["steady_s_per_step"] = _steady_s_per_step(stamps)
        figures["cpu_s"] = _own_cpu_s() - cpu
        figures["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return figures
    import monitor
    from monitor.settings import Settings

    settings = Settings(
        database_url=f"sqlite:///{folder / 'apmon.db'}",
        mlflow_tracking_uri="" if mode == "nomlflow" else f"sqlite:///{folder / 'mlflow.db'}",
        compiled_kernels="never" if mode == "nokernels" else "auto",
    )
    options: dict[str, Any] = {"every": 10} if mode == "every10" else {}
    transport = DropTransport() if mode == "capture" else None
    delays: list[int] = []
    begin, cpu = time.perf_counter(), _own_cpu_s()
    mon: Monitor = monitor.watch(
        model,
        opt,
        settings=settings,
        transport=transport,
        on_alert=lambda alert: delays.append(mon.step - 1 - alert.step),
        **options,
    )
    setup = time.perf_counter() - begin
    monitored = mon(step)
    lag = 0
    for _ in range(steps):
        monitored()
        stamps.append(time.perf_counter())
        marks = getattr(mon.transport, "_marks_sent", 0) - getattr(mon.transport, "_marks_seen", 0)
        lag = max(lag, marks)
    loop_end = time.perf_counter()
    host_rss = _host_peak_rss_mb(mon.transport)
    mon.close()
    end = time.perf_counter()
    cpu = _own_cpu_s() - cpu
    host_cpu = _host_cpu_s(mon.transport)  # loop and close, not what the host does after
    # Untimed, so that the next run starts on a quiet machine: the host finishing MLflow and
    # the report after close(), at idle priority.
    _wait_for_host(mon.transport)
    after_close = time.perf_counter() - end
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures.update(
        total_s=end - begin,
        steady_s_per_step=_steady_s_per_step(stamps),
        cpu_s=cpu,
        host_cpu_s=host_cpu,
        host_total_cpu_s=children.ru_utime + children.ru_stime,
        mlflow_after_close_s=after_close,
        setup_s=setup,
        loop_s=loop_end - begin - setup,
        close_s=end - loop_end,
        captured=sum(1 for s in range(steps + 3) if mon.schedule(s)),
        pattern_stride=mon.capture_budget.stride,
        waited_s=getattr(mon.transport, "waited_seconds", 0.0),
        late_marks=getattr(mon.transport, "late_marks", 0),
        dropped=getattr(mon.transport, "dropped", 0),
        max_lag_steps=lag,
        alerts=len(mon.alerts),
        max_alert_delay=max(delays, default=None),
        rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        host_rss_mb=host_rss,
    )
    return figures


def _steady_s_per_step(stamps: list[float]) -> float | None:
    """Seconds per step over the second half of a loop (None for a loop of under 10 steps).

    The first half carries what a run pays once (the host's start-up, the kernels' loading); the
    second half is what each further step of a longer run costs.
    """
    if len(stamps) < 10:
        return None
    half = len(stamps) // 2
    return (stamps[-1] - stamps[half - 1]) / (len(stamps) - half)


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _wait_for_host(transport: Any) -> None:
    """After close(): wait (up to 300 s) until the host process has finished MLflow and exited."""
    wait = getattr(transport, "wait_for_host", None)
    if wait is not None:
        wait(300)


def _host_proc(transport: Any, name: str) -> str | None:
    """The text of /proc/<host pid>/<name> of the embedded host process (None without one)."""
    process = getattr(transport, "_process", None)
    if process is None:
        return None
    try:
        with open(f"/proc/{process.pid}/{name}") as file:
            return file.read()
    except OSError:
        return None


def _host_cpu_s(transport: Any) -> float:
    """CPU seconds the embedded host process and its MLflow process have used so far.

    0 without a host. The MLflow process is the host's child (``monitor.sinks.mlflow_process``),
    read while it lives (until the host has attached the report, after ``close()``).
    """
    process = getattr(transport, "_process", None)
    if process is None:
        return 0.0
    pids = [str(process.pid)]
    task = f"/proc/{process.pid}/task"
    with contextlib.suppress(OSError):
        for tid in os.listdir(task):
            pids += _read(f"{task}/{tid}/children").split()
    return sum(stat_cpu_s(stat) for stat in map(_read, (f"/proc/{p}/stat" for p in pids)) if stat)


def _read(path: str) -> str:
    """A /proc file's text ("" once it is gone)."""
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


def stat_cpu_s(stat: str) -> float:
    """User + system CPU seconds in the text of a /proc/<pid>[/task/<tid>]/stat file."""
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _host_peak_rss_mb(transport: Any) -> float:
    """Peak RSS of the embedded host process (0 without one), read before it exits."""
    for line in (_host_proc(transport, "status") or "").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spawn(args: list[str], checkout: Path | None = None) -> dict[str, Any]:
    """Run one worker process; its JSON figures.

    ``checkout``: another apmon checkout whose ``e2e.py`` and package the worker runs
    (``e2e_ab.py``); default this one.
    """
    script, env = __file__, None
    if checkout is not None:
        script = str(checkout / "benchmarks" / "e2e.py")
        env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        [sys.executable, script, "--worker", *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def calibrate(name: str, threads: int, seconds: float, folder: Path) -> int:
    """Steps whose plain loop takes about ``seconds``."""
    probe = spawn([name, "plain", str(threads), "20", str(folder)])
    per_step = probe["total_s"] / 20
    return max(20, int(seconds / per_step))


def prepare_stores(folder: Path) -> None:
    """Create the SQLite and MLflow stores once, as a user's first run does, outside the timing."""
    spawn(["mlp_small", "defaults", "1", "20", str(folder)])


def table(rows: list[list[str]], header: list[str]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def round_order(modes: Sequence[T], round_no: int) -> list[T]:
    """The order of the modes' runs in round ``round_no`` (from 0): reversed every other one.

    A mode that always ran right after another would carry whatever that one left behind (a
    page cache it warmed, a drift in the machine's load) in every round. ``e2e_ab.py`` and
    ``budget_own.py`` alternate their versions and budgets by it too.
    """
    return list(modes) if round_no % 2 == 0 else list(reversed(modes))


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    """Every model x mode x thread setting, in interleaved rounds; prints the tables."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="apmon-e2e-") as tmp:
        folder = Path(tmp)
        prepare_stores(folder)
        for threads in args.threads:
            steps = {m: calibrate(m, threads, args.seconds, folder) for m in args.models}
            runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for round_no in range(args.rounds):
                for name in args.models:
                    for mode in round_order(args.modes, round_no):
                        figures = spawn([name, mode, str(threads), str(steps[name]), str(folder)])
                        runs.setdefault((name, mode), []).append(figures)
                print(
                    f"threads={threads or 'default'}: round {round_no + 1}/{args.rounds} done",
                    file=sys.stderr,
                    flush=True,
                )
            results[str(threads)] = summarise(runs, args, threads)
        results["host_fixed_cpu_s"] = host_fixed_cost(folder, args.rounds)
    return results


def host_fixed_cost(folder: Path, rounds: int) -> float:
    """CPU seconds the host process of an empty run uses: what every run pays once.

    ``watch()`` and ``close()`` with no step between: the host's interpreter, imports, store,
    MLflow connection and finish. On 2 cores with torch on both, training loses about that much
    time at the start of a run; the per-step figures above include it, spread over the run.
    """
    spent = [
        spawn(["mlp_small", "defaults", "0", "0", str(folder)])["host_cpu_s"]
        for _ in range(max(rounds, 1))
    ]
    fixed = statistics.median(spent)
    print(
        f"\nHost fixed cost per run (an empty run: start-up, imports, store, MLflow, finish): "
        f"{fixed:.2f} CPU-s, median of {len(spent)}"
    )
    return fixed


def summarise(
    runs: dict[tuple[str, str], list[dict[str, Any]]], args: argparse.Namespace, threads: int
) -> dict[str, Any]:
    """Ratios per model and mode, printed as the README's table and a breakdown."""
    how = "set" if threads else "default"
    label = f"torch threads: {threads or torch.get_num_threads()} ({how})"
    if os.environ.get("OMP_WAIT_POLICY"):
        label += f", OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} in every process"
    if os.environ.get(DEVICE_VARIABLE, "cpu") != "cpu":
        label += f", device {os.environ[DEVICE_VARIABLE]}"
    out: dict[str, Any] = {}
    rows, details, steady_rows, round_rows = [], [], [], []
    for name in args.models:
        plain = runs[(name, "plain")]
        per_step_ms = statistics.median(r["total_s"] / r["steps"] for r in plain) * 1e3
        row = [name, f"{per_step_ms:.2f}"]
        round_row = [name]
        steady_row = [name, _ms(statistics.median(_steady(p) for p in plain))]
        out[name] = {"plain_ms": per_step_ms}
        for mode in args.modes:
            if mode == "plain":
                continue
            ratios = [
                m["total_s"] / p["total_s"] for m, p in zip(runs[(name, mode)], plain, strict=True)
            ]
            low, high = median_interval(ratios)
            ratio = statistics.median(ratios)
            measured = runs[(name, mode)]
            added = [
                (m["total_s"] - p["total_s"]) / max(m["captured"], 1) * 1e3
                for m, p in zip(measured, plain, strict=True)
            ]
            # CPU per captured step: what the job added to its own CPU time, and the host's.
            job_cpu = [
                (m["cpu_s"] - p["cpu_s"]) / max(m["captured"], 1) * 1e3
                for m, p in zip(measured, plain, strict=True)
            ]
            host_cpu = [m["host_cpu_s"] / max(m["captured"], 1) * 1e3 for m in measured]
            out[name][mode] = {"ratio": ratio, "interval": [low, high], "runs": measured}
            row.append(f"{ratio:.3f}x ({low:.3f}..{high:.3f})")
            round_row.append(", ".join(f"{r:.3f}" for r in ratios))
            steady = [_steady(m) / _steady(p) for m, p in zip(measured, plain, strict=True)]
            # What the run paid beyond its steady pace, less the same for the plain run.
            once = [
                (m["total_s"] - m["steps"] * _steady(m)) - (p["total_s"] - p["steps"] * _steady(p))
                for m, p in zip(measured, plain, strict=True)
            ]
            out[name][mode].update(steady_ratio=statistics.median(steady), once_s=once)
            steady_row.append(
                f"{statistics.median(steady):.3f}x, {statistics.median(once):+.2f} s once"
            )
            details.append(
                [
                    name,
                    mode,
                    f"{statistics.median(added):.3f}",
                    f"{statistics.median(job_cpu):.3f} / {statistics.median(host_cpu):.3f}",
                    f"{statistics.median(m['setup_s'] for m in measured):.3f}",
                    f"{statistics.median(m['close_s'] for m in measured):.3f}",
                    f"{statistics.median(m.get('mlflow_after_close_s', 0.0) for m in measured):.1f}"
                    f" / {statistics.median(m.get('host_total_cpu_s', 0.0) for m in measured):.1f}",
                    f"{max(m['waited_s'] for m in measured):.3f}",
                    str(max(m["max_lag_steps"] for m in measured)),
                    str(max(m["late_marks"] for m in measured)),
                    _worst_delay(measured),
                    str(max(m.get("pattern_stride", 1) for m in measured)),
                    f"{max(p.get('rss_mb', 0.0) for p in plain):.0f} / "
                    f"{max(m['rss_mb'] for m in measured):.0f} / "
                    f"{max(m['host_rss_mb'] for m in measured):.0f}",
                ]
            )
        target = TARGETS.get(name)
        row.append(f"<= {target}x" if target else "-")
        rows.append(row)
        round_rows.append(round_row)
        steady_rows.append(steady_row)
    print(f"\n## Whole run (loop + close) against plain training; {label}\n")
    header = ["model", "plain ms/step", *[m for m in args.modes if m != "plain"], "target"]
    print(table(rows, header))
    print("\nEvery round's ratio (round 1 first):\n")
    print(table(round_rows, ["model", *header[2:-1]]))
    print(
        "\nSteady state: the second half of each loop against plain's (what every further step "
        "of a longer run costs), and the seconds the whole run paid beyond that pace (start-up, "
        "kernel loading, close), less plain's:\n"
    )
    print(table(steady_rows, ["model", "plain ms/step", *header[2:-1]]))
    print("\nBreakdown (medians over rounds; waits, lags and RSS the worst round):\n")
    print(
        table(
            details,
            [
                "model",
                "mode",
                "added ms / captured step",
                "CPU ms / captured step (job added / host and its MLflow process)",
                "watch() s",
                "close() s",
                "host done s after close / its CPU-s in all",
                "waited for host s",
                "host lag (steps)",
                "late marks",
                "alert delay (steps, worst)",
                "patterns counted every k-th step (k, worst)",
                "peak RSS MiB (plain job / job / host)",
            ],
        )
    )
    return out


def _steady(figures: dict[str, Any]) -> float:
    """A run's steady seconds per step (its mean pace where the loop was too short to split)."""
    return float(figures.get("steady_s_per_step") or figures["total_s"] / max(figures["steps"], 1))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _worst_delay(measured: list[dict[str, Any]]) -> str:
    """The longest an alert took to reach on_alert, in steps after its own ("-": no alert)."""
    delays = [m["max_alert_delay"] for m in measured if m.get("max_alert_delay") is not None]
    return str(max(delays)) if delays else "-"


def soak(steps: int, compiled_kernels: KernelPolicy = "auto") -> dict[str, Any]:
    """RSS growth and the host's lag over a long run of the small MLP at defaults.

    RSS counts the pages of shared libraries the process has touched as well as its own
    memory; the private (anonymous) part is printed beside it, and the step at which the
    compiled kernels loaded (numba and LLVM add a one-time step to both) with the rent that
    buys them (``kernel_loader``: the seconds they would have saved so far), and the loop's
    milliseconds a step (``compiled_kernels="never"`` trades the step for time).
    """
    torch.set_num_threads(1)
    import monitor
    from monitor.client import kernel_loader
    from monitor.settings import Settings

    model, opt, plain_step = training("mlp_small")
    with tempfile.TemporaryDirectory(prefix="apmon-soak-") as tmp:
        folder = Path(tmp)
        settings = Settings(
            database_url=f"sqlite:///{folder / 'apmon.db'}",
            mlflow_tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            compiled_kernels=compiled_kernels,
        )
        began = time.perf_counter()
        mon = monitor.watch(model, opt, settings=settings)
        step = mon(plain_step)
        rss: list[float] = []
        private: list[float] = []
        rent: list[float] = []
        lag = 0
        loaded_at: int | None = None
        for i in range(steps):
            step()
            transport = mon.transport
            behind = getattr(transport, "_marks_sent", 0) - getattr(transport, "_marks_seen", 0)
            lag = max(lag, behind)
            if loaded_at is None and kernel_loader.kernels() is not None:
                loaded_at = i
            if i % 500 == 0 or i == steps - 1:
                rss.append(_current_rss_mb())
                private.append(_private_rss_mb())
                rent.append(kernel_loader.would_have_saved())
        host_rss = _host_peak_rss_mb(mon.transport)
        mon.close()
        loop_s = time.perf_counter() - began
        _wait_for_host(mon.transport)  # it renders the report after close(): keep its folder
        after_500 = 1 if len(rss) > 1 else 0  # the first reading is at step 0
        figures: dict[str, Any] = {
            "steps": steps,
            "compiled_kernels": compiled_kernels,
            "ms_per_step_with_close": 1000 * loop_s / steps,
            "rss_mb_after_first_500": rss[after_500],
            "rss_mb_end": rss[-1],
            "growth_mb": rss[-1] - rss[after_500],
            "private_growth_mb": private[-1] - private[after_500],
            "kernels_loaded_at_step": loaded_at,
            "kernel_rent_s_end": rent[-1],
            "max_lag_steps": lag,
            "pending_end": transport.pending() if hasattr(transport, "pending") else 0,
            "dropped": getattr(transport, "dropped", 0),
            "host_peak_rss_mb": host_rss,
            "rss_mb_every_500": [round(v, 1) for v in rss],
            "private_mb_every_500": [round(v, 1) for v in private],
            "kernel_rent_s_every_500": [round(v, 2) for v in rent],
        }
    print(json.dumps({k: v for k, v in figures.items() if not isinstance(v, list)}, indent=2))
    for key in ("rss_mb_every_500", "private_mb_every_500", "kernel_rent_s_every_500"):
        print(f"{key}: {' '.join(str(v) for v in figures[key])}")
    return figures


def _current_rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _private_rss_mb() -> float:
    """The resident anonymous memory (Linux's RssAnon): RSS less shared files and libraries."""
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=5, metavar="ARG", help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        action="append",
        help="torch threads per process (0: torch's default); repeat for several",
    )
    parser.add_argument(
        "--seconds", type=float, default=8.0, help="length of each plain loop (sets the steps)"
    )
    parser.add_argument("--soak", type=int, metavar="STEPS", help="RSS/queue run of the small MLP")
    parser.add_argument(
        "--compiled-kernels",
        choices=("auto", "always", "never"),
        default="auto",
        help="the soak's compiled_kernels setting (the table's nokernels mode sets never)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="train every measured process on this device (the soak stays on the CPU)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--omp-wait-policy",
        choices=("active", "passive"),
        help="OMP_WAIT_POLICY for every measured process (default: libgomp's own)",
    )
    args = parser.parse_args(argv)
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # the workers inherit it
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    if args.worker:
        name, mode, threads, steps, folder = args.worker
        print(json.dumps(worker(name, mode, int(threads), int(steps), Path(folder))))
        return 0
    os.environ[DEVICE_VARIABLE] = args.device  # the workers inherit it
    if args.soak:
        figures: dict[str, Any] = {"soak": soak(args.soak, args.compiled_kernels)}
    else:
        args.threads = args.threads or [0]
        if "plain" not in args.modes:
            args.modes = ["plain", *args.modes]
        figures = run_table(args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
