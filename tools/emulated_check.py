"""A short check of the CPU kernels on whatever CPU runs it, meant for an emulated one:

    qemu-x86_64 -cpu Haswell  .venv/bin/python tools/emulated_check.py --expect avx2
    qemu-x86_64 -cpu Nehalem  .venv/bin/python tools/emulated_check.py --expect baseline

Imports prefix_attn (an AVX-512 instruction anywhere on the way would end the process with
SIGILL, exit status 132), checks that the dispatcher chose the expected ISA level, and runs the
kernels forward and backward against float64 references: the cuda backend's self-check call
(bfloat16, grouped-query, causal, prefix, tails), and float32 calls on odd shapes whose error must
stay within twice PyTorch's own float32 error plus a floor. Prints one line per check; exit
status 0 when all pass. tests/test_portable.py runs it under qemu; `make qemu-check` runs more.
"""
from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--expect", help="the ISA level the dispatcher must choose")
    args = parser.parse_args()
    t0 = time.time()
    import torch

    import prefix_attn
    from prefix_attn import _ops, backends
    from prefix_attn.reference import reference_forward

    print(f"imported torch {torch.__version__} and prefix_attn in {time.time() - t0:.1f} s; "
          f"ATen capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    assert _ops.load(), _ops.why_unavailable()
    level = _ops._C._cpu_isa()
    print(f"level {level} (built: {_ops._C._cpu_isas_built()})", flush=True)
    if args.expect and level != args.expect:
        print(f"FAIL: the dispatcher chose {level}, expected {args.expect}")
        return 1
    failures = 0
    error = backends._cuda_probe(torch.device("cpu"))
    print(f"self-check call (bf16, fwd + bwd): {'ok' if error is None else 'FAIL: ' + error}", flush=True)
    failures += error is not None

    torch.manual_seed(0)
    # (B, Hq, Hkv, Nq, Nk, P, D, causal): tails on every dimension the kernels tile
    for B, Hq, Hkv, Nq, Nk, P, D, causal in [(2, 4, 2, 37, 37, 5, 24, True), (1, 2, 1, 19, 300, 33, 72, False)]:
        x = [torch.randn(*s, dtype=torch.float64) for s in
             [(B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (1, Hkv, P, D), (1, Hkv, P, D)]]
        dout = torch.randn(B, Hq, Nq, D, dtype=torch.float64)
        results = {}
        for name, dtype, fn in [("f64", torch.float64, reference_forward), ("torch32", torch.float32, reference_forward),
                                ("ours", torch.float32, None)]:
            leaves = [t.to(dtype).requires_grad_() for t in x]
            if fn is None:
                q, k, v, pk, pv = leaves  # one prefix shared by the batch: [Hkv, P, D] here
                out = prefix_attn.prefix_attention(q, k, v, pk[0], pv[0], causal=causal, backend="cpu")
            else:
                out = fn(*leaves, None, None, None, D ** -0.5, causal)[0]
            grads = torch.autograd.grad(out, leaves, dout.to(dtype))
            results[name] = [out.detach().double()] + [g.double() for g in grads]
        worst = 0.0
        for i, what in enumerate(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]):
            ref = results["f64"][i]
            ours = (results["ours"][i] - ref).abs().max().item()
            bound = 2 * (results["torch32"][i] - ref).abs().max().item() + 1e-5 * max(1.0, ref.abs().max().item())
            worst = max(worst, ours / bound)
            if not ours <= bound:
                print(f"FAIL: {what} error {ours:.3g} > bound {bound:.3g}")
                failures += 1
        print(f"float32 B{B} Hq{Hq} Hkv{Hkv} Nq{Nq} Nk{Nk} P{P} D{D} causal={causal}: worst error / bound "
              f"{worst:.2f}", flush=True)
    print(f"{'ok' if not failures else f'{failures} FAILED'} in {time.time() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
