"""Compile every Triton kernel of the triton backend for real GPUs, on a machine without one.

    python tools/triton_compile_check.py            # sm_80 and sm_90, the launch configs we use
    python tools/triton_compile_check.py --arch 90 --dtype bf16 --head-dim 128

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not the compiler: a kernel can
pass every interpreter test and still fail to lower to PTX, run out of shared memory, or spill
registers. This script drives the real launchers (`triton_forward`, `triton_backward`) with CPU
tensors under a compile-only driver: every `kernel[grid](...)` call compiles for the chosen GPU
target exactly as on a GPU (same constexprs, same specialisations) and then skips the launch.
Every autotuning candidate of configs.py is compiled (each round forces one candidate per kernel
kind through tuning.FORCED), so a config that cannot fit never reaches the autotuner on a GPU.
For each compiled kernel it prints, from ptxas / cuobjdump on the cubin:

    registers per thread, spilled bytes (stores / loads), local (stack) bytes, shared memory

and it fails when a kernel does not compile or needs more shared memory than the architecture
has. Spills are reported, not fatal: they cost speed, not correctness.

Needs Triton with its NVIDIA backend (the pip wheel ships ptxas and cuobjdump); no CUDA driver.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET; this script compiles for GPUs")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))

# Shared memory a block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class CompileOnlyDriver:
    """Just enough of a Triton driver to compile: a fixed target, device 0, stream 0."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


@dataclass
class Compiled:
    arch: int
    case: str
    kernel: str
    num_warps: int
    num_stages: int
    shared: int
    regs: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    #: the kernel's tl.dot lowered to Hopper's warpgroup MMA (wgmma) rather than mma.sync; only
    #: asked for 16-bit kernels on sm_90 (float32 runs IEEE fp32 without tensor cores)
    wgmma: Optional[bool] = None


_compiled: List[Tuple[str, object]] = []


def _compile_only_run(self, *args, grid, warmup, **kwargs):
    kernel = _original_run(self, *args, grid=grid, warmup=True, **kwargs)
    _compiled.append((self.fn.__name__, kernel))
    return kernel


_original_run = JITFunction.run


def _ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    """Registers and spills, from ptxas -v on the kernel's PTX (what Triton itself assembled)."""
    try:  # the ptxas Triton itself uses for this architecture (Triton >= 3.5 has two)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):
        ptxas = os.path.join(NVIDIA_BIN, "ptxas")
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{text}")
    out = {}
    if m := re.search(r"Used (\d+) registers", text):
        out["regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text):
        out["spill_stores"], out["spill_loads"] = int(m.group(1)), int(m.group(2))
    if m := re.search(r"(\d+) bytes stack frame", text):
        out["stack"] = int(m.group(1))
    return out


def _cases(dtype: torch.dtype, D: int):
    """(name, thunk) pairs: launcher calls that together compile every kernel and the constexpr
    variants that matter (prefix modes, masks, causal, every backward path: dQ by atomics or by
    its own kernel, the prefix gradient by atomics or chunk partials, prefix-only with Delta
    fused, a frozen prefix), and attention dropout on each path."""
    from prefix_attn import triton_backend as tb

    B, Hq, Hkv, N, P = 4, 4, 2, 300, 70

    def t(*shape, dt=dtype):
        return torch.randn(*shape, dtype=dt)

    q, k, v = t(B, Hq, N, D), t(B, Hkv, N, D), t(B, Hkv, N, D)
    pk, pv = t(1, Hkv, P, D), t(1, Hkv, P, D)
    bk, bv = t(3, Hkv, P, D), t(3, Hkv, P, D)
    idx = torch.tensor([2, 0, 2, 1])
    kpm = torch.ones(B, N, dtype=torch.bool)
    fmask = torch.zeros(B, Hq, N, N)
    out, lse, dout = t(B, Hq, N, D), torch.zeros(B, Hq, N), t(B, Hq, N, D)

    drop = (0.1, 2 ** 40 + 5, 3)  # dropout_p, a 64-bit seed, offset

    def fwd(dropout=(0.0, 0, 0), **kw):
        a = dict(prefix_k=pk, prefix_v=pv, prefix_index=None, key_padding_mask=None, attn_mask=None, causal=True)
        a.update(kw)
        return lambda: tb.triton_forward(q, k, v, a["prefix_k"], a["prefix_v"], a["prefix_index"],
                                         a["key_padding_mask"], a["attn_mask"], 0.1, a["causal"], False, *dropout)

    def bwd(deterministic=False, dropout=(0.0, 0, 0), **kw):
        a = dict(prefix_k=pk, prefix_v=pv, prefix_index=None, key_padding_mask=None, attn_mask=None, causal=True,
                 need=(True, True, True))
        a.update(kw)
        return lambda: tb.triton_backward(dout, q, k, v, a["prefix_k"], a["prefix_v"], a["prefix_index"],
                                          a["key_padding_mask"], a["attn_mask"], out, lse, None, 0.1, a["causal"],
                                          deterministic, *a["need"], *dropout)

    return [
        ("fwd causal, shared prefix", fwd()),
        ("fwd bank + key_padding_mask + float mask", fwd(prefix_k=bk, prefix_v=bv, prefix_index=idx,
                                                       key_padding_mask=kpm, attn_mask=fmask, causal=False)),
        ("bwd causal, all grads (dQ by atomics)", bwd()),
        ("bwd causal, all grads, deterministic", bwd(deterministic=True)),
        ("bwd frozen prefix (dQ over the prefix by atomics)", bwd(need=(True, True, False))),
        ("bwd prefix only, shared (Delta fused)", bwd(need=(False, False, True))),
        ("bwd prefix only, bank + key_padding_mask, deterministic",
         bwd(deterministic=True, prefix_k=bk, prefix_v=bv, prefix_index=idx, key_padding_mask=kpm,
             need=(False, False, True))),
        ("fwd causal, dropout", fwd(dropout=drop)),
        ("bwd causal, all grads, dropout", bwd(dropout=drop)),
        ("bwd causal, all grads, deterministic, dropout", bwd(deterministic=True, dropout=drop)),
        ("bwd prefix only, dropout", bwd(need=(False, False, True), dropout=drop)),
    ]


def _forced_rounds(dtype: torch.dtype, D: int):
    """Config assignments that together compile every candidate of every kernel kind: round i
    forces each kind's i-th candidate (its last one once it has fewer)."""
    from prefix_attn.triton_backend import configs

    cands = {kind: configs.candidates(kind, D, dtype) for kind in configs.KINDS}
    rounds = max(len(c) for c in cands.values())
    return [{kind: c[min(i, len(c) - 1)] for kind, c in cands.items()} for i in range(rounds)]


def _kernels():
    from prefix_attn.triton_backend import backward, forward

    fns = (forward._fwd_kernel, backward._bwd_preprocess_kernel, backward._bwd_dq_kernel,
           backward._bwd_dkdv_kernel, backward._bwd_dprefix_kernel)
    out = []
    for fn in fns:
        while not isinstance(fn, JITFunction):  # @triton.heuristics wraps the JITFunction
            fn = fn.fn
        out.append(fn)
    return out


def check(archs: List[int], dtypes: List[str], head_dims: List[int], every_config: bool = True
          ) -> Tuple[List[Compiled], List[str]]:
    from prefix_attn.triton_backend import tuning

    results, failures = [], []
    seen = set()
    JITFunction.run = _compile_only_run  # compile, never launch
    for arch in archs:
        driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
        for fn in _kernels():
            fn.device_caches.clear()  # compiled for the previous target
        for dname in dtypes:
            for D in head_dims:
                rounds = _forced_rounds(DTYPES[dname], D)
                for r, forced in enumerate(rounds if every_config else rounds[:1]):
                    tuning.FORCED.clear()
                    tuning.FORCED.update(forced)
                    for name, thunk in _cases(DTYPES[dname], D):
                        case = f"{dname} D={D}: {name}"
                        _compiled.clear()
                        try:
                            thunk()
                        except Exception as e:  # noqa: BLE001 - report every failing case, then fail
                            failures.append(f"sm_{arch} {case} (config round {r}): {type(e).__name__}: "
                                            f"{str(e)[:2000]}")
                            print(f"FAIL sm_{arch} {case} (round {r}): {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}", flush=True)
                            continue
                        for kname, kern in _compiled:
                            md = kern.metadata
                            key = (arch, kern.hash if hasattr(kern, "hash") else id(kern))
                            if key in seen:  # the same specialisation, compiled by an earlier case
                                continue
                            seen.add(key)
                            tile = _tile_of(md, kern)
                            rec = Compiled(arch, f"{case} [{tile}]", kname, md.num_warps, md.num_stages, md.shared)
                            try:
                                for k_, val in _ptxas_report(kern.asm["ptx"], arch).items():
                                    setattr(rec, k_, val)
                            except Exception as e:  # noqa: BLE001
                                failures.append(f"sm_{arch} {case} {kname}: {e}")
                            ptx = kern.asm["ptx"]
                            if arch >= 90 and dname != "fp32" and "mma" in ptx:
                                rec.wgmma = "wgmma.mma_async" in ptx
                            limit = SHARED_LIMIT.get(arch)
                            if limit is not None and md.shared > limit:
                                failures.append(f"sm_{arch} {case} [{tile}] {kname}: needs {md.shared} B of shared "
                                                f"memory, the limit is {limit} B")
                            results.append(rec)
                            print(f"sm_{arch}  {case:62s} {kname:24s} {tile:10s} warps {rec.num_warps} "
                                  f"stages {rec.num_stages} regs {rec.regs} spill {rec.spill_stores}/"
                                  f"{rec.spill_loads} B shared {rec.shared} B"
                                  + ("" if rec.wgmma is None else f" {'wgmma' if rec.wgmma else 'mma.sync'}"),
                                  flush=True)
    tuning.FORCED.clear()
    return results, failures


def _tile_of(md, kern) -> str:
    """BLOCK_M x BLOCK_N of a compiled kernel, from its constexprs (Triton keeps them in
    different places across versions)."""
    consts = getattr(kern, "constants", None) or getattr(getattr(kern, "src", None), "constants", None) or {}
    vals = {}
    for key, val in dict(consts).items():
        name = key if isinstance(key, str) else None
        if name is None and hasattr(kern, "src"):
            try:
                name = kern.src.fn.arg_names[key[0] if isinstance(key, tuple) else key]
            except Exception:  # noqa: BLE001
                name = None
        if name in ("BLOCK_M", "BLOCK_N"):
            vals[name] = val
    return f"{vals.get('BLOCK_M', '?')}x{vals.get('BLOCK_N', '?')}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--out", default=None, help="also write the report as a markdown table to this file")
    ap.add_argument("--defaults-only", action="store_true",
                    help="compile only each kernel's default config, not every autotuning candidate")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(NVIDIA_BIN, "ptxas")):
        print(f"triton_compile_check: no ptxas under {NVIDIA_BIN}; this Triton has no NVIDIA backend")
        return 1
    print(f"Triton {triton.__version__}, torch {torch.__version__}: compiling for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} (no GPU needed)", flush=True)
    results, failures = check(args.arch, args.dtype, args.head_dim, every_config=not args.defaults_only)
    spilled = sorted({(r.arch, r.kernel, r.case) for r in results if (r.spill_stores or 0) > 0})
    print(f"\n{len(results)} kernel compilations, {len(failures)} failures, {len(spilled)} with register spills")
    no_wgmma = sorted({(r.kernel, r.case) for r in results if r.wgmma is False})
    print(f"16-bit kernels on sm_90: {sum(r.wgmma is True for r in results)} use wgmma, "
          f"{len(no_wgmma)} only mma.sync")
    for kname, case in no_wgmma:
        print(f"  mma.sync only: {kname} ({case})")
    for arch, kname, case in spilled:
        print(f"  spills: sm_{arch} {kname} ({case})")
    for f in failures:
        print(f"FAILED: {f}")
    if args.out:
        write_markdown(args.out, results, failures)
        print(f"wrote {args.out}")
    return 1 if failures else 0


def write_markdown(path: str, results: List[Compiled], failures: List[str]) -> None:
    lines = [f"# Triton kernels compiled without a GPU (Triton {triton.__version__})", "",
             "Written by `tools/triton_compile_check.py` (`make triton-check`): each kernel as the launchers "
             "compile it, with registers per thread, spilled bytes (stores / loads) and shared memory per "
             "block from ptxas. Nothing here was run or timed.", "",
             "| arch | case | kernel | warps | stages | registers | spill B | shared B | MMA |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        lines.append(f"| sm_{r.arch} | {r.case} | {r.kernel} | {r.num_warps} | {r.num_stages} | {r.regs} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.shared} | "
                     f"{'-' if r.wgmma is None else ('wgmma' if r.wgmma else 'mma.sync')} |")
    lines += ["", f"{len(results)} compilations, {len(failures)} failures."]
    lines += [f"- FAILED: {f}" for f in failures]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
