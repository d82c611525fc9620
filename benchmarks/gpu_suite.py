"""GPU benchmark suite: prefix attention, ours against the incumbents, on one CUDA device.

    python3 benchmarks/gpu_suite.py [--quick] [--out benchmarks/results/<gpu>]

For fp16 and bf16, head dims 64 and 128, P in {16, 128, 512}, N in {512, 2048, 8192}, causal
and not, it times three passes:
    fwd          forward only
    bwd_prefix   backward with only the prefix trainable (the frozen-model case); the forward
                 runs untimed before each timed backward
    fwd_bwd      forward + backward with every input requiring grad
for each implementation present:
    ours-triton, ours-cuda          prefix_attn backends (reading the prefix in place)
    sdpa-cat                        expand + cat the prefix, SDPA with the boolean mask
    sdpa-cat-lower-right            the same, with causal_lower_right (lets SDPA pick flash)
    flex-cat                        FlexAttention over the concatenation with a block mask
    flash-attn-cat                  flash_attn_func over the concatenation, if installed
Times are medians of CUDA-event timings after warm-up, rotating among input sets so repeated
runs don't just measure L2. FLOPs count visible pairs only: 4 * B * Hq * D * (Nq * P + visible
sequence pairs) for the forward, 2.5x that for forward + backward, 1.5x for the backward.
Peak memory is torch.cuda.max_memory_allocated above what the inputs already hold.
Writes results.md, results.json and results.png under benchmarks/results/<gpu-name>/, and, when
the environment has OUT (the device tool's folder that comes back), under $OUT/<gpu-name>/ too.

A lent GPU gives one command at most 10 minutes, so the suite keeps to a deadline (--deadline,
epoch seconds; `make gpu-check` passes its start + 9.5 min): the tests get a share of the time
and a subprocess timeout, shapes run most important first (the issue's targets: bf16, head dim
128, causal, N = 8192), and the results are rewritten after every shape, so a run cut short
still leaves everything it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prefix_attn  # noqa: E402


def gpu_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def visible_pairs(Nq: int, Nk: int, causal: bool) -> int:
    if not causal:
        return Nq * Nk
    off = Nk - Nq
    return sum(max(0, min(Nk, i + off + 1)) for i in range(Nq))


def flops(B, H, Nq, Nk, P, D, causal) -> float:
    return 4.0 * B * H * D * (Nq * P + visible_pairs(Nq, Nk, causal))


def make_inputs(B, H, N, P, D, dtype, grads, n_sets=3):
    """Independent input sets (random, never zeros) to rotate among."""
    sets = []
    for _ in range(n_sets):
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype) for _ in range(3))
        pk, pv = (torch.randn(H, P, D, device="cuda", dtype=dtype) for _ in range(2))
        for t, name in ((q, "q"), (k, "k"), (v, "v"), (pk, "prefix"), (pv, "prefix")):
            t.requires_grad_(grads == "all" or (grads == "prefix" and name == "prefix"))
        sets.append((q, k, v, pk, pv))
    return sets


# ---------------------------------------------------------------------------------- impls


def ours(backend):
    def run(q, k, v, pk, pv, causal):
        return prefix_attn.prefix_attention(q, k, v, pk, pv, causal=causal, backend=backend)
    return run


def _cat(q, k, v, pk, pv):
    B = q.shape[0]
    K = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
    V = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
    return K, V


def _bool_mask(Nq, Nk, P, device):
    i = torch.arange(Nq, device=device)[:, None]
    j = torch.arange(Nk, device=device)[None, :]
    seq = j <= i + (Nk - Nq)
    return torch.cat([torch.ones(Nq, P, dtype=torch.bool, device=device), seq], dim=1)


def sdpa_cat(q, k, v, pk, pv, causal):
    K, V = _cat(q, k, v, pk, pv)
    mask = _bool_mask(q.shape[2], k.shape[2], pk.shape[1], q.device) if causal else None
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)


def sdpa_cat_lower_right(q, k, v, pk, pv, causal):
    # With Nq == Nk, bottom-right causal over [prefix ; sequence] is exactly our visibility.
    from torch.nn.attention.bias import causal_lower_right

    K, V = _cat(q, k, v, pk, pv)
    mask = causal_lower_right(q.shape[2], K.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask)


_flex_cache = {}


def flex_cat(q, k, v, pk, pv, causal):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _flex_cache:
        _flex_cache["fn"] = torch.compile(flex_attention, dynamic=False)
    K, V = _cat(q, k, v, pk, pv)
    Nq, Nk, P = q.shape[2], k.shape[2], pk.shape[1]
    block_mask = None
    if causal:
        key = (Nq, Nk, P)
        if key not in _flex_cache:
            off = Nk - Nq

            def visible(b, h, qi, kv):
                return (kv < P) | (kv - P <= qi + off)

            _flex_cache[key] = create_block_mask(visible, None, None, Nq, P + Nk, device=q.device)
        block_mask = _flex_cache[key]
    return _flex_cache["fn"](q, K, V, block_mask=block_mask)


def flash_attn_cat(q, k, v, pk, pv, causal):
    from flash_attn import flash_attn_func  # bottom-right causal, [B, N, H, D] layout

    K, V = _cat(q, k, v, pk, pv)
    out = flash_attn_func(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


def implementations():
    impls = {}
    available = prefix_attn.available_backends()
    for backend in ("triton", "cuda"):
        if backend in available:
            impls[f"ours-{backend}"] = ours(backend)
    impls["sdpa-cat"] = sdpa_cat
    impls["sdpa-cat-lower-right"] = sdpa_cat_lower_right
    impls["flex-cat"] = flex_cat
    try:
        import flash_attn  # noqa: F401

        impls["flash-attn-cat"] = flash_attn_cat
    except ImportError:
        pass
    return impls


# ---------------------------------------------------------------------------------- timing


def time_pass(fn, sets, causal, mode, warmup=3, reps=15):
    """Median ms of one pass (CUDA events), rotating among input sets."""
    grads = [torch.randn_like(s[0]) for s in sets]

    def once(i, timed):
        q, k, v, pk, pv = sets[i % len(sets)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if mode == "fwd":
            with torch.no_grad():
                start.record()
                fn(q, k, v, pk, pv, causal)
                end.record()
        elif mode == "bwd_prefix":
            out = fn(q, k, v, pk, pv, causal)
            start.record()
            out.backward(grads[i % len(sets)])
            end.record()
        else:
            start.record()
            fn(q, k, v, pk, pv, causal).backward(grads[i % len(sets)])
            end.record()
        for t in (q, k, v, pk, pv):
            t.grad = None
        if timed:
            end.synchronize()
            return start.elapsed_time(end)
        return None

    for i in range(warmup):
        once(i, False)
    torch.cuda.synchronize()
    times = [once(i, True) for i in range(reps)]
    ms = statistics.median(times)
    if not ms > 0:
        raise RuntimeError(f"non-positive time {ms} ms: the measurement is broken")
    return ms


def peak_extra_mb(fn, sets, causal, mode):
    q, k, v, pk, pv = sets[0]
    g = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    if mode == "fwd":
        with torch.no_grad():
            out = fn(q, k, v, pk, pv, causal)
    else:
        fn(q, k, v, pk, pv, causal).backward(g)
        out = None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in (q, k, v, pk, pv):
        t.grad = None
    del out
    return peak / 2**20


# The kernel tests (they run every backend present, on CUDA for triton / cuda); the HF
# integration tests run on CPU and are CI's business.
GPU_TESTS = ["test_correctness.py", "test_triton.py", "test_api.py", "test_determinism.py", "test_ops.py"]


def run_tests(out_dir: str, timeout_s: float) -> int:
    """The kernel tests on CUDA, logged to out_dir/tests.log. 124 when they ran out of time."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    cmd += [os.path.join(ROOT, "tests", t) for t in GPU_TESTS]
    print("$", " ".join(cmd), f"(timeout {timeout_s:.0f} s)", flush=True)
    with open(os.path.join(out_dir, "tests.log"), "w") as log:
        try:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            rc = 124
    with open(os.path.join(out_dir, "tests.log")) as log:
        tail = log.read()[-3000:]
    print(tail, flush=True)
    return rc


def ordered_shapes(quick: bool):
    """(dtype, D, P, N), the issue's target shapes first, then the rest of the grid."""
    if quick:
        return [("bf16", 128, 128, 8192), ("fp16", 64, 128, 2048)]
    grid = [(dt, D, P, N) for dt in ("bf16", "fp16") for D in (128, 64) for N in (8192, 2048, 512)
            for P in (128, 512, 16)]
    return grid


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu-name>)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="epoch seconds by which to be done (default: now + 9 minutes)")
    ap.add_argument("--test-share", type=float, default=0.35, help="share of the time left that the tests may use")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device: this suite needs a GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    deadline = args.deadline or time.time() + 540

    out_dirs = [args.out or os.path.join(ROOT, "benchmarks", "results", gpu_slug())]
    if os.environ.get("OUT"):
        out_dirs.append(os.path.join(os.environ["OUT"], gpu_slug()))
    for d in out_dirs:
        os.makedirs(d, exist_ok=True)

    test_rc = 0 if args.skip_tests else run_tests(out_dirs[-1], (deadline - time.time()) * args.test_share)
    if test_rc == 124:
        print("gpu_suite: the tests ran out of their share of the time (see tests.log)", flush=True)

    impls = implementations()
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=_version("triton"), cuda=torch.version.cuda, date=datetime.date.today().isoformat(),
                commit=_git_commit(), host=platform.node(), tests_rc=test_rc, complete=False)
    rows = []
    shapes = ordered_shapes(args.quick)
    for n_done, (dname, D, P, N) in enumerate(shapes):
        if time.time() > deadline - 20:
            print(f"gpu_suite: deadline reached after {n_done} of {len(shapes)} shapes", flush=True)
            break
        dtype = dtypes[dname]
        H = 16 if D == 64 else 8
        B = max(1, 16384 // N)
        for causal in (True, False):
            fl = flops(B, H, N, N, P, D, causal)
            for mode in ("fwd", "bwd_prefix", "fwd_bwd"):
                grads = {"fwd": "none", "bwd_prefix": "prefix", "fwd_bwd": "all"}[mode]
                sets = make_inputs(B, H, N, P, D, dtype, grads)
                ref = None
                for name, fn in impls.items():
                    row = dict(dtype=dname, B=B, H=H, N=N, P=P, D=D, causal=causal, mode=mode, impl=name)
                    try:
                        with torch.no_grad():
                            o = fn(*[t.detach() for t in sets[0]], causal).float()
                        if ref is None and name.startswith("sdpa-cat"):
                            ref = o
                        ms = time_pass(fn, sets, causal, mode)
                        mult = {"fwd": 1.0, "bwd_prefix": 1.5, "fwd_bwd": 2.5}[mode]
                        row.update(ms=ms, tflops=fl * mult / ms / 1e9,
                                   peak_mb=peak_extra_mb(fn, sets, causal, mode))
                        row["_out"] = o
                    except Exception as exc:  # an incumbent that cannot run this shape
                        row.update(error=f"{type(exc).__name__}: {str(exc)[:120]}")
                    rows.append(row)
                for row in rows[-len(impls):]:
                    o = row.pop("_out", None)
                    if o is not None and ref is not None:
                        row["max_abs_diff_vs_sdpa"] = float((o - ref).abs().max())
                del sets
                torch.cuda.empty_cache()
        print(f"{dname} D{D} P{P} N{N} done ({time.time() - deadline:+.0f} s to the deadline)", flush=True)
        meta["complete"] = n_done + 1 == len(shapes)
        save(out_dirs, meta, rows)
    md = save(out_dirs, meta, rows)
    print(md[-6000:])
    return 0 if test_rc == 0 else 1


def save(out_dirs, meta, rows) -> str:
    """Ratios against the best incumbent, then results.json / .md / .png in every folder."""
    def key(r):
        return (r["dtype"], r["N"], r["P"], r["D"], r["causal"], r["mode"])

    best = {}
    for r in rows:
        if "ms" in r and not r["impl"].startswith("ours"):
            best[key(r)] = min(best.get(key(r), math.inf), r["ms"])
    for r in rows:
        if "ms" in r and key(r) in best:
            r["speedup_vs_best_incumbent"] = best[key(r)] / r["ms"]
    md = _markdown(meta, rows)
    for d in out_dirs:
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(d, "results.md"), "w") as f:
            f.write(md)
        _plot(rows, os.path.join(d, "results.png"), meta["gpu"])
    return md


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return None


def _markdown(meta, rows):
    lines = [f"# prefix_attn on {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}, "
             f"commit {meta['commit']}; tests exit code {meta['tests_rc']}"
             + ("" if meta.get("complete", True) else "; INCOMPLETE: the run hit its deadline"), "",
             "| dtype | N | P | D | causal | pass | impl | ms | TFLOP/s | peak MB | speedup vs best incumbent |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "ms" in r:
            lines.append(f"| {r['dtype']} | {r['N']} | {r['P']} | {r['D']} | {r['causal']} | {r['mode']} | "
                         f"{r['impl']} | {r['ms']:.3f} | {r['tflops']:.1f} | {r['peak_mb']:.0f} | "
                         f"{r.get('speedup_vs_best_incumbent', float('nan')):.2f} |")
        else:
            lines.append(f"| {r['dtype']} | {r['N']} | {r['P']} | {r['D']} | {r['causal']} | {r['mode']} | "
                         f"{r['impl']} | - | - | - | {r['error']} |")
    return "\n".join(lines) + "\n"


def _plot(rows, path, gpu):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, mode in zip(axes, ("fwd", "bwd_prefix", "fwd_bwd")):
        sel = [r for r in rows if r["mode"] == mode and r["causal"] and r["dtype"] == "bf16" and "ms" in r]
        for impl in sorted({r["impl"] for r in sel}):
            pts = sorted((r["N"] * 1000 + r["P"] + r["D"] / 1000, r["tflops"]) for r in sel if r["impl"] == impl)
            ax.plot(range(len(pts)), [p[1] for p in pts], marker="o", label=impl)
        ax.set_title(f"{mode}, causal, bf16")
        ax.set_xlabel("shape (N, P, D ascending)")
        ax.set_ylabel("TFLOP/s (visible pairs)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"prefix_attn vs concatenation on {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
