"""`make demo`: prefix_attn vs cat + SDPA on a few shapes, in about a minute on 2 CPU cores.

For each row: is the result the same (max abs difference over the output and all gradients,
and a pass/fail against a dtype tolerance), how fast (median of interleaved runs), and how
much memory one call needs on top of its inputs (see memory.py). Then which backend
`backend="auto"` picked. Exits 1 when a result is wrong.

    python benchmarks/demo.py [--backend auto|cpu|reference|...] [--device cpu|cuda] [--no-memory]

The passes (bench_common.py): `fwd`; `train_step`, forward + backward with every gradient,
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

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import bench_attention as ba  # noqa: E402

# (config, pass, what it stands for)
DEMO_ROWS = [
    (ba.Config(B=4, H=12, N=512, P=64, D=64, causal=True), "fwd", "inference, 12-head model"),
    (ba.Config(B=4, H=12, N=512, P=64, D=64, causal=True), "train_step",
     "prefix-tuning step, every layer above the first"),
    (ba.Config(B=2, H=16, N=1024, P=128, D=64, causal=True), "prefix_only_bwd",
     "prefix tuning, first layer (backward alone)"),
    (ba.Config(B=1, H=8, N=2048, P=32, D=128, causal=False), "fwd", "long sequence, non-causal"),
]

# Largest acceptable |ours - cat+SDPA|, relative to the largest |value| of the same tensor.
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(ba.DTYPES))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory columns (faster)")
    args = ap.parse_args(argv)

    import prefix_attn

    device, dtype = torch.device(args.device), ba.DTYPES[args.dtype]
    hw = ba.hardware_info(device)
    pkg = ba.package_info(device, args.backend)
    print(f"prefix_attn {pkg['version']} on {hw.get('gpu') or hw['cpu_model']} "
          f"({hw['cpu_cores']} cores), torch {hw['torch']}, {args.dtype}")
    print(f"backends available: {', '.join(pkg['available_backends'])}; "
          f"backend={args.backend!r} runs: {pkg['backend_used']}")
    if pkg["backend_used"] == "reference":
        print("note: the reference backend is plain PyTorch (it concatenates, like the incumbent); "
              "build the extension (make install) for the fused kernels")
    print("cat+SDPA = expand + torch.cat the prefix, F.scaled_dot_product_attention with the "
          "equivalent mask (what HF PEFT does)")

    head = ["shape (B,H,N,P,D)", "causal", "pass", "use case", "ours ms", "cat+SDPA ms", "speedup"]
    if not args.no_memory:
        head += ["ours MB", "cat+SDPA MB", "mem ratio"]
    head += ["max abs diff", "same?"]
    table, all_ok, busiest = [], True, 0.0
    t0 = time.perf_counter()
    for cfg, mode, what in DEMO_ROWS:
        row = ba.bench_one(cfg, mode, backend=args.backend, device=device, dtype=dtype,
                           warmup=1, min_reps=3, max_reps=20, budget_s=1.5,
                           measure_memory=not args.no_memory)
        ok = row["max_rel_diff"] <= REL_TOL[dtype]
        busiest = max(busiest, row.get("background_cpu") or 0.0)
        all_ok &= ok
        cells = [f"{cfg.B},{cfg.H},{cfg.N},{cfg.P},{cfg.D}", "yes" if cfg.causal else "no", mode, what,
                 f"{row['ours_ms']:.1f}", f"{row['incumbent_ms']:.1f}", f"{row['speedup']:.2f}x"]
        if not args.no_memory:
            cells += [f"{row['ours_mem_mb']:.1f}", f"{row['incumbent_mem_mb']:.1f}", f"{row['mem_ratio']:.2f}x"]
        cells += [f"{row['max_abs_diff']:.1e}", "yes" if ok else "NO"]
        table.append(cells)
        print(f"  ... {cfg.name} {mode} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)

    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(head)]
    right = {i for i, h in enumerate(head) if h.endswith(("ms", "MB", "speedup", "ratio", "diff"))}

    def fmt(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    print()
    print(fmt(head))
    print("|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2))
                         for i, w in enumerate(widths)) + "|")
    for cells in table:
        print(fmt(cells))
    print("\nspeedup = cat+SDPA ms / ours ms (median of interleaved runs); MB = peak extra memory of one\n"
          "whole step (forward included) beyond its inputs; mem ratio = cat+SDPA MB / ours MB; max abs\n"
          "diff over the output and every gradient computed; same? = within "
          f"{REL_TOL[dtype]:g} x the largest value\nof that tensor.\n"
          "train_step = forward + backward with every gradient: in prefix tuning, every layer above the\n"
          "first needs dq, dk, dv too, since the prefixes below get their gradient through them.\n"
          "prefix_only_bwd = the backward alone (forward untimed), prefix gradient only: the first layer.")
    if busiest > 0.2:
        print(f"note: other processes were using up to {busiest:.1f} cores during the demo; "
              "the timings are noisy")
    if not all_ok:
        print("\nFAIL: prefix_attn disagrees with cat+SDPA beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
