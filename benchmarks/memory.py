"""Peak *extra* memory of one call: what an op needs on top of what already exists.

    extra = peak memory while the call runs  -  memory in use just before it

Inputs, weights and anything built before the call are not counted; the output, autograd's
saved tensors, gradients and every temporary are, whether they are freed before the call
returns or not. That is the number that decides whether a batch fits.

How it is measured
------------------
CUDA (in this process)
    ``torch.cuda.synchronize()``; baseline = ``torch.cuda.memory_allocated()``;
    ``torch.cuda.reset_peak_memory_stats()``; run; synchronize;
    extra = ``torch.cuda.max_memory_allocated() - baseline``.
    This is the caching allocator's own count of live tensor bytes, exact to its
    rounding (512 B blocks); cached-but-free blocks are not counted.

CPU (one fresh subprocess per measurement)
    There is no allocator counter on CPU, so we read the kernel's: the process's resident
    set (VmRSS) and its high-water mark (VmHWM) in /proc/self/status. To make RSS follow
    live memory, the child runs with

        MALLOC_MMAP_THRESHOLD_=65536   every block >= 64 KiB gets its own mmap, and goes
                                       back to the kernel the moment it is freed (glibc
                                       would otherwise keep freed heap pages resident,
                                       and raise the threshold on its own);
        MALLOC_ARENA_MAX=2             no pile of per-thread arenas holding small blocks.

    Inside the child: build the inputs, run the call once (warm-up: lazy init, OpenMP
    thread stacks, one-time caches), ``gc.collect()``, write "5" to /proc/self/clear_refs
    (resets VmHWM to the current VmRSS, Linux >= 4.0), read VmRSS, run the call once more,
    read VmHWM. extra = VmHWM - VmRSS-before. A fresh process per (impl, config, mode)
    keeps one measurement's heap state from leaking into the next.

    Caveats: it counts pages, not bytes, so it has ~4 KiB granularity per buffer plus a
    few hundred KiB of noise (small allocations, Python objects); memory allocated but
    never written (``torch.empty`` never touched) does not become resident and is not
    counted. Differences below ~1 MB are noise. Needs Linux and a glibc-based Python.

    Validation (``python benchmarks/memory.py --selftest``): a callable that allocates and
    fills a 100 MB float32 tensor reads 100.0 MB (measured: 99.7-100.1 MB), and one that
    allocates nothing reads < 1 MB.

Usage
-----
    from memory import measure_peak_extra
    nbytes = measure_peak_extra("bench_attention:build_memory_step",
                                {"cfg": {...}, "impl": "ours", ...}, device="cpu")

``target`` is ``"module:function"`` (or ``"path/to/file.py:function"``): a factory that
takes the JSON-able ``kwargs``, builds its inputs and returns the zero-argument callable
to measure. The module must be importable from this directory (the child runs with
benchmarks/ first on sys.path) or from the installed packages.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
_RESULT_MARK = "PEAK_EXTRA_JSON "

CPU_CHILD_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_ARENA_MAX": "2",
}


class MemoryMeasurementError(RuntimeError):
    pass


def _resolve(target: str) -> Callable[..., Callable[[], Any]]:
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"target must be 'module:function', got {target!r}")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(module_name))[0], module_name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if _HERE not in sys.path:
            sys.path.insert(0, _HERE)
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def _proc_status_kib(*fields: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])  # "123456 kB"
    return out


def peak_extra_bytes_cpu_here(fn: Callable[[], Any]) -> dict[str, int]:
    """The CPU measurement, in *this* process. Meant for the fresh child; see module doc.

    Calls fn twice (warm-up, then the measured call).
    """
    fn()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_kib("VmRSS")["VmRSS"]
    fn()
    hwm = _proc_status_kib("VmHWM")["VmHWM"]
    return {"extra_bytes": max(0, hwm - before) * 1024,
            "rss_before_bytes": before * 1024, "hwm_bytes": hwm * 1024}


def peak_extra_bytes_cuda(fn: Callable[[], Any], device: Any = None) -> dict[str, int]:
    """The CUDA measurement, in this process. Calls fn twice (warm-up, then measured)."""
    import torch

    fn()
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"extra_bytes": max(0, peak - before), "rss_before_bytes": before, "hwm_bytes": peak}


def measure_peak_extra(target: str, kwargs: dict | None = None, *, device: str = "cpu",
                       timeout: float = 900.0, details: bool = False):
    """Peak extra bytes of the callable built by ``target(**kwargs)``.

    device "cpu": in a fresh subprocess (see module doc); "cuda[:i]": in this process.
    Returns an int (bytes), or the dict with before/peak when ``details`` is true.
    """
    kwargs = dict(kwargs or {})
    if str(device).startswith("cuda"):
        result = peak_extra_bytes_cuda(_resolve(target)(**kwargs), device)
        return result if details else result["extra_bytes"]
    if not sys.platform.startswith("linux"):
        raise MemoryMeasurementError("CPU peak memory needs Linux /proc (VmHWM, clear_refs)")

    env = dict(os.environ, **CPU_CHILD_ENV)
    cmd = [sys.executable, os.path.abspath(__file__), "--child",
           "--target", target, "--kwargs", json.dumps(kwargs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            result = json.loads(line[len(_RESULT_MARK):])
            break
    else:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise MemoryMeasurementError(
            f"memory child for {target} failed (exit {proc.returncode}):\n{tail}")
    if "error" in result:
        raise MemoryMeasurementError(f"memory child for {target}: {result['error']}")
    return result if details else result["extra_bytes"]


# --- self-test targets ---------------------------------------------------------------------

def selftest_alloc(mbytes: float = 100.0) -> Callable[[], None]:
    """Factory: a callable that allocates, fills and frees `mbytes` MB (10^6 B) of float32."""
    import torch

    numel = int(mbytes * 1e6) // 4

    def fn():
        t = torch.ones(numel)
        del t
    return fn


def selftest_noop() -> Callable[[], None]:
    import torch

    x = torch.ones(1000)

    def fn():
        return x.sum().item()
    return fn


def _selftest() -> int:
    ok = True
    for target, kwargs, lo, hi in [
        ("memory:selftest_alloc", {"mbytes": 100.0}, 99.0, 101.5),
        ("memory:selftest_alloc", {"mbytes": 10.0}, 9.5, 11.0),
        ("memory:selftest_noop", {}, 0.0, 1.0),
    ]:
        mb = measure_peak_extra(target, kwargs, device="cpu") / 1e6
        good = lo <= mb <= hi
        ok &= good
        print(f"{target}({kwargs}): {mb:.2f} MB  expected [{lo}, {hi}]  {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


def _child(target: str, kwargs_json: str) -> int:
    try:
        fn = _resolve(target)(**json.loads(kwargs_json))
        result = peak_extra_bytes_cpu_here(fn)
    except Exception as e:  # reported to the parent, which raises
        result = {"error": f"{type(e).__name__}: {e}"}
    print(_RESULT_MARK + json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selftest", action="store_true", help="check the CPU method on known sizes")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--kwargs", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.target, args.kwargs)
    if args.selftest:
        return _selftest()
    ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
