"""`make demo`: prefix_attn vs cat + SDPA on a few shapes, in about a minute on 2 CPU cores.

For each row: is the result the same (max abs difference over the output and all gradients,
and a pass/fail against a dtype tolerance), how fast (median of interleaved runs), and how
much memory one call needs on top of its inputs (see harness/memory.py). Then which backend
`backend="auto"` picked. Exits 1 when a result is wrong.

    python benchmarks/demo.py [--backend auto|cpu|reference|...] [--device cpu|cuda] [--no-memory]

The passes (harness/attention.py): `fwd`; `train_step`, forward + backward with every gradient,
which is the prefix-tuning step of every layer above the first (the model is frozen, but the
prefix gradients of the layers below flow through that layer's q, k and v, so it needs dq, dk
and dv); `prefix_only_bwd`, the backward alone with only the prefix's gradient, which is the
first layer's case (its q, k, v come from frozen embeddings).

The full sweep, with JSON and a plot, is benchmarks/bench_attention.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba  # noqa: E402
from harness import attention as at, provenance, report  # noqa: E402

# (shape, pass, what it stands for)
DEMO_ROWS = [
    (at.Shape(B=4, H=12, N=512, P=64, D=64, causal=True), "fwd", "inference, 12-head model"),
    (at.Shape(B=4, H=12, N=512, P=64, D=64, causal=True), "train_step",
     "prefix-tuning step, every layer above the first"),
    (at.Shape(B=2, H=16, N=1024, P=128, D=64, causal=True), "prefix_only_bwd",
     "prefix tuning, first layer (backward alone)"),
    (at.Shape(B=1, H=8, N=2048, P=32, D=128, causal=False), "fwd", "long sequence, non-causal"),
]

# Largest acceptable |ours - cat+SDPA|, relative to the largest |value| of the same tensor.
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(at.DTYPES))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns (faster)")
    args = ap.parse_args(argv)

    env = provenance.environment(args.device, args.backend)
    print(f"prefix_attn {env['versions']['prefix_attn']} on {provenance.describe(env)}, {args.dtype}")
    print(f"backends available: {', '.join(env['available_backends'])}; backend={args.backend!r} runs: "
          f"{env['backend_used']}")
    if env["backend_used"] == "reference":
        print("note: the reference backend is plain PyTorch (it concatenates, like the incumbent); "
              "build the extension (make install) for the fused kernels")
    print("cat+SDPA = expand + torch.cat the prefix, F.scaled_dot_product_attention with the "
          "equivalent mask (what HF PEFT does)")
    tol = REL_TOL[at.DTYPES[args.dtype]]
    rows, t0 = [], time.perf_counter()
    for shape, mode, what in DEMO_ROWS:
        row = ba.bench_one(shape, mode, backend=args.backend, device=args.device, dtype=args.dtype, warmup=1,
                           min_reps=3, max_reps=20, budget_s=1.5, memory=not args.no_memory)
        rows.append(dict(row, use=what, ok=row["max_rel_diff"] <= tol))
        print(f"  ... {shape.name} {mode} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    c = report.cell
    columns = [("shape (B,H,N,P,D)", lambda r: f"{r['B']},{r['H']},{r['N']},{r['P']},{r['D']}"),
               ("causal", lambda r: "yes" if r["causal"] else "no"), ("pass", lambda r: r["mode"]),
               ("use case", lambda r: r["use"]), ("ours ms", lambda r: c(r["ours_ms"], ".1f")),
               ("cat+SDPA ms", lambda r: c(r["incumbent_ms"], ".1f")), ("speedup", lambda r: f"{r['speedup']:.2f}x")]
    if not args.no_memory:
        columns += [("ours MB", lambda r: c(r.get("ours_mem_mb"), ".1f")),
                    ("cat+SDPA MB", lambda r: c(r.get("incumbent_mem_mb"), ".1f")),
                    ("mem ratio", lambda r: c(r.get("mem_ratio"), ".2f") + "x")]
    columns += [("max abs diff", lambda r: c(r["max_abs_diff"], ".1e")), ("same?", lambda r: "yes" if r["ok"] else "NO")]
    print("\n" + report.markdown_table(rows, columns))
    print("\nspeedup = cat+SDPA ms / ours ms (median of interleaved runs); MB = peak extra memory of one\n"
          "whole step (forward included) beyond its inputs; mem ratio = cat+SDPA MB / ours MB; max abs\n"
          f"diff over the output and every gradient computed; same? = within {tol:g} x the largest value\n"
          "of that tensor.\n"
          "train_step = forward + backward with every gradient: in prefix tuning, every layer above the\n"
          "first needs dq, dk, dv too, since the prefixes below get their gradient through them.\n"
          "prefix_only_bwd = the backward alone (forward untimed), prefix gradient only: the first layer.")
    busiest = max((r.get("background_cpu") or 0.0) for r in rows)
    if busiest > 0.2:
        print(f"note: other processes were using up to {busiest:.1f} cores during the demo; the timings are noisy")
    if not all(r["ok"] for r in rows):
        print("\nFAIL: prefix_attn disagrees with cat+SDPA beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
