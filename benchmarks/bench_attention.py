"""Prefix attention: ours (prefix_attn.prefix_attention) vs one incumbent, cat + SDPA by default.

The default incumbent, `sdpa-cat`, is what Hugging Face PEFT prefix tuning does: expand the
shared prefix over the batch, ``torch.cat`` it in front of the sequence keys and values, and
call ``F.scaled_dot_product_attention`` with the equivalent boolean mask (prefix columns all
True, sequence part bottom-right causal: key j visible to query i iff j <= i + Nk - Nq);
non-causal runs get no mask. GQA: k/v heads are ``repeat_interleave``d, as HF's ``repeat_kv``
does. The mask is built once, outside the timed region (HF builds it once per model forward,
not per layer), which favours the incumbent slightly. ``--incumbent`` picks another of
bench_common.INCUMBENTS (e.g. sdpa-cat-gqa, flex-cat); the GPU suite runs them all.

Passes, FLOPs and bytes are bench_common's, the same as the GPU suite's:
    fwd              forward only, nothing requires grad
    train_step       forward + backward, q, k, v, prefix_k, prefix_v all require grad: the
                     prefix-tuning step of every layer above the first
    prefix_only_bwd  the backward alone (forward untimed), only prefix_k, prefix_v require
                     grad: the first layer of a prefix-tuned model

Measured per (config, pass):
    latency   ours and the incumbent interleaved run by run in one process (A, B, A, B, ...)
              after warm-up; median ms. speedup = incumbent_ms / ours_ms (> 1: ours faster).
              CUDA: torch.cuda.Event pairs; CPU: time.perf_counter.
    memory    peak extra memory of one whole step (see memory.py): CUDA max_memory_allocated;
              CPU VmHWM - VmRSS in a fresh subprocess per (impl, config, pass).
    max|diff| largest abs difference ours vs incumbent over the output and every gradient.
    GFLOP/s   from visible (query, key) pairs only (bench_common's docstring has the formulas):
                  fwd              F = 4 * B * Hq * D * (Nq * P + visible sequence pairs)
                  train_step       3.5 * F
                  prefix_only_bwd  8 * B * Hq * Nq * P * D   (the P prefix columns only)
    GB/s      (JSON) bench_common.bytes_floor over the time: against the memory floor.

Results: a markdown table on stdout, and JSON + PNG + the table under
benchmarks/results/<hardware-slug>/ (e.g. results/cpu-amd-epyc/attention.json). The JSON
names the hardware (CPU model, cores, GPU), torch version, date and git commit.

    python benchmarks/bench_attention.py                  # default sweep (a few minutes on 2 CPU cores)
    python benchmarks/bench_attention.py --quick          # target shapes only, fewer repeats
    python benchmarks/bench_attention.py -P 0 64 256 -N 512 2048 --causal true --modes fwd
    python benchmarks/bench_attention.py --backend reference
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import memory  # noqa: E402  (sibling module; benchmarks/ is not a package)
import bench_common as bc  # noqa: E402
from bench_common import DTYPES, Shape as Config, flops, geomean, visible_pairs  # noqa: E402,F401

MODES = bc.PASSES
IMPLS = ("ours", "incumbent")
DEFAULT_INCUMBENT = "sdpa-cat"
TRAIN_INCUMBENTS = [n for n, i in bc.INCUMBENTS.items() if "train" in i.kinds]

# The three shapes the project is judged on: (B, H, N, P, D), fp32, causal and non-causal.
TARGET_SHAPES = bc.CPU_TARGET_SHAPES
# (causal, pass) pairs whose geometric-mean speedup over the target shapes is the headline.
HEADLINE = [(True, "fwd"), (True, "train_step"), (False, "fwd")]
target_configs = bc.cpu_target_shapes
default_sweep = bc.cpu_default_sweep
causal_prefix_mask = bc.prefix_bool_mask


def ours_attention(q, k, v, prefix_k, prefix_v, *, causal=False, backend="auto"):
    import prefix_attn

    return prefix_attn.prefix_attention(q, k, v, prefix_k, prefix_v, causal=causal, backend=backend)


def build_attend(cfg: Config, impl: str, *, backend: str = "auto", device="cpu",
                 incumbent: str = DEFAULT_INCUMBENT) -> Callable:
    """fn(q, k, v, prefix_k, prefix_v) for ``impl``; masks and compiles happen here, untimed."""
    if impl == "ours":
        return bc.ours(cfg, backend)
    if impl != "incumbent":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    inc = bc.INCUMBENTS[incumbent]
    if not inc.applies(cfg, "train"):
        raise ValueError(f"incumbent {incumbent} does not stand for {cfg.name}")
    return inc.build(cfg, torch.device(device))


# --- building one timed/measured step ----------------------------------------------------

def make_inputs(cfg: Config, mode: str, *, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)

    t = {
        "q": randn(cfg.B, cfg.H, cfg.N, cfg.D),
        "k": randn(cfg.B, cfg.hkv, cfg.nk, cfg.D),
        "v": randn(cfg.B, cfg.hkv, cfg.nk, cfg.D),
        "prefix_k": randn(cfg.hkv, cfg.P, cfg.D),
        "prefix_v": randn(cfg.hkv, cfg.P, cfg.D),
        "grad_out": randn(cfg.B, cfg.H, cfg.N, cfg.D),
    }
    for name in bc.TRAINABLE[bc.canonical_pass(mode)]:
        t[name].requires_grad_(True)
    return t


def build_step(cfg: Config, impl: str, mode: str, *, backend: str = "auto", device="cpu",
               dtype=torch.float32, seed: int = 0, inputs: dict | None = None,
               incumbent: str = DEFAULT_INCUMBENT) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running one step of ``impl`` in pass ``mode``.

    Gradients are dropped at the end of each call, so every call allocates them afresh: a
    steady training step, and memory.py counts them as part of the call's peak.
    For prefix_only_bwd, which times the backward alone, the callable has a ``prepare``
    attribute that runs the forward: timers call it before starting the clock. Called
    without it (memory.py), the callable runs forward and backward.
    """
    mode = bc.canonical_pass(mode)
    t = inputs if inputs is not None else make_inputs(cfg, mode, device=device, dtype=dtype, seed=seed)
    q, k, v, pk, pv, gout = (t[n] for n in ("q", "k", "v", "prefix_k", "prefix_v", "grad_out"))
    leaves = [x for x in (q, k, v, pk, pv) if x.requires_grad]
    fn = build_attend(cfg, impl, backend=backend, device=q.device, incumbent=incumbent)

    def attend():
        return fn(q, k, v, pk, pv)

    if not leaves:
        def step():
            with torch.no_grad():
                return attend()
        return step

    pending = []

    def prepare():
        if not pending:
            pending.append(attend())

    def step():
        prepare()
        out = pending.pop()
        out.backward(gout)
        for x in leaves:
            x.grad = None
        return out.detach()
    if mode == "prefix_only_bwd":
        step.prepare = prepare
    return step


def build_memory_step(cfg: dict, impl: str, mode: str, backend: str, device: str, dtype: str,
                      seed: int = 0, incumbent: str = DEFAULT_INCUMBENT) -> Callable[[], None]:
    """memory.py target: JSON-able arguments in, callable out (the whole step, forward included)."""
    step = build_step(Config(**cfg), impl, mode, backend=backend, device=device,
                      dtype=DTYPES[dtype], seed=seed, incumbent=incumbent)

    def fn():
        step()  # drop the output inside: it is still counted at its peak
    return fn


def compare(cfg: Config, mode: str, *, backend, device, dtype, seed=0,
            incumbent: str = DEFAULT_INCUMBENT) -> dict[str, dict[str, float]]:
    """ours vs incumbent on identical inputs, for the output and every gradient computed:
    {"out": {"max_abs_diff": ..., "ref_max_abs": ...}, "dprefix_k": {...}, ...}."""
    results = {}
    for impl in IMPLS:
        t = make_inputs(cfg, mode, device=device, dtype=dtype, seed=seed)
        fn = build_attend(cfg, impl, backend=backend, device=device, incumbent=incumbent)
        out = fn(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"])
        r = {"out": out.detach().float()}
        if bc.TRAINABLE[bc.canonical_pass(mode)]:
            out.backward(t["grad_out"])
            for n in ("q", "k", "v", "prefix_k", "prefix_v"):
                if t[n].requires_grad:
                    # None: the input did not reach the output (P == 0 in cat+SDPA)
                    grad = t[n].grad
                    r["d" + n] = (grad if grad is not None else torch.zeros_like(t[n])).float()
        results[impl] = r
    diffs = {}
    for n, a in results["ours"].items():
        b = results["incumbent"][n]
        diffs[n] = {"max_abs_diff": float((a - b).abs().max()) if a.numel() else 0.0,
                    "ref_max_abs": float(b.abs().max()) if b.numel() else 0.0}
    return diffs


# --- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call_ms(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(fns: dict[str, Callable[[], Any]], *, device, warmup: int = 2,
                     min_reps: int = 5, max_reps: int = 50, budget_s: float = 2.0
                     ) -> dict[str, list[float]]:
    """Per-call times in ms, implementations alternated run by run (A, B, A, B, ...).

    Alternating spreads drift (thermal, frequency, other load) over all of them alike.
    The number of repeats fits ``budget_s`` for the whole group, within [min_reps, max_reps].
    """
    device = torch.device(device)

    def timed(fn):
        prepare = getattr(fn, "prepare", None)  # untimed part of the step (prefix_only_bwd's forward)
        if prepare is not None:
            prepare()
        _sync(device)
        return time_call_ms(fn, device)

    for _ in range(max(1, warmup)):
        round_ms = 0.0
        for fn in fns.values():
            round_ms += timed(fn)
    reps = int(min(max_reps, max(min_reps, budget_s * 1e3 / max(round_ms, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for name, fn in fns.items():
                times[name].append(timed(fn))
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


BUSY_CORES = 0.2  # other processes using more than this many cores: timings are suspect


def _machine_busy_s() -> float:
    """CPU seconds all processes have used since boot (Linux /proc/stat, all cores)."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user


class CpuMonitor:
    """Over a with-block: cores' worth of CPU used by *other* processes (``background``), and
    this process's CPU time over wall time (``own``). None where /proc/stat is missing."""

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
            busy, cpu, wall = _machine_busy_s() - busy0, time.process_time() - cpu0, time.perf_counter() - wall0
            wall = max(wall, 1e-9)
            self.own = cpu / wall
            self.background = max(0.0, busy - cpu) / wall
        return False


def background_cpu(sample_s: float = 0.3) -> float | None:
    """Cores' worth of CPU other processes use, sampled while we sleep."""
    with CpuMonitor() as mon:
        time.sleep(sample_s)
    return mon.background


def wait_for_quiet(max_wait_s: float, threshold: float = BUSY_CORES) -> float | None:
    """Wait (up to max_wait_s) until other processes use under `threshold` cores. Returns the last sample."""
    load = background_cpu()
    deadline = time.monotonic() + max_wait_s
    while load is not None and load > threshold and time.monotonic() < deadline:
        time.sleep(2.0)
        load = background_cpu()
    return load


# --- hardware and provenance -----------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _slug(s: str) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", s.lower())
    s = re.sub(r"\b(cpu|processor|with radeon graphics)\b", "", s)
    s = re.sub(r"@.*$", "", s)
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def hardware_info(device: torch.device) -> dict[str, Any]:
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "loadavg_at_start": _loadavg(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["slug"] = "cuda-" + _slug(props.name)
    else:
        info["slug"] = "cpu-" + _slug(info["cpu_model"])
    return info


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=_HERE,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown (no commit)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_HERE,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_info(device, backend: str) -> dict[str, Any]:
    import prefix_attn

    probe = torch.zeros(1, 1, 1, 64, device=device)
    info = {"version": getattr(prefix_attn, "__version__", "unknown"),
            "available_backends": list(prefix_attn.available_backends()),
            "backend_requested": backend}
    try:
        info["auto_selects"] = str(prefix_attn.select_backend(probe))
    except Exception as e:  # report, don't fail: the table still means something
        info["auto_selects"] = f"error: {type(e).__name__}: {e}"
    info["backend_used"] = info["auto_selects"] if backend == "auto" else backend
    return info


# --- running a sweep --------------------------------------------------------------------------

def bench_one(cfg: Config, mode: str, *, backend, device, dtype, warmup, min_reps, max_reps,
              budget_s, measure_memory: bool, check: bool = True, wait_quiet_s: float = 0.0,
              retries: int = 0, incumbent: str = DEFAULT_INCUMBENT) -> dict[str, Any]:
    dev = torch.device(device)
    mode = bc.canonical_pass(mode)
    eager_before = bc.eager_calls()
    # One input set per implementation (not shared: autograd state stays separate).
    fns = {impl: build_step(cfg, impl, mode, backend=backend, device=dev, dtype=dtype, incumbent=incumbent)
           for impl in IMPLS}
    # Other processes on a CPU box slow both sides, and not alike. Measure how much CPU they took
    # during our timed runs; optionally wait for quiet before, and retry when it was busy.
    best = None
    for attempt in range(1 + max(0, retries)):
        if dev.type == "cpu" and wait_quiet_s > 0:
            wait_for_quiet(wait_quiet_s)
        with CpuMonitor(enabled=dev.type == "cpu") as mon:
            times = time_interleaved(fns, device=dev, warmup=warmup, min_reps=min_reps,
                                     max_reps=max_reps, budget_s=budget_s)
        if best is None or (mon.background or 0) < (best[1].background or 0):
            best = (times, mon, attempt + 1)
        if (mon.background or 0) <= BUSY_CORES:
            break
    times, mon, attempts = best
    del fns
    gc.collect()
    row: dict[str, Any] = {"config": cfg.name, **cfg.to_dict(), "Hkv": cfg.hkv, "Nk": cfg.nk,
                           "mode": mode, "incumbent": incumbent, "flops": flops(cfg, mode),
                           "bytes_floor": bc.bytes_floor(cfg, mode, bc.elem_bytes(dtype)),
                           "reps": len(times["ours"]), "attempts": attempts,
                           # cores' worth of CPU other processes used while we timed, and our
                           # own CPU time over wall time (near the thread count when we had the
                           # cores to ourselves and both implementations parallelize well)
                           "background_cpu": mon.background, "cpu_per_wall": mon.own}
    for impl in IMPLS:
        med = statistics.median(times[impl])
        row[f"{impl}_ms"] = med
        row[f"{impl}_ms_min"] = min(times[impl])
        row[f"{impl}_ms_iqr"] = (statistics.quantiles(times[impl], n=4)[2] - statistics.quantiles(times[impl], n=4)[0]
                                 if len(times[impl]) >= 2 else 0.0)
        row[f"{impl}_gflops"] = row["flops"] / (med * 1e-3) / 1e9
        row[f"{impl}_gbps"] = row["bytes_floor"] / (med * 1e-3) / 1e9
    if bc.eager_calls() > eager_before:
        # a compiled incumbent ran eagerly: its time is not that incumbent's (bench_common)
        row["incumbent_fell_back"] = "its compiled function ran eagerly"
    row["speedup"] = row["incumbent_ms"] / row["ours_ms"]
    # from the fastest run of each: less sensitive to other load on a shared machine
    row["speedup_min"] = row["incumbent_ms_min"] / row["ours_ms_min"]
    if check and not cfg.dropout:  # with dropout the two draw different masks: nothing to compare
        diffs = compare(cfg, mode, backend=backend, device=dev, dtype=dtype, incumbent=incumbent)
        row["max_abs_diff"] = max(d["max_abs_diff"] for d in diffs.values())
        # relative to the largest reference value of the same tensor (gradients of a shared
        # prefix are sums over batch and heads, so they are larger than the output)
        row["max_rel_diff"] = max(d["max_abs_diff"] / max(d["ref_max_abs"], 1e-30) for d in diffs.values())
        row["diff_by_tensor"] = diffs
    if measure_memory:
        dtype_name = next(k for k, v in DTYPES.items() if v == dtype)
        for impl in IMPLS:
            kwargs = {"cfg": cfg.to_dict(), "impl": impl, "mode": mode, "backend": backend,
                      "device": str(dev), "dtype": dtype_name, "incumbent": incumbent}
            row[f"{impl}_mem_mb"] = memory.measure_peak_extra(
                "bench_attention:build_memory_step", kwargs, device=str(dev)) / 1e6
        row.update(mem_ratio_fields(row["ours_mem_mb"], row["incumbent_mem_mb"], dev))
    return row


# Below this the CPU measurement is noise (page granularity, small allocations): a ratio with a
# smaller denominator is reported as a lower bound, against this floor.
CPU_MEM_FLOOR_MB = 0.1


def mem_ratio_fields(ours_mb: float, incumbent_mb: float, device) -> dict[str, Any]:
    floor = CPU_MEM_FLOOR_MB if torch.device(device).type == "cpu" else 1e-6
    if max(ours_mb, incumbent_mb) < floor:
        return {}  # both in the noise: no ratio
    return {"mem_ratio": incumbent_mb / max(ours_mb, floor), "mem_ratio_is_lower_bound": ours_mb < floor}


def target_geomeans(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Geometric-mean speedup (and memory ratio) over the target shapes per (causal, mode)."""
    targets = {Config(B, H, N, P, D, c).name for (B, H, N, P, D) in TARGET_SHAPES for c in (True, False)}
    out = {}
    for causal, mode in itertools.product((True, False), MODES):
        sel = [r for r in rows if r["config"] in targets and r["causal"] == causal and r["mode"] == mode]
        if len(sel) != len(TARGET_SHAPES):
            continue
        key = f"{'causal' if causal else 'noncausal'}_{mode}"
        out[key] = {"speedup": geomean(r["speedup"] for r in sel),
                    "speedup_min": geomean(r["speedup_min"] for r in sel), "n": len(sel)}
        if all("mem_ratio" in r for r in sel):
            out[key]["mem_ratio"] = geomean(r["mem_ratio"] for r in sel)
    return out


# --- output -------------------------------------------------------------------------------------

def _fmt_mb(x):
    return "-" if x is None else f"{x:.1f}"


def incumbent_label(rows_or_meta) -> str:
    """The incumbent's name for headers; older result files have none and mean sdpa-cat."""
    if isinstance(rows_or_meta, dict):
        return rows_or_meta.get("incumbent_name", DEFAULT_INCUMBENT)
    return next((r["incumbent"] for r in rows_or_meta if "incumbent" in r), DEFAULT_INCUMBENT)


def markdown_table(rows: list[dict]) -> str:
    inc = incumbent_label(rows)
    head = (f"| config | pass | ours ms | {inc} ms | speedup | ours GFLOP/s | {inc} GFLOP/s "
            f"| ours MB | {inc} MB | mem ratio | max abs diff |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        fell = " (fell back)" if r.get("incumbent_fell_back") else ""
        lines.append(
            f"| {r['config']} | {r['mode']} | {r['ours_ms']:.2f} | {r['incumbent_ms']:.2f}{fell} "
            f"| {r['speedup']:.2f}x | {r['ours_gflops']:.1f} | {r['incumbent_gflops']:.1f} "
            f"| {_fmt_mb(r.get('ours_mem_mb'))} | {_fmt_mb(r.get('incumbent_mem_mb'))} "
            f"| {(('>' if r.get('mem_ratio_is_lower_bound') else '') + '%.2fx' % r['mem_ratio']) if 'mem_ratio' in r else '-'} "
            f"| {('%.1e' % r['max_abs_diff']) if 'max_abs_diff' in r else '-'} |")
    return "\n".join(lines)


def geomean_table(gm: dict[str, dict[str, float]]) -> str:
    lines = ["| target shapes | geomean speedup (medians) | from fastest runs | geomean memory ratio |",
             "|---|---|---|---|"]
    headline = {f"{'causal' if c else 'noncausal'}_{m}" for c, m in HEADLINE}
    for key, v in gm.items():
        star = " **(headline)**" if key in headline else ""
        mem = f"{v['mem_ratio']:.2f}x" if "mem_ratio" in v else "-"
        lines.append(f"| {key}{star} | {v['speedup']:.2f}x | {v['speedup_min']:.2f}x | {mem} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)", file=sys.stderr)
        return False
    configs = list(dict.fromkeys(r["config"] for r in rows))
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    by = {(r["config"], r["mode"]): r for r in rows}
    has_mem = any("mem_ratio" in r for r in rows)
    targets = {c.name for c in target_configs()}
    fig, axes = plt.subplots(2 if has_mem else 1, 1, figsize=(max(8, 0.55 * len(configs) + 3), 9 if has_mem else 5),
                             squeeze=False)
    width = 0.8 / max(1, len(modes))
    inc = incumbent_label(rows)
    panels = [("speedup", f"speedup ({inc} ms / ours ms)")]
    if has_mem:
        panels.append(("mem_ratio", f"peak extra memory ratio ({inc} / ours)"))
    for ax, (key, label) in zip(axes[:, 0], panels):
        for mi, mode in enumerate(modes):
            xs, ys = [], []
            for ci, c in enumerate(configs):
                r = by.get((c, mode))
                if r is not None and key in r:
                    xs.append(ci + (mi - (len(modes) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width=width, label=mode)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(label + "\n(target shapes in bold)" if key == "speedup" else label)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels(configs, rotation=60, ha="right", fontsize=7)
        for label in ax.get_xticklabels():
            if label.get_text() in targets:
                label.set_fontweight("bold")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(rows, gm, meta, out_dir: str, stem: str, table: str) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, stem + ".json"), "md": os.path.join(out_dir, stem + ".md"),
             "png": os.path.join(out_dir, stem + ".png")}
    with open(paths["json"], "w") as f:
        json.dump({"meta": meta, "geomeans": gm, "rows": rows}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(f"# prefix attention: ours vs {incumbent_label(meta)}\n\n{_meta_line(meta)}\n\n{table}\n")
    hw = meta["hardware"]
    title = (f"prefix_attn ({meta['package']['backend_used']}) vs {incumbent_label(meta)} - "
             f"{hw.get('gpu', hw['cpu_model'])}, "
             f"{meta['dtype']}, torch {hw['torch']}, {meta['date'][:10]}, {meta['git_commit']}")
    if not plot(rows, paths["png"], title):
        del paths["png"]
    return paths


def _meta_line(meta) -> str:
    hw = meta["hardware"]
    dev = hw.get("gpu") or f"{hw['cpu_model']} ({hw['cpu_cores']} cores, {hw['torch_threads']} threads)"
    return (f"{dev}; torch {hw['torch']}; {meta['dtype']}; backend {meta['package']['backend_used']} "
            f"(requested {meta['package']['backend_requested']}); {meta['date']}; commit {meta['git_commit']}")


def run(configs: list[Config], modes: list[str], *, backend="auto", device="cpu", dtype=torch.float32,
        warmup=2, min_reps=5, max_reps=50, budget_s=2.0, measure_memory=True, check=True,
        wait_quiet_s=0.0, retries=0, verbose=True, skipped: list | None = None,
        incumbent: str = DEFAULT_INCUMBENT) -> list[dict]:
    """Benchmark every (config, mode); rows that raise are reported, appended to ``skipped``."""
    rows = []
    skipped = skipped if skipped is not None else []
    device_is_cuda = torch.device(device).type == "cuda"
    # Without a prefix there is nothing to train in prefix_only_bwd.
    modes = [bc.canonical_pass(m) for m in modes]
    jobs = [(c, m) for c, m in itertools.product(configs, modes) if not (m == "prefix_only_bwd" and c.P == 0)]
    n = len(jobs)
    t_start = time.perf_counter()
    for i, (cfg, mode) in enumerate(jobs):
        try:
            row = bench_one(cfg, mode, backend=backend, device=device, dtype=dtype, warmup=warmup,
                            min_reps=min_reps, max_reps=max_reps, budget_s=budget_s,
                            measure_memory=measure_memory, check=check, wait_quiet_s=wait_quiet_s,
                            retries=retries, incumbent=incumbent)
        except (NotImplementedError, ValueError, TypeError, RuntimeError,
                memory.MemoryMeasurementError) as e:
            # A backend that cannot run a case (head dim, dtype, out of memory) costs that row only.
            print(f"[{i + 1}/{n}] {cfg.name} {mode}: skipped, {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            skipped.append({"config": cfg.name, "mode": mode, "error": f"{type(e).__name__}: {e}"})
            if device_is_cuda:
                torch.cuda.empty_cache()
            continue
        rows.append(row)
        if verbose:
            mem = (f"  mem {row['ours_mem_mb']:.1f} vs {row['incumbent_mem_mb']:.1f} MB"
                   if "ours_mem_mb" in row else "")
            diff = f"  diff {row['max_abs_diff']:.1e}" if "max_abs_diff" in row else ""
            if row["background_cpu"] is not None:
                diff += (f"  [others {row['background_cpu']:.1f} cores, us {row['cpu_per_wall']:.1f}"
                         + (f", {row['attempts']} tries" if row["attempts"] > 1 else "") + "]")
            print(f"[{i + 1}/{n} {time.perf_counter() - t_start:6.0f}s] {cfg.name:<28} {mode:<15} "
                  f"ours {row['ours_ms']:9.2f} ms  {incumbent} {row['incumbent_ms']:9.2f} ms  "
                  f"{row['speedup']:5.2f}x{mem}{diff}", file=sys.stderr, flush=True)
    return rows


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="prefix_attn vs an incumbent (cat + SDPA): latency, peak memory, "
                                             "accuracy",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", default="auto", help="prefix_attn backend (auto, cpu, reference, triton, cuda)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("-B", "--batch", type=int, nargs="+", help="batch sizes (custom sweep)")
    ap.add_argument("-H", "--heads", type=int, nargs="+", help="query heads (custom sweep)")
    ap.add_argument("--hkv", type=int, nargs="+", help="KV heads (custom sweep; default = heads)")
    ap.add_argument("-N", "--seqlen", type=int, nargs="+", help="query lengths (custom sweep)")
    ap.add_argument("--nk", type=int, nargs="+", help="key lengths (custom sweep; default = seqlen)")
    ap.add_argument("-P", "--prefix", type=int, nargs="+", help="prefix lengths (custom sweep)")
    ap.add_argument("-D", "--headdim", type=int, nargs="+", help="head dims (custom sweep)")
    ap.add_argument("--causal", choices=["both", "true", "false"], default=None,
                    help="causal settings of the custom sweep (default: both for custom sweeps; "
                         "the default sweep is causal and the targets run both)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                    help="passes: fwd; train_step (forward + backward, every gradient: prefix tuning above "
                         "the first layer); prefix_only_bwd (the backward alone, only the prefix's gradient: "
                         "the first layer)")
    ap.add_argument("--incumbent", default=DEFAULT_INCUMBENT, choices=TRAIN_INCUMBENTS,
                    help="what ours is compared with (bench_common.INCUMBENTS)")
    ap.add_argument("--no-targets", action="store_true", help="skip the three target shapes")
    ap.add_argument("--targets-only", action="store_true", help="only the three target shapes")
    ap.add_argument("--quick", action="store_true",
                    help="1 warm-up, 3 repeats, passes fwd and train_step (unless --modes); "
                         "the target shapes only unless a custom sweep is given (~2 minutes on 2 cores)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs per (config, mode)")
    ap.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    ap.add_argument("--memory-method", choices=["fork", "spawn"], default=None,
                    help="CPU: how each fresh measuring process starts (memory.py; default fork)")
    ap.add_argument("--no-check", action="store_true", help="skip the max-abs-diff check")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="CPU: before timing each (config, mode) wait up to this long for other "
                         "processes to use < 0.2 cores (how busy it was is recorded in any case)")
    ap.add_argument("--retries", type=int, default=0,
                    help="CPU: time a (config, mode) again, up to this many times, when other processes "
                         "used > 0.2 cores meanwhile; the least disturbed attempt is kept")
    ap.add_argument("--redo-busy", action="store_true",
                    help="load the results JSON this command line would write, time again the rows that "
                         "other processes disturbed, and rewrite it (use with --wait-quiet/--retries)")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="attention dropout for every shape, ours and the incumbent alike (training passes; "
                         "the default sweep otherwise)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware-slug>)")
    ap.add_argument("--name", default=None, help="file stem (default attention, attention-quick, attention-custom)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no files")
    return ap.parse_args(argv)


def configs_from_args(args) -> tuple[list[Config], str]:
    custom = any(x is not None for x in (args.batch, args.heads, args.hkv, args.seqlen, args.nk,
                                         args.prefix, args.headdim, args.causal))
    targets = [] if args.no_targets else target_configs()
    if not custom:
        if args.quick or args.targets_only:
            shapes, name = target_configs(), "attention-quick" if args.quick else "attention-targets"
        else:
            shapes, name = list(dict.fromkeys(targets + default_sweep())), "attention"
        if args.dropout:
            shapes = [dataclasses.replace(c, dropout=args.dropout) for c in shapes]
            name += f"-dropout{args.dropout:g}"
        return shapes, name
    causals = {"both": (True, False), "true": (True,), "false": (False,), None: (True, False)}[args.causal]
    sweep = [Config(B=b, H=h, N=n, P=p, D=d, causal=c, Hkv=hkv, Nk=nk, dropout=args.dropout)
             for b, h, hkv, n, nk, p, d, c in itertools.product(
                 args.batch or [2], args.heads or [8], args.hkv or [0], args.seqlen or [512],
                 args.nk or [0], args.prefix if args.prefix is not None else [64], args.headdim or [64], causals)]
    if args.dropout:
        targets = [dataclasses.replace(c, dropout=args.dropout) for c in targets]
    return list(dict.fromkeys(targets + sweep)), "attention-custom"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.warmup, args.min_reps, args.max_reps, args.budget = 1, 3, 3, 0.0
        if args.modes == list(MODES):
            args.modes = ["fwd", "train_step"]
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    if args.memory_method:
        os.environ["PREFIX_ATTN_MEMORY_METHOD"] = args.memory_method
    memory_method = os.environ.get("PREFIX_ATTN_MEMORY_METHOD", "fork")
    configs, stem = configs_from_args(args)
    stem = args.name or stem

    hw = hardware_info(device)
    meta = {"hardware": hw, "package": package_info(device, args.backend), "dtype": str(dtype).replace("torch.", ""),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "git_commit": git_commit(), "argv": sys.argv[1:],
            "timing": {"warmup": args.warmup, "min_reps": args.min_reps, "max_reps": args.max_reps,
                       "budget_s": args.budget, "statistic": "median",
                       "order": f"interleaved ours, {args.incumbent} per repeat",
                       "clock": "torch.cuda.Event" if device.type == "cuda" else "time.perf_counter"},
            "memory_method": ("cuda max_memory_allocated - memory_allocated" if device.type == "cuda" else
                              f"fresh process per measurement ({memory_method}), MALLOC_MMAP_THRESHOLD_=65536 "
                              "MALLOC_ARENA_MAX=2, VmHWM - VmRSS after clear_refs"),
            "flops_convention": bc.FLOPS_CONVENTION, "bytes_floor": bc.BYTES_CONVENTION,
            "passes": dict(bc.PASS_LABELS),
            "speedup": "incumbent_ms / ours_ms", "mem_ratio": "incumbent_mem / ours_mem",
            "incumbent_name": args.incumbent, "incumbent": bc.INCUMBENTS[args.incumbent].what}
    print(f"# {_meta_line(meta)}", file=sys.stderr)
    load = hw["loadavg_at_start"]
    if device.type == "cpu" and load and load[0] > 0.5:
        print(f"# warning: load average {load[0]} before the start: other work on this machine will "
              f"slow both implementations and add noise", file=sys.stderr)
    out_dir = args.out or os.path.join(_HERE, "results", hw["slug"])
    if args.redo_busy:
        return redo_busy(os.path.join(out_dir, stem + ".json"), args, device, dtype)
    print(f"# backends available: {meta['package']['available_backends']}; auto picks "
          f"{meta['package']['auto_selects']}; {len(configs)} configs x {len(args.modes)} modes", file=sys.stderr)

    skipped: list[dict] = []
    rows = run(configs, args.modes, backend=args.backend, device=device, dtype=dtype, warmup=args.warmup,
               min_reps=args.min_reps, max_reps=args.max_reps, budget_s=args.budget,
               measure_memory=not args.no_memory, check=not args.no_check, wait_quiet_s=args.wait_quiet,
               retries=args.retries, skipped=skipped, incumbent=args.incumbent)
    if skipped:
        meta["skipped"] = skipped
    if not rows:
        print("nothing ran", file=sys.stderr)
        return 1
    hw["loadavg_at_end"] = _loadavg()
    finish(rows, meta, out_dir, stem, save=not args.no_save)
    return 0


def finish(rows, meta, out_dir, stem, *, save=True):
    """Print the table and geometric means; write JSON, markdown and PNG."""
    gm = target_geomeans(rows)
    table = markdown_table(rows)
    if gm:
        inc = incumbent_label(rows)
        table += ("\n\nGeometric mean over the target shapes "
                  + ", ".join(f"{b}x{h}x{n} P{p} D{d}" for b, h, n, p, d in TARGET_SHAPES)
                  + f" (speedup = {inc} ms / ours ms; memory ratio = {inc} MB / ours MB):\n\n"
                  + geomean_table(gm))
    busy = [r for r in rows if (r.get("background_cpu") or 0) > BUSY_CORES]
    if busy:
        table += (f"\n\nNote: other processes used up to {max(r['background_cpu'] for r in busy):.1f} cores "
                  f"while {len(busy)} of {len(rows)} rows were timed ({', '.join(r['config'] + ' ' + r['mode'] for r in busy)}); "
                  "those timings are less reliable (JSON: background_cpu, cpu_per_wall; rerun them with --redo-busy).")
    print(table)
    if save:
        paths = write_results(rows, gm, meta, out_dir, stem, table)
        print("\nwrote " + ", ".join(os.path.relpath(p) for p in paths.values()), file=sys.stderr)


def redo_busy(path: str, args, device, dtype) -> int:
    """Time again the rows of an earlier run that other processes disturbed; rewrite its files."""
    with open(path) as f:
        saved = json.load(f)
    rows, meta = saved["rows"], saved["meta"]
    old = sorted({r["mode"] for r in rows} - set(MODES))
    if old:
        # written before the passes were renamed and recounted (bench_common): mixing the two
        # conventions in one file would make its rows incomparable
        print(f"# {path}: its passes {old} predate the current ones {list(MODES)}; run it again whole "
              "instead of --redo-busy", file=sys.stderr)
        return 1
    todo = [i for i, r in enumerate(rows) if (r.get("background_cpu") or 0) > BUSY_CORES]
    print(f"# {path}: {len(todo)} of {len(rows)} rows were timed on a busy machine", file=sys.stderr)
    fields = [f.name for f in dataclasses.fields(Config)]
    for i in todo:
        r = rows[i]
        cfg = Config(**{k: r[k] for k in fields})
        new = run([cfg], [r["mode"]], backend=meta["package"]["backend_requested"], device=device, dtype=dtype,
                  warmup=args.warmup, min_reps=args.min_reps, max_reps=args.max_reps, budget_s=args.budget,
                  measure_memory=not args.no_memory, check=not args.no_check,
                  wait_quiet_s=args.wait_quiet, retries=args.retries,
                  incumbent=r.get("incumbent", DEFAULT_INCUMBENT))[0]
        for key in ("ours_mem_mb", "incumbent_mem_mb", "mem_ratio", "mem_ratio_is_lower_bound",
                    "max_abs_diff", "max_rel_diff", "diff_by_tensor"):
            if key in r and key not in new:  # keep what this rerun skipped
                new[key] = r[key]
        new["redone"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        rows[i] = new
    meta.setdefault("redone_rows", []).extend(
        f"{rows[i]['config']} {rows[i]['mode']} at {rows[i]['redone']}" for i in todo)
    finish(rows, meta, os.path.dirname(path), os.path.splitext(os.path.basename(path))[0], save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
