"""Compile every Triton kernel of the triton backend for real GPUs, on a machine without one.

    python tools/triton_compile_check.py            # sm_80 and sm_90, the launch configs we use
    python tools/triton_compile_check.py --arch 90 --dtype bf16 --head-dim 128

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not the compiler: a kernel can
pass every interpreter test and still fail to lower to PTX, run out of shared memory, or spill
registers. This script drives the real launchers (`triton_forward`, `triton_backward`) with CPU
tensors under a compile-only driver: every `kernel[grid](...)` call compiles for the chosen GPU
target exactly as on a GPU (same constexprs, same specialisations) and then skips the launch.
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
    variants that matter (prefix modes, masks, causal, every backward kernel)."""
    from prefix_attn import triton_impl as ti

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

    def fwd(**kw):
        a = dict(prefix_k=pk, prefix_v=pv, prefix_index=None, key_padding_mask=None, attn_mask=None, causal=True)
        a.update(kw)
        return lambda: ti.triton_forward(q, k, v, a["prefix_k"], a["prefix_v"], a["prefix_index"],
                                         a["key_padding_mask"], a["attn_mask"], 0.1, a["causal"])

    def bwd(**kw):
        a = dict(prefix_k=pk, prefix_v=pv, prefix_index=None, key_padding_mask=None, attn_mask=None, causal=True,
                 need=(True, True, True))
        a.update(kw)
        return lambda: ti.triton_backward(dout, q, k, v, a["prefix_k"], a["prefix_v"], a["prefix_index"],
                                          a["key_padding_mask"], a["attn_mask"], out, lse, None, 0.1, a["causal"],
                                          True, *a["need"])

    return [
        ("fwd causal, shared prefix", fwd()),
        ("fwd bank + key_padding_mask + float mask", fwd(prefix_k=bk, prefix_v=bv, prefix_index=idx,
                                                       key_padding_mask=kpm, attn_mask=fmask, causal=False)),
        ("bwd causal, all grads", bwd()),
        ("bwd prefix only, bank + key_padding_mask", bwd(prefix_k=bk, prefix_v=bv, prefix_index=idx,
                                                          key_padding_mask=kpm, need=(False, False, True))),
    ]


def check(archs: List[int], dtypes: List[str], head_dims: List[int]) -> Tuple[List[Compiled], List[str]]:
    results, failures = [], []
    JITFunction.run = _compile_only_run  # compile, never launch
    for arch in archs:
        driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
        from prefix_attn import triton_impl as ti

        for fn in (ti._fwd_kernel, ti._bwd_preprocess_kernel, ti._bwd_dq_kernel, ti._bwd_dkdv_kernel,
                   ti._bwd_dprefix_kernel):
            fn.device_caches.clear()  # compiled for the previous target
        for dname in dtypes:
            for D in head_dims:
                for name, thunk in _cases(DTYPES[dname], D):
                    case = f"{dname} D={D}: {name}"
                    _compiled.clear()
                    try:
                        thunk()
                    except Exception as e:  # noqa: BLE001 - report every failing case, then fail
                        failures.append(f"sm_{arch} {case}: {type(e).__name__}: {str(e)[:2000]}")
                        print(f"FAIL sm_{arch} {case}: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                              flush=True)
                        continue
                    for kname, kern in _compiled:
                        md = kern.metadata
                        rec = Compiled(arch, case, kname, md.num_warps, md.num_stages, md.shared)
                        try:
                            for key, val in _ptxas_report(kern.asm["ptx"], arch).items():
                                setattr(rec, key, val)
                        except Exception as e:  # noqa: BLE001
                            failures.append(f"sm_{arch} {case} {kname}: {e}")
                        limit = SHARED_LIMIT.get(arch)
                        if limit is not None and md.shared > limit:
                            failures.append(f"sm_{arch} {case} {kname}: needs {md.shared} B of shared memory, "
                                            f"the limit is {limit} B")
                        results.append(rec)
                        print(f"sm_{arch}  {case:55s} {kname:24s} warps {rec.num_warps} stages {rec.num_stages} "
                              f"regs {rec.regs} spill {rec.spill_stores}/{rec.spill_loads} B "
                              f"shared {rec.shared} B", flush=True)
    return results, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--out", default=None, help="also write the report as a markdown table to this file")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(NVIDIA_BIN, "ptxas")):
        print(f"triton_compile_check: no ptxas under {NVIDIA_BIN}; this Triton has no NVIDIA backend")
        return 1
    print(f"Triton {triton.__version__}, torch {torch.__version__}: compiling for "
          f"{', '.join(f'sm_{a}' for a in args.arch)} (no GPU needed)", flush=True)
    results, failures = check(args.arch, args.dtype, args.head_dim)
    spilled = sorted({(r.arch, r.kernel, r.case) for r in results if (r.spill_stores or 0) > 0})
    print(f"\n{len(results)} kernel compilations, {len(failures)} failures, {len(spilled)} with register spills")
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
             "| arch | case | kernel | warps | stages | registers | spill B | shared B |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| sm_{r.arch} | {r.case} | {r.kernel} | {r.num_warps} | {r.num_stages} | {r.regs} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.shared} |")
    lines += ["", f"{len(results)} compilations, {len(failures)} failures."]
    lines += [f"- FAILED: {f}" for f in failures]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
