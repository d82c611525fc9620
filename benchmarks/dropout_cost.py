"""What attention dropout costs prefix_attn itself: the same call with dropout_p = 0 and 0.1,
interleaved in one process, medians.

    python benchmarks/dropout_cost.py                 # B4 H12 N512 P64 D64, causal, CPU fp32
    python benchmarks/dropout_cost.py -B 2 -H 16 -N 1024 -P 128 --device cuda --dtype bf16

Prints the forward and the training step (forward + backward, every gradient) with and without
dropout, and their ratio. The mask is regenerated in the backward, so the step pays for it twice.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import prefix_attn


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-B", type=int, default=4)
    ap.add_argument("-H", type=int, default=12)
    ap.add_argument("-N", type=int, default=512)
    ap.add_argument("-P", type=int, default=64)
    ap.add_argument("-D", type=int, default=64)
    ap.add_argument("--p", type=float, default=0.1, help="dropout probability compared with 0")
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dtype).requires_grad_()

    q, k, v = randn(args.B, args.H, args.N, args.D), randn(args.B, args.H, args.N, args.D), randn(args.B, args.H, args.N, args.D)
    pk, pv = randn(args.H, args.P, args.D), randn(args.H, args.P, args.D)
    grad = torch.randn(args.B, args.H, args.N, args.D, generator=gen).to(dev, dtype)

    def step(p: float, train: bool) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.set_grad_enabled(train):
            out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=args.causal, dropout_p=p)
            if train:
                out.backward(grad)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    print(f"prefix_attn {prefix_attn.select_backend(q)} backend, {args.dtype} on {dev}: B{args.B} H{args.H} "
          f"N{args.N} P{args.P} D{args.D}{' causal' if args.causal else ''}, dropout {args.p} vs 0, "
          f"{args.reps} interleaved repeats, medians")
    for train in (False, True):
        times = {0.0: [], args.p: []}
        for _ in range(2):  # warm-up
            for p in times:
                step(p, train)
        for _ in range(args.reps):
            for p in times:
                times[p].append(step(p, train))
        med = {p: statistics.median(ts) * 1e3 for p, ts in times.items()}
        print(f"  {'training step' if train else 'forward'}: {med[0.0]:.1f} ms without, {med[args.p]:.1f} ms with "
              f"dropout: {med[args.p] / med[0.0]:.2f}x")


if __name__ == "__main__":
    main()
