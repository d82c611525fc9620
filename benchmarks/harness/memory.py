"""Peak *extra* memory of one call, one measurer per device: what an op needs on top of what
already exists (inputs, weights), at the peak: its output, autograd's saved tensors, gradients and
temporaries, freed before it returns or not. That decides whether a batch fits.

CUDA, in this process (`peak_call`): synchronize; reset the peak; before = memory_allocated();
run; synchronize; extra = max_memory_allocated() - before: the caching allocator's count of live
tensor bytes (cached-but-free blocks are not counted).

CPU, in a fresh process per measurement (`measure_peak_extra`): there is no allocator counter, so
we read the kernel's. The process runs with MALLOC_MMAP_THRESHOLD_=65536 (every block of 64 KiB or
more is its own mmap and goes back to the kernel when freed, so the resident set follows live
memory) and MALLOC_ARENA_MAX=2. It builds its inputs, runs the call once (lazy init, thread
pools), gc.collect(), writes "5" to /proc/self/clear_refs (VmHWM := VmRSS), reads VmRSS, runs the
call again, reads VmHWM: extra = VmHWM - VmRSS. Each measurement is a child forked from a zygote
that has those settings and has imported torch and the target's module but run nothing
("fork", the default), or a new interpreter ("spawn", PREFIX_ATTN_MEMORY_METHOD=spawn); both read
the same within 0.2 MB. Pages, not bytes: ~4 KiB granularity and a few hundred KiB of noise;
memory never written is not resident. Linux with glibc only. tests/test_bench_harness.py checks
it on known sizes (selftest_alloc: filling 10 MB reads 9.5-11 MB; selftest_noop reads < 1 MB).

The CPU measurement needs a target "module:function" (importable with benchmarks/ on sys.path, or
"path/file.py:function"): a factory that takes JSON-able kwargs, builds its inputs, and returns the
zero-argument callable to measure.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

_BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: targets import from here
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
        if _BENCH not in sys.path:
            sys.path.insert(0, _BENCH)
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
    return {"extra_bytes": max(0, hwm - before) * 1024}


def peak_call(fn: Callable[[], Any], device: Any = "cpu") -> tuple[Any, float, int | None]:
    """(fn's result, seconds, peak bytes above what was allocated before the call) of one call; the
    peak is None off CUDA, where only a fresh process measures it (measure_peak_extra)."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return result, seconds, (torch.cuda.max_memory_allocated(device) - before) if cuda else None


def measure_peak_extra(target: str, kwargs: dict | None = None, *, device: str = "cpu",
                       method: str | None = None, timeout: float = 900.0) -> int:
    """Peak extra bytes of the callable built by ``target(**kwargs)``.

    device "cpu": in a fresh process (see module doc), started by ``method``:
        "fork"  (default) forked from a zygote process that has the malloc settings and has
                imported torch and the target's module, but run nothing: each measurement
                is still a new process with a heap no earlier measurement touched, without
                paying ~1.5 s of ``import torch`` each time;
        "spawn" a new ``python`` per measurement (slower; stderr is shown on failure).
        The default can be set with the environment variable PREFIX_ATTN_MEMORY_METHOD.
    device "cuda[:i]": in this process, after one warm-up call (peak_call).
    """
    kwargs = dict(kwargs or {})
    if str(device).startswith("cuda"):
        fn = _resolve(target)(**kwargs)
        fn()
        return max(0, peak_call(fn, device)[2])
    if not sys.platform.startswith("linux"):
        raise MemoryMeasurementError("CPU peak memory needs Linux /proc (VmHWM, clear_refs)")
    method = method or os.environ.get("PREFIX_ATTN_MEMORY_METHOD", "fork")
    if method == "fork":
        result = _zygote().measure(target, kwargs, timeout)
    elif method == "spawn":
        result = _spawn(target, kwargs, timeout)
    else:
        raise ValueError(f"method must be 'fork' or 'spawn', got {method!r}")
    if "error" in result:
        raise MemoryMeasurementError(f"memory child for {target}: {result['error']}")
    return result["extra_bytes"]


def _child_env() -> dict[str, str]:
    return dict(os.environ, **CPU_CHILD_ENV)


def _spawn(target: str, kwargs: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child",
           "--target", target, "--kwargs", json.dumps(kwargs)]
    proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise MemoryMeasurementError(f"memory child for {target} failed (exit {proc.returncode}):\n{tail}")


class _Zygote:
    """A python process, started with the malloc settings, that forks one child per measurement."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--zygote"], env=_child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, bufsize=1)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def measure(self, target: str, kwargs: dict, timeout: float) -> dict:
        import select

        self.proc.stdin.write(json.dumps({"target": target, "kwargs": kwargs}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.close()
                raise MemoryMeasurementError(f"memory child for {target}: no answer in {timeout:.0f} s")
            line = self.proc.stdout.readline()
            if not line:
                raise MemoryMeasurementError(f"memory zygote died (exit {self.proc.poll()})")
            if line.startswith(_RESULT_MARK):
                return json.loads(line[len(_RESULT_MARK):])

    def close(self):
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_ZYGOTE: _Zygote | None = None


def _zygote() -> _Zygote:
    global _ZYGOTE
    if _ZYGOTE is None or not _ZYGOTE.alive():
        _ZYGOTE = _Zygote()
        atexit.register(_ZYGOTE.close)
    return _ZYGOTE


def _measure_here(target: str, kwargs: dict) -> dict:
    try:
        return peak_extra_bytes_cpu_here(_resolve(target)(**kwargs))
    except Exception as e:  # reported to the parent, which raises
        return {"error": f"{type(e).__name__}: {e}"}


def _zygote_loop() -> int:
    import torch  # noqa: F401  (the point: every child inherits it imported)

    for line in sys.stdin:
        request = json.loads(line)
        target, kwargs = request["target"], request["kwargs"]
        # Import the target's module here, once, so children inherit it too; building
        # and running stays in the child.
        try:
            _resolve(target)
        except Exception as e:
            print(_RESULT_MARK + json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the fresh child
            os.close(read_fd)
            result = _measure_here(target, kwargs)
            with os.fdopen(write_fd, "w") as f:
                f.write(json.dumps(result))
            os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd) as f:
            payload = f.read()
        _, status = os.waitpid(pid, 0)
        if not payload:
            payload = json.dumps({"error": f"child died ({'signal %d' % os.WTERMSIG(status) if os.WIFSIGNALED(status) else 'exit %d' % os.WEXITSTATUS(status)}); "
                                           "rerun with method='spawn' to see its stderr"})
        print(_RESULT_MARK + payload, flush=True)
    return 0


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


def _child(target: str, kwargs_json: str) -> int:
    print(_RESULT_MARK + json.dumps(_measure_here(target, json.loads(kwargs_json))), flush=True)
    return 0


if __name__ == "__main__":  # the fresh processes: `--zygote`, or `--child --target T --kwargs JSON`
    ap = argparse.ArgumentParser(description="a fresh process of measure_peak_extra (not for direct use)")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--zygote", action="store_true")
    ap.add_argument("--target")
    ap.add_argument("--kwargs", default="{}")
    args = ap.parse_args()
    sys.exit(_zygote_loop() if args.zygote else _child(args.target, args.kwargs))
