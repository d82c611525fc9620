"""Prepare the Triton compile cache that `make gpu-call-1` / `gpu-call-2` carry to the GPU machine:
every kernel they will launch, compiled here for sm_90, with no GPU.

    /tmp/py312/bin/python -O tools/triton_cache_prepare.py [--out build/triton-cache] [--arch 90]
        [--steps tier suite] [--seconds N] [--pack build/triton-cache.tar.gz]

Run it with the GPU machine's Triton build (the same wheel: Triton's cache key hashes its own
sources and libtriton, so 3.6.0 for cp312 is not 3.6.0 for cp311), see docs in
benchmarks/GPU_NOTES.md ("Compile caches"). What makes a key, and how each part is matched:
- triton_key(): the Triton wheel (same version and Python tag);
- the backend: ptxas's version (the wheel's own ptxas, as long as TRITON_PTXAS_PATH is unset
  on both sides) and the target, GPUTarget("cuda", 90, 32);
- the options: num_warps / num_stages from the launchers (default configs, as the tier runs with
  PREFIX_ATTN_AUTOTUNE=0; for the suite every autotuning candidate), libdevice's content;
- the cache-invalidating environment: none set (never TRITON_DEFAULT_FP_FUSION, which
  `make triton-check` sets: it changes every key);
- the source and its specialisation: the real launchers run the GPU tier's own tests, on
  tools/fake_cuda's device (CPU tensors, 64-byte aligned like CUDA's), under a compile-only
  driver (tools/triton_compile_check.py's): same shapes, strides and constexprs, so the same
  divisibility-by-16 and equal-to-1 attributes. The tests fail (nothing runs); the compiles stay.
Known gap: launch parameters derived from the device (the prefix-gradient's program count
is 2 x SMs on a GPU, 7 on CPU) can give another specialisation; the hit/miss log of the first
GPU run names every kernel that missed.

TRITON_STORE_BINARY_ONLY=1 (not part of the key): the cubin and its metadata only.

Triton's group files (__grp__NAME.json) hold ABSOLUTE paths to their entries: an unpacked cache
in another folder finds none of its files and misses everywhere. `--relocate DIR` rewrites them
for where DIR now is (standard library only; tools/gpu_check.sh runs it after unpacking) and
drops entries whose files are gone (the IR files pruned after the suite step).

    python3 tools/triton_cache_prepare.py --relocate build/triton-cache
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TIER_TESTS = ["tests/test_correctness.py", "tests/test_determinism.py", "tests/test_api.py", "tests/test_ops.py",
              "tests/test_triton.py", "tests/test_dropout.py"]


def setup(out: str, arch: int) -> None:
    os.environ.pop("TRITON_DEFAULT_FP_FUSION", None)
    os.environ.update(PREFIX_ATTN_FAKE_CUDA="1", TRITON_INTERPRET="0", TRITON_STORE_BINARY_ONLY="1",
                      TRITON_CACHE_DIR=os.path.abspath(out), PREFIX_ATTN_TEST_BACKENDS="triton",
                      PREFIX_ATTN_AUTOTUNE="0")
    sys.path[:0] = [ROOT, HERE, os.path.join(ROOT, "tests")]
    runpy.run_path(os.path.join(HERE, "fake_cuda", "sitecustomize.py"))  # tensors "on cuda" live on the CPU
    import triton_compile_check as tcc  # noqa: E402 - after the environment above
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    JITFunction.run = tcc._compile_only_run
    driver.set_active(tcc.CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    import dataclasses

    from prefix_attn import backends

    # the triton backend takes these CPU tensors as if they were on the GPU
    backends._REGISTRY["triton"] = dataclasses.replace(backends._REGISTRY["triton"], device_types=("cuda", "cpu"))


def tier(seconds: float, k: str | None) -> int:
    import pytest

    # Nothing runs, so every check would fail, and a test stops at its first failed check, before
    # the launches after it (a backward after the forward's check): under python -O with plain
    # asserts no assert runs, and assert_close checks nothing.
    if sys.flags.optimize:
        torch_testing = __import__("torch").testing
        torch_testing.assert_close = lambda *a, **k: None
    args = ["-q", "--assert=plain", "-m", "gpu_tier", "-p", "no:cacheprovider", "--timeout", str(int(seconds)),
            "-o", "addopts=", *TIER_TESTS, "-k", k or "triton"]
    try:
        import pytest_timeout  # noqa: F401
    except ImportError:
        args.remove("--timeout")
        args.remove(str(int(seconds)))
    return pytest.main(args)


def suite(deadline: float) -> None:
    """The suite's kernels: every autotuning candidate (tuning.FORCED, one round per candidate, as
    tools/triton_compile_check.py does) at the suite's target shapes (bf16, D 128, N 8192, P 128 /
    512 / 16, causal and not; forward, the full backward and the prefix-only backward). B = H = 2:
    the batch and head counts change only the grid and strides that stay divisible by 16."""
    import torch
    import triton_compile_check as tcc
    from prefix_attn import triton_backend as tb
    from prefix_attn.triton_backend import tuning

    dtype, D, N = torch.bfloat16, 128, 8192
    B, H = 2, 2
    for r, forced in enumerate(tcc._forced_rounds(dtype, D)):
        tuning.FORCED.clear()
        tuning.FORCED.update(forced)
        for P in (128, 512, 16):
            for causal in (True, False):
                if time.time() > deadline:
                    print(f"triton_cache_prepare: out of time in the suite step (round {r}, P {P})", flush=True)
                    tuning.FORCED.clear()
                    return
                q, k, v = (torch.randn(B, H, N, D, dtype=dtype) for _ in range(3))
                pk, pv = torch.randn(1, H, P, D, dtype=dtype), torch.randn(1, H, P, D, dtype=dtype)
                out, lse = torch.randn(B, H, N, D, dtype=dtype), torch.zeros(B, H, N)
                try:
                    tb.triton_forward(q, k, v, pk, pv, None, None, None, D ** -0.5, causal, False, 0.0, 0, 0)
                    for need in ((True, True, True), (False, False, True)):
                        tb.triton_backward(out, q, k, v, pk, pv, None, None, None, out, lse, None, D ** -0.5, causal,
                                           False, *need, 0.0, 0, 0)
                except Exception as e:  # noqa: BLE001 - what compiled stays in the cache
                    print(f"triton_cache_prepare: suite round {r} P {P} causal {causal}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
        print(f"triton_cache_prepare: suite round {r + 1} done", flush=True)
    tuning.FORCED.clear()


PRUNE = (".ptx", ".llir", ".ttir", ".ttgir")  # not needed to load a kernel; the check reads them here


def relocate(cache_dir: str, prune: bool = False) -> int:
    """Point every group file's entries at cache_dir's own files; returns the groups rewritten."""
    import json

    n = 0
    cache_dir = os.path.abspath(cache_dir)
    for entry in os.scandir(cache_dir):
        if not entry.is_dir():
            continue
        for name in os.listdir(entry.path):
            if prune and name.endswith(PRUNE):
                os.remove(os.path.join(entry.path, name))
        for name in os.listdir(entry.path):
            if not (name.startswith("__grp__") and name.endswith(".json")):
                continue
            path = os.path.join(entry.path, name)
            with open(path) as f:
                children = json.load(f).get("child_paths") or {}
            fixed = {c: os.path.join(entry.path, c) for c in children if os.path.exists(os.path.join(entry.path, c))}
            with open(path, "w") as f:
                json.dump({"child_paths": fixed}, f)
            n += 1
    return n


def pack(out: str, path: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(out, arcname="triton-cache")
    print(f"triton_cache_prepare: {path}: {os.path.getsize(path) / 2**20:.1f} MiB")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "triton-cache"))
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--steps", nargs="+", default=["tier", "suite"], choices=["tier", "suite"])
    ap.add_argument("-k", default=None, help="the tier's tests: a pytest -k expression (default: triton)")
    ap.add_argument("--seconds", type=float, default=3600)
    ap.add_argument("--pack", default=None, help="also write the cache as a .tar.gz (what travels)")
    ap.add_argument("--relocate", metavar="DIR", default=None, help="only rewrite DIR's group files for where it is")
    args = ap.parse_args(argv)
    if args.relocate:
        print(f"triton_cache_prepare: {relocate(args.relocate)} groups point into {os.path.abspath(args.relocate)}")
        return 0
    deadline = time.time() + args.seconds
    setup(args.out, args.arch)
    import triton

    print(f"triton_cache_prepare: Triton {triton.__version__} ({triton.__file__}), sm_{args.arch}, into {args.out}",
          flush=True)
    if "tier" in args.steps:
        tier(max(deadline - time.time(), 10), args.k)
    if "suite" in args.steps:
        suite(deadline)
    print(f"triton_cache_prepare: {relocate(args.out, prune=True)} groups in {args.out}", flush=True)
    if args.pack:
        pack(args.out, args.pack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
