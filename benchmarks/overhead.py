"""Training-step overhead of apmon's pattern capture, side by side with plain training and with the
sources' counting method, on ResNet-20 (CIFAR shape) and an MLP.

    python benchmarks/overhead.py                      # CPU, a few minutes
    python benchmarks/overhead.py --device cuda        # the same table on a GPU

Modes, each on its own copy of the same initial model and the same batch, run in interleaved
blocks of ``--block`` steps (by default a multiple of 10 lasting about a second; the order rotates
every round, so load drift hits every mode alike):

- plain: forward, backward, optimizer step;
- every 1 / every 10: the same with ``Monitor(every=1)`` / ``Monitor(every=10)`` (exact counts,
  wire summaries built at each step end; the transport only serialises them);
- reference: every step, each site's preactivation counted as the sources do (Hartmann et al.
  2021, Algorithm 1; thesis Algorithm 1 + 2): rows -> bool -> int64 words, multiply-xor hash,
  ``% table``, ``index_add_`` into a fresh int32 table sized for <= 15% occupancy (the papers'
  rule), then distinct, max_freq, entropy and weighted Jaccard to the previous step's table.

Printed per model: median seconds per step, the median over rounds of each mode's time divided by
the same round's plain time with its 90% bootstrap interval, added time, the reference's added
time divided by ours, peak extra memory of the capture path per step (bytes allocated by the
monitor's own tensor operations and alive at once, tracked op by op, plus the peak of its numpy
buffers as tracemalloc sees them; on CUDA also ``max_memory_allocated`` minus plain), the
process's minor page faults per step (glibc's allocator hands large buffers back to the kernel
and faults them in again on some runs and not others; when a mode shows thousands, its time
carries them), and the JSON bytes of one site's summary (raw and gzip), e.g. for the 64-unit
conv sites of ResNet-20.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import resource
import statistics
import sys
import time
import tracemalloc
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models import ResNet20, mlp
from reference_counting import pack_words, source_hash

from monitor.client.apt import log_grid
from monitor.client.capture import ModuleTracker, rows_of
from monitor.client.handle import Monitor
from monitor.client.schedules import every, never
from monitor.schema import AlertValue, ProbeRecord, RunStart, SiteInfo, StepSummary

MODES = ("plain", "every 1", "every 10", "reference")
BLOCK_SECONDS = 1.0


class SerialisingTransport:
    """Keeps nothing but the JSON size of each site summary; the client-side cost of shipping."""

    run_id = "bench"

    def __init__(self) -> None:
        self.site_bytes: dict[str, tuple[int, int]] = {}
        self.last = StepSummary(step=0, sites=[])
        self.units: dict[str, int] = {}

    def start_run(self, start: RunStart) -> str:
        return self.run_id

    def add_sites(self, sites: Sequence[SiteInfo]) -> None:
        for site in sites:
            self.units[site.name] = site.units

    def send_summary(self, summary: StepSummary) -> None:
        self.last = summary  # sized after timing (a real transport serialises off-thread)

    def measure_sizes(self) -> None:
        """JSON bytes of each site's summary in the last step, raw and gzip-compressed."""
        for site in self.last.sites:
            raw = site.model_dump_json().encode()
            self.site_bytes[site.site] = (len(raw), len(gzip.compress(raw)))

    def send_probe(self, probe: ProbeRecord) -> None:
        pass

    def poll_alerts(self) -> list[AlertValue]:
        return []

    def finish(self, final_step: int) -> None:
        pass


class PeakMemory(TorchDispatchMode):
    """Bytes of the tensors created by the operations run inside it and still alive: the peak
    of that total is the extra memory of the code it wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        # numpy buffers (the CPU kernels' outputs) are not torch operations: tracemalloc sees
        # them, counted from the start of the metered step so that retained ones add up too.
        self.host_base = 0
        self.host_peak = 0

    @property
    def total_peak(self) -> int:
        """Peak of torch tensors plus peak of host (numpy) buffers: an upper bound of both."""
        return self.peak + self.host_peak

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        inputs = {
            a.untyped_storage().data_ptr()
            for a in (*args, *(kwargs or {}).values())
            if isinstance(a, torch.Tensor) and a.device.type != "meta"
        }
        for tensor in outputs:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() in inputs or tensor._base is not None:
                continue  # a view or an in-place result: no new memory
            nbytes = storage.nbytes()
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._free, nbytes)
        return out


class Stopwatch:
    """Seconds spent inside the wrapped callbacks (the capture path's own time, which load on
    the machine disturbs less than a whole step's)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, callback: Callable[..., Any], sync: Callable[[], None]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            sync()
            start = time.perf_counter()
            try:
                return callback(*args)
            finally:
                sync()
                self.seconds += time.perf_counter() - start

        return run


def tracked(callback: Callable[..., None], meter: PeakMemory) -> Callable[..., None]:
    """Run a site callback inside the memory meter."""

    def run(*args: Any) -> None:
        tracemalloc.reset_peak()
        with meter:
            callback(*args)
        meter.host_peak = max(meter.host_peak, tracemalloc.get_traced_memory()[1] - meter.host_base)

    return run


class ReferenceCounter:
    """The sources' per-site hash-table counting, every step (see module docstring)."""

    def __init__(self, model: nn.Module, occupancy: float = 0.15) -> None:
        self.occupancy = occupancy
        self.previous: dict[str, torch.Tensor] = {}
        self.values: dict[str, tuple[float, ...]] = {}
        self.tracker = ModuleTracker(model, self.on_site, sign_mode=False)
        self.tracker.armed = True

    def on_site(self, name: str, mode: str, preactivation: torch.Tensor) -> None:
        with torch.no_grad():
            rows, _ = rows_of(preactivation.detach())
            act = rows > 0
            n = act.shape[0]
            size = max(30000, math.ceil(n / self.occupancy))
            counts = torch.zeros(size, dtype=torch.int32, device=act.device)
            key = source_hash(pack_words(act)) % size
            counts.index_add_(0, key, torch.ones_like(key, dtype=torch.int32))
            occupied = counts[counts > 0].double()
            p = occupied / n
            distinct = occupied.numel()
            max_freq = float(p.max())
            entropy = float(-(p * torch.log2(p)).sum())
            jaccard = 1.0
            previous = self.previous.get(name)
            if previous is not None and previous.numel() == size:
                jaccard = float(
                    torch.minimum(previous, counts).sum() / torch.maximum(previous, counts).sum()
                )
            self.previous[name] = counts
            self.values[name] = (distinct, max_freq, entropy, jaccard)


def make_model(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model and a fixed batch of 128."""
    if name == "resnet20":
        return ResNet20(), torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    return mlp(), torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time every mode on one model; returns the figures."""
    torch.manual_seed(0)
    base, x, y = make_model(name)
    device = torch.device(args.device)
    x, y = x.to(device), y.to(device)
    runs: dict[str, dict[str, Any]] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    modes = tuple(m for m in MODES if m in args.modes.split(","))
    for mode in modes:
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run: dict[str, Any] = {"model": model, "opt": opt, "times": [], "watch": Stopwatch()}
        if mode.startswith("every"):
            transport = SerialisingTransport()
            mon = Monitor(model, opt, transport, every=int(mode.split()[1]))
            run.update(monitor=mon, transport=transport, callback=mon._record_site)
            mon.tracker.on_site = run["watch"].wrap(mon._record_site, sync)
            mon._step_hook.remove()
            mon._step_hook = opt.register_step_post_hook(
                run["watch"].wrap(mon._after_optimizer_step, sync)
            )
        elif mode == "reference":
            ref = ReferenceCounter(model)
            run.update(reference=ref, callback=ref.on_site)
            ref.tracker.on_site = run["watch"].wrap(ref.on_site, sync)
        runs[mode] = run

    def step(run: dict[str, Any]) -> None:
        run["opt"].zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run["model"](x), y)
        loss.backward()
        run["opt"].step()

    block_steps = args.block or steps_per_block(lambda: step(runs["plain"]), sync)
    cuda_peak: dict[str, int] = {}
    for mode, run in runs.items():  # warm-up, and the CUDA allocator's peak per mode
        for _ in range(block_steps):
            step(run)
        sync()
        run["watch"].seconds = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step(run)
            sync()
            cuda_peak[mode] = torch.cuda.max_memory_allocated()
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        block: dict[str, float] = {}
        for mode in order:
            run = runs[mode]
            sync()
            inside = run["watch"].seconds
            faults = minor_faults()
            start = time.perf_counter()
            for _ in range(block_steps):
                step(run)
            sync()
            block[mode] = (time.perf_counter() - start) / block_steps
            run["times"].append(block[mode])
            run.setdefault("inside", []).append((run["watch"].seconds - inside) / block_steps)
            run.setdefault("faults", []).append((minor_faults() - faults) / block_steps)
        for mode in modes:
            ratios[mode].append(block[mode] / block["plain"])
    for run in runs.values():  # one more step each, with the capture path's memory metered
        if "callback" in run:
            run["meter"] = PeakMemory()
            tracker = run["monitor" if "monitor" in run else "reference"].tracker
            tracker.on_site = tracked(run["callback"], run["meter"])
            tracker.armed = True
            tracemalloc.start()
            run["meter"].host_base = tracemalloc.get_traced_memory()[0]
            step(run)
            tracemalloc.stop()
            tracker.on_site = run["watch"].wrap(run["callback"], sync)
    figures: dict[str, Any] = {"name": name, "modes": {}, "block_steps": block_steps}
    plain = statistics.median(runs["plain"]["times"])
    for mode in modes:
        run = runs[mode]
        median = statistics.median(run["times"])
        figures["modes"][mode] = {
            "seconds": median,
            "ratio": statistics.median(ratios[mode]),
            "ratio_interval": median_interval(ratios[mode]),
            "added": median - plain,
            "inside": statistics.median(run["inside"]),  # median over blocks, as the times
            "faults": statistics.median(run["faults"]),
            "peak_bytes": run["meter"].total_peak if "meter" in run else 0,
            "cuda_extra": cuda_peak.get(mode, 0) - cuda_peak.get("plain", 0),
        }
        if "monitor" in run:
            run["monitor"].close()
    figures["site_bytes"], figures["units"] = {}, {}
    if "every 1" in runs:
        transport = runs["every 1"]["transport"]
        transport.measure_sizes()
        figures["site_bytes"] = transport.site_bytes
        figures["units"] = transport.units
    return figures


def steps_per_block(plain_step: Callable[[], None], sync: Callable[[], None]) -> int:
    """Steps per timed block: a multiple of 10 lasting about a second.

    A multiple of 10, so that every-10 capture hits exactly one step in ten of each block; about
    a second, so that the scheduler's time slices and timer noise stay small against a block
    even for a model whose step takes a few milliseconds.
    """
    for _ in range(3):
        plain_step()
    sync()
    start = time.perf_counter()
    for _ in range(5):
        plain_step()
    sync()
    seconds = (time.perf_counter() - start) / 5
    return 10 * max(1, math.ceil(BLOCK_SECONDS / (10 * seconds)))


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median of per-round ratios.

    One round's ratio moves by several percent with the load on a shared machine; the interval
    says whether a target such as 1.15x is met with room or only within that noise.
    """
    if len(values) < 3 or len(set(values)) == 1:
        return (min(values), max(values))
    result = scipy.stats.bootstrap(
        (np.asarray(values),),
        np.median,
        confidence_level=confidence,
        method="percentile",
        n_resamples=5000,
        rng=np.random.default_rng(0),
    )
    return (float(result.confidence_interval.low), float(result.confidence_interval.high))


def report(figures: dict[str, Any]) -> None:
    """Print one model's table."""
    modes = figures["modes"]
    print(f"\n{figures['name']}: batch 128, blocks of {figures['block_steps']} steps")
    print(
        f"{'mode':<10} {'s/step':>8} {'x plain':>8} {'90% interval':>14} {'added ms':>9}"
        f" {'capture ms':>11} {'peak extra':>11} {'faults/step':>12}"
    )
    for mode, f in modes.items():
        extra = f"{f['peak_bytes'] / 2**20:.1f} MiB" if mode != "plain" else "-"
        low, high = f["ratio_interval"]
        print(
            f"{mode:<10} {f['seconds']:8.4f} {f['ratio']:8.3f} {f'{low:.3f}..{high:.3f}':>14}"
            f" {f['added'] * 1e3:9.1f} {f['inside'] * 1e3:11.1f} {extra:>11} {f['faults']:12.0f}"
        )
        if f["cuda_extra"]:
            print(f"{'':<10} cuda max_memory_allocated - plain: {f['cuda_extra'] / 2**20:.1f} MiB")
    if "every 1" not in modes or "reference" not in modes:
        report_sizes(figures)
        return
    ours = modes["every 1"]["added"]
    ref = modes["reference"]["added"]
    if ours > 0:
        print(f"reference added time / apmon every-step added time: {ref / ours:.1f}x")
    else:
        print("apmon every-step added time is within noise (<= 0)")
    inside = modes["every 1"]["inside"]
    print(
        "reference capture time / apmon every-step capture time: "
        f"{modes['reference']['inside'] / inside:.1f}x"
    )
    report_sizes(figures)


def report_sizes(figures: dict[str, Any]) -> None:
    """Print the JSON bytes of one site-step summary, by site width."""
    sizes = figures["site_bytes"]
    by_units: dict[int, list[tuple[int, int]]] = {}
    for site, size in sizes.items():
        by_units.setdefault(figures["units"][site], []).append(size)
    for units, values in sorted(by_units.items()):
        raw = max(v[0] for v in values)
        packed = max(v[1] for v in values)
        print(f"summary per site-step, {units}-unit sites: <= {raw} B JSON, <= {packed} B gzip")


# =============================================================================================
# APT probes and sensitivity sweeps (monitor/client/apt.py), side by side with plain training.
#
#     python benchmarks/overhead.py --apt only                      # the MLP, CPU
#     python benchmarks/overhead.py --apt only --apt-models resnet20 --apt-block 16 --apt-rounds 2
#     python benchmarks/overhead.py --apt only --apt-models resnet20,mlp --device cuda
#
# Modes: plain; an APT probe every 8 steps (thesis Table A.1, probing_step_size); the same plus a
# 16-point sensitivity sweep (1e-4..1e2) every 200 steps; and that on a sub-batch of
# ``--probe-rows`` rows. Blocks of ``--apt-block`` steps are interleaved, the order rotating each
# round; the sweep schedule puts a sweep on the first step of every 200, so a block of 200 (the
# default) holds exactly one. Printed per mode:
# - "x plain": median over rounds of block time / the same round's plain block time (honest only
#   with 200-step blocks; shorter blocks over-weight the sweep);
# - "apt ms", "sweep ms": median time inside the probe hooks on a probe step and the extra on a
#   sweep step (timed one by one, so load on the machine disturbs them less than whole blocks);
# - "x plain (amortized)": 1 + (apt ms / 8 + sweep ms / 200) / plain step time.
# =============================================================================================

APT_WARMUP = 8
APT_EVERY = 8
SWEEP_EVERY = 200


class ProbeCounter(SerialisingTransport):
    """Counts the probe records by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: dict[str, int] = {}

    def send_probe(self, probe: ProbeRecord) -> None:
        self.kinds[probe.kind] = self.kinds.get(probe.kind, 0) + 1


class StepStopwatch:
    """Seconds inside the wrapped callbacks, per training step of the monitor."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.per_step: dict[int, float] = {}

    def wrap(self, callback: Callable[..., Any], sync: Callable[[], None]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            step = self.monitor.step
            sync()
            start = time.perf_counter()
            try:
                return callback(*args)
            finally:
                sync()
                seconds = time.perf_counter() - start
                self.per_step[step] = self.per_step.get(step, 0.0) + seconds

        return run


def apt_modes(args: argparse.Namespace) -> dict[str, dict[str, Any] | None]:
    """Monitor options per mode (None: plain training)."""
    sweep = {"apt_every": APT_EVERY, "sweep_every": every(SWEEP_EVERY, offset=APT_WARMUP)}
    modes: dict[str, dict[str, Any] | None] = {
        "plain": None,
        f"apt {APT_EVERY}": {"apt_every": APT_EVERY},
        f"apt {APT_EVERY} + sweep {SWEEP_EVERY}": sweep,
    }
    if args.probe_rows:
        modes[f"... rows {args.probe_rows}"] = {**sweep, "probe_rows": args.probe_rows}
    return modes


def bench_apt(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time plain training against APT probes and sweeps on one model."""
    torch.manual_seed(0)
    base, x, y = make_model(name)
    device = torch.device(args.device)
    x, y = x.to(device), y.to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    runs: dict[str, dict[str, Any]] = {}
    for mode, options in apt_modes(args).items():
        model = copy.deepcopy(base).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run: dict[str, Any] = {"model": model, "opt": opt, "times": []}
        if options is not None:
            transport = ProbeCounter()
            mon = Monitor(
                model, opt, transport, every=never(), sweep_etas=log_grid(1e-4, 1e2, 16), **options
            )
            prober = mon.prober
            assert prober is not None
            watch = StepStopwatch(mon)
            for method in ("capture", "before_step", "after_step"):
                setattr(prober, method, watch.wrap(getattr(prober, method), sync))
            run.update(monitor=mon, transport=transport, watch=watch, prober=prober)
        runs[mode] = run

    def step(run: dict[str, Any]) -> None:
        run["opt"].zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(run["model"](x), y)
        loss.backward()
        run["opt"].step()

    for run in runs.values():
        for _ in range(APT_WARMUP):
            step(run)
        sync()
        if "watch" in run:
            run["watch"].per_step.clear()
            run["transport"].kinds.clear()
    modes = list(runs)
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.apt_rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        block: dict[str, float] = {}
        for mode in order:
            run = runs[mode]
            sync()
            start = time.perf_counter()
            for _ in range(args.apt_block):
                step(run)
            sync()
            block[mode] = (time.perf_counter() - start) / args.apt_block
            run["times"].append(block[mode])
        for mode in modes:
            ratios[mode].append(block[mode] / block["plain"])
    plain = statistics.median(runs["plain"]["times"])
    figures: dict[str, Any] = {"name": name, "modes": {}}
    for mode, run in runs.items():
        f: dict[str, Any] = {
            "seconds": statistics.median(run["times"]),
            "ratio": statistics.median(ratios[mode]),
            "ratio_interval": median_interval(ratios[mode]),
            "apt": 0.0,
            "sweep": 0.0,
            "amortized": 1.0,
            "records": {},
        }
        if "watch" in run:
            prober, per_step = run["prober"], run["watch"].per_step
            apt = [t for s, t in per_step.items() if prober.apt(s) and not prober.sweep(s)]
            sweep = [t for s, t in per_step.items() if prober.sweep(s)]
            f["apt"] = statistics.median(apt) if apt else 0.0
            f["sweep"] = statistics.median(sweep) - f["apt"] if sweep else 0.0
            options = apt_modes(args)[mode] or {}
            steps_apt = APT_EVERY if "apt_every" in options else math.inf
            steps_sweep = SWEEP_EVERY if "sweep_every" in options else math.inf
            f["amortized"] = 1 + (f["apt"] / steps_apt + f["sweep"] / steps_sweep) / plain
            f["records"] = dict(run["transport"].kinds)
            run["monitor"].close()
        figures["modes"][mode] = f
    return figures


def report_apt(figures: dict[str, Any], args: argparse.Namespace) -> None:
    """Print one model's APT table."""
    steps = args.apt_rounds * args.apt_block
    print(f"\n{figures['name']}: APT probes and sweeps, batch 128, {steps} timed steps per mode")
    if args.apt_block != SWEEP_EVERY:
        print(f"(blocks of {args.apt_block} steps: 'x plain' misweights sweeps; see amortized)")
    print(
        f"{'mode':<20} {'s/step':>8} {'x plain':>8} {'apt ms':>8} {'sweep ms':>9}"
        f" {'x plain (amortized)':>20}  records"
    )
    for mode, f in figures["modes"].items():
        records = ", ".join(f"{n} {k}" for k, n in sorted(f["records"].items())) or "-"
        print(
            f"{mode:<20} {f['seconds']:8.4f} {f['ratio']:8.3f} {f['apt'] * 1e3:8.1f}"
            f" {f['sweep'] * 1e3:9.1f} {f['amortized']:20.3f}  {records}"
        )


def add_apt_arguments(parser: argparse.ArgumentParser) -> None:
    """The APT section's options."""
    parser.add_argument("--apt", choices=("on", "off", "only"), default="on")
    parser.add_argument("--apt-models", default="mlp")
    parser.add_argument("--apt-rounds", type=int, default=2)
    parser.add_argument("--apt-block", type=int, default=200, help="steps per timed APT block")
    parser.add_argument("--probe-rows", type=int, default=32, help="sub-batch mode (0: none)")


# ---------------------------------------------------------------------------------------------
# end of the APT section
# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="resnet20,mlp")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--block",
        type=int,
        default=0,
        help="steps per timed block (0: a multiple of 10 lasting about a second)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated subset of {','.join(MODES)} (plain is always run)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    add_apt_arguments(parser)
    args = parser.parse_args()
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    args.modes = ",".join(["plain", *args.modes.split(",")])
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for name in args.models.split(",") if args.apt != "only" else []:
        report(bench_model(name, args))
    for name in args.apt_models.split(",") if args.apt != "off" else []:
        report_apt(bench_apt(name, args), args)


if __name__ == "__main__":
    main()
