"""What attention dropout costs prefix_attn itself: the same call with dropout_p = 0 and 0.1,
interleaved in one process, medians.

    python benchmarks/dropout_cost.py                 # B4 H12 N512 P64 D64, causal, CPU fp32
    python benchmarks/dropout_cost.py -B 2 -H 16 -N 1024 -P 128 --device cuda --dtype bf16

Prints the forward and the training step (forward + backward, every gradient) with and without
dropout, and their ratio. The mask is regenerated in the backward, so the step pays for it twice.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import attention as at, timer  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 4), ("H", 12), ("N", 512), ("P", 64), ("D", 64)):
        ap.add_argument(f"-{name}", type=int, default=default)
    ap.add_argument("--p", type=float, default=0.1, help="dropout probability compared with 0")
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(at.DTYPES))
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args(argv)
    shape = at.Shape(B=args.B, H=args.H, N=args.N, P=args.P, D=args.D, causal=args.causal)
    print(f"prefix_attn, {args.dtype} on {args.device}: {shape.name}, dropout {args.p} vs 0, {args.reps} interleaved "
          "repeats, medians")
    for mode in ("fwd", "train_step"):
        sets = at.make_inputs(shape, mode, args.device, at.DTYPES[args.dtype])
        steps = {p: at.make_step(at.ours(dataclasses.replace(shape, dropout=p)), sets, mode) for p in (0.0, args.p)}
        med = {p: statistics.median(ms) for p, ms in timer.time_interleaved(steps, args.device, warmup=2,
                                                                              reps=args.reps).items()}
        print(f"  {'forward' if mode == 'fwd' else 'training step'}: {med[0.0]:.1f} ms without, {med[args.p]:.1f} ms "
              f"with dropout: {med[args.p] / med[0.0]:.2f}x")


if __name__ == "__main__":
    main()
