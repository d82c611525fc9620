"""One timer for every benchmark here: the implementations under comparison, interleaved in one
process, medians.

Interleaving (A, B, A, B, ... or A, B, B, A, ...) spreads drift (clocks, heat, other processes on
a shared machine) over all implementations alike; `triton.testing.do_bench` and
`torch.utils.benchmark.Timer` time one function at a time, so they are not used for comparisons.
The clock is theirs: CUDA events on a CUDA device (the time between two points of the stream,
with no host round trip inside it), `time.perf_counter` on a CPU.

A timed callable may carry a `prepare` attribute: run before each timed call, outside the clock
(the forward of a backward-only pass).
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from typing import Any, Callable

import torch

BUSY_CORES = 0.2  # other processes using more than this many cores: CPU timings are suspect


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call_ms(fn: Callable[[], Any], device: torch.device | str) -> float:
    """One call of fn, in ms, its `prepare` (if any) run first, untimed."""
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        prepare()
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device | str = "cpu", *, warmup: int = 1,
                     reps: int | None = None, min_reps: int = 3, max_reps: int = 50, budget_s: float = 2.0,
                     abba: bool = False, deadline: float | None = None) -> dict[str, list[float]]:
    """Per-call times in ms of each fn, run in turn, repeat after repeat.

    reps: how many repeats; None fits `budget_s` for the whole group from the last warm-up round,
    within [min_reps, max_reps]. abba: every other repeat runs in reverse order, so that each
    implementation runs first in half of them (worth it when running after another one costs,
    as a model's step does after another's left the caches and heap pages behind).
    deadline (epoch seconds): no repeat starts after it; at least one always runs.
    """
    round_ms = 0.0
    for _ in range(warmup):
        round_ms = sum(time_call_ms(fn, device) for fn in fns.values())
    if reps is None:
        reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(round_ms, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    sync(device)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one implementation's call would be charged to it alone
    try:
        for rep in range(max(1, reps)):
            if rep and deadline is not None and time.time() > deadline:
                break
            for name in (order[::-1] if abba and rep % 2 else order):
                times[name].append(time_call_ms(fns[name], device))
    finally:
        if gc_was_enabled:
            gc.enable()
    for name, ts in times.items():
        if not min(ts) > 0:
            raise RuntimeError(f"{name}: a non-positive time ({min(ts)} ms): the measurement is broken")
    return times


def summary(ms: list[float]) -> dict[str, float]:
    """median, min and interquartile range of one implementation's times."""
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"ms": statistics.median(ms), "ms_min": min(ms), "ms_iqr": q[2] - q[0], "reps": len(ms)}


# --- how busy the machine was (CPU timings) -------------------------------------------------------

def _machine_busy_s() -> float:
    """CPU seconds all processes have used since boot (Linux /proc/stat, all cores)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


class CpuMonitor:
    """Over a with-block: cores' worth of CPU used by *other* processes (`background`), and this
    process's CPU time over wall time (`own`). None where /proc/stat is missing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.background = self.own = None

    def __enter__(self):
        if self.enabled:
            try:
                self._start = (_machine_busy_s(), time.process_time(), time.perf_counter())
            except (OSError, ValueError, IndexError):
                self.enabled = False
        return self

    def __exit__(self, *exc):
        if self.enabled:
            busy0, cpu0, wall0 = self._start
            busy, cpu = _machine_busy_s() - busy0, time.process_time() - cpu0
            wall = max(time.perf_counter() - wall0, 1e-9)
            self.own = cpu / wall
            self.background = max(0.0, busy - cpu) / wall
        return False


def background_cpu(sample_s: float = 0.3) -> float | None:
    """Cores' worth of CPU other processes use, sampled while we sleep."""
    with CpuMonitor() as mon:
        time.sleep(sample_s)
    return mon.background


def wait_for_quiet(max_wait_s: float, threshold: float = BUSY_CORES) -> float | None:
    """Wait (up to max_wait_s) until other processes use under `threshold` cores; the last sample."""
    load = background_cpu()
    deadline = time.monotonic() + max_wait_s
    while load is not None and load > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        load = background_cpu()
    return load
