"""GPU benchmark suite: prefix attention, ours against the incumbents, on one CUDA device.

    python3 benchmarks/gpu_suite.py [--quick] [--out benchmarks/results/<gpu>] [--incumbents NAME ...]

The cases (bench_common.gpu_cases, most important first): the issue's targets (bf16, head dim
128, N = 8192, P in {128, 512, 16}), a decoding step (Nq = 1, B = 64, a 4096-token cache,
P = 128, 32 query / 8 KV heads), a grouped-heads training shape (32 / 8 heads, N = 4096), then
the grid: fp16 and bf16, head dims 64 and 128, P in {16, 128, 512}, N in {512, 2048, 8192}.
Each runs causal, then non-causal (decoding: causal only, where it changes nothing), for
the passes of bench_common:
    fwd              forward only
    train_step       forward + backward, every input requiring grad: the prefix-tuning step of
                     every layer above the first (and of full fine-tuning)
    prefix_only_bwd  the backward alone, only the prefix trainable: the first layer's case;
                     the forward runs untimed before each timed backward
(decoding: fwd only) for each implementation present:
    ours-triton, ours-cuda   prefix_attn backends (reading the prefix in place)
    the incumbents of bench_common.INCUMBENTS that stand for the case: sdpa-cat (HF PEFT),
    sdpa-cat-lower-right, sdpa-cat-gqa (grouped heads), flex-cat (compiled per shape),
    flash-attn-cat (if installed); for decoding sdpa-cache and flex-cache, whose cache already
    holds the prefix (built untimed).
Times are medians of CUDA-event timings after warm-up, rotating among input sets so repeated
runs don't just measure L2. Each implementation's masks, block masks and compiled wrapper are
built once per shape, and its first call in each pass (which compiles what is compiled) is
timed apart: `first call s`. FLOPs and the bytes floor are bench_common's (visible pairs only;
train_step 3.5x the forward; prefix_only_bwd only its P prefix columns, 8 * B * Hq * Nq * P * D),
reported as TFLOP/s and as GB/s against the bytes floor.
A compiled incumbent that fails to compile, or runs eagerly after all, is flagged `fell_back`
(table: FELL BACK) and never counts as the best incumbent.
Peak memory is torch.cuda.max_memory_allocated above what the inputs already hold, over a
whole step (forward and backward).
Writes results.md, results.json and results.png (each with the project's commit) under
benchmarks/results/<gpu-name>/ (--out), and into --mirror DIR too (default $PREFIX_ATTN_MIRROR).

A lent GPU gives one command at most 10 minutes, so the suite keeps to a deadline (--deadline,
epoch seconds; `make gpu-check`, tools/gpu_check.sh, passes its start + 7.5 min and runs the test
tier itself first; run alone, the suite runs that tier with a share of the time), cases run most
important first, a pass starts only while there is time left (a compiled incumbent only with a
minute left), and the results are rewritten after every case, so a run cut short still leaves
everything it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_common as bc  # noqa: E402
import prefix_attn  # noqa: E402

# Where the suite runs and which of our backends it times. Only a CPU smoke test, with
# torch.cuda's timing and memory calls faked, sets them otherwise (tests/test_bench_common.py).
DEVICE = "cuda"
OURS_BACKENDS = ("triton", "cuda")


def gpu_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def make_inputs(shape: bc.Shape, dtype, mode: str, n_sets: int = 3):
    """Independent input sets (random, never zeros) to rotate among: (q, k, v, prefix_k, prefix_v)."""
    trainable = bc.TRAINABLE[mode]
    sets = []
    for _ in range(n_sets):
        q = torch.randn(shape.B, shape.H, shape.N, shape.D, device=DEVICE, dtype=dtype)
        k, v = (torch.randn(shape.B, shape.hkv, shape.nk, shape.D, device=DEVICE, dtype=dtype) for _ in range(2))
        pk, pv = (torch.randn(shape.hkv, shape.P, shape.D, device=DEVICE, dtype=dtype) for _ in range(2))
        for t, name in ((q, "q"), (k, "k"), (v, "v"), (pk, "prefix_k"), (pv, "prefix_v")):
            t.requires_grad_(name in trainable)
        sets.append((q, k, v, pk, pv))
    return sets


# ---------------------------------------------------------------------------------- impls


def implementations(shape: bc.Shape, kind: str, names=None) -> dict:
    """{name: (Incumbent or None for ours, build(shape, device) -> fn(q, k, v, prefix_k, prefix_v))}."""
    impls = {}
    available = prefix_attn.available_backends()
    for backend in OURS_BACKENDS:
        if backend in available:
            impls[f"ours-{backend}"] = (None, lambda s, dev, b=backend: bc.ours(s, b))
    for inc in bc.incumbents_for(shape, kind, names):
        impls[inc.name] = (inc, inc.build)
    return impls


# ---------------------------------------------------------------------------------- timing


def _step(fn, inputs, mode, grad):
    """One call in pass `mode`; returns the output."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(*inputs)
    out = fn(*inputs)
    out.backward(grad)
    return out


def _clear_grads(inputs):
    for t in inputs:
        if t is not None:
            t.grad = None


def first_call(fn, inputs, mode):
    """Seconds of the first call (what is compiled compiles here), and its output."""
    grad = torch.randn_like(inputs[0])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = _step(fn, inputs, mode, grad)
    torch.cuda.synchronize()
    s = time.perf_counter() - t0
    _clear_grads(inputs)
    return s, out.detach().float()


def time_pass(fn, sets, mode, warmup=3, reps=15):
    """Median ms of one pass (CUDA events), rotating among input sets."""
    grads = [torch.randn_like(s[0]) for s in sets]

    def once(i, timed):
        inputs = sets[i % len(sets)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if mode == "fwd":
            with torch.no_grad():
                start.record()
                fn(*inputs)
                end.record()
        elif mode == "prefix_only_bwd":
            out = fn(*inputs)
            start.record()
            out.backward(grads[i % len(sets)])
            end.record()
        else:
            start.record()
            fn(*inputs).backward(grads[i % len(sets)])
            end.record()
        _clear_grads(inputs)
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


def peak_extra_mb(fn, sets, mode):
    """Peak memory of one whole step (forward, and backward where the pass has one)."""
    inputs = sets[0]
    g = torch.randn_like(inputs[0])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = _step(fn, inputs, mode, g)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _clear_grads(inputs)
    del out
    return peak / 2**20


# Keys a fell-back row's numbers move to, so that nothing reading "ms" counts it as measured.
FALLBACK_KEYS = ("ms", "tflops", "gbps")


def measure(inc, fn, shape, sets, mode, setup_s=0.0) -> dict:
    """Everything one (implementation, shape, pass) row holds, with `_out` for the accuracy check."""
    eager_before = bc.eager_calls()
    if inc is not None and inc.prepare_inputs is not None:
        with torch.no_grad():
            sets = [inc.prepare_inputs(*s) for s in sets]
    first_s, out = first_call(fn, sets[0], mode)
    ms = time_pass(fn, sets, mode)
    e = bc.elem_bytes(sets[0][0].dtype)
    row = dict(ms=ms, tflops=bc.flops(shape, mode) / ms / 1e9, gbps=bc.bytes_floor(shape, mode, e) / ms / 1e6,
               peak_mb=peak_extra_mb(fn, sets, mode), first_call_s=setup_s + first_s, _out=out)
    if inc is not None and inc.compiled and bc.eager_calls() > eager_before:
        row["fell_back"] = "ran eagerly, not compiled"
        for k in FALLBACK_KEYS:
            row["fallback_" + k] = row.pop(k)
    return row


def shape_fields(case: bc.GpuCase, shape: bc.Shape) -> dict:
    return dict(case=case.label, dtype=case.dtype, B=shape.B, H=shape.H, Hkv=shape.hkv, N=shape.N, Nk=shape.nk,
                P=shape.P, D=shape.D, causal=shape.causal)


# A compiled incumbent starts only with this much time left before the deadline (its compile
# alone can take tens of seconds).
COMPILE_MARGIN_S = 60.0


def run_case(case: bc.GpuCase, rows: list, deadline: float, names=None) -> bool:
    """Every shape, pass and implementation of one case, appended to rows. False when the
    deadline cut it short."""
    dtype = bc.DTYPES[case.dtype]
    for shape in case.shapes():
        impls = implementations(shape, case.kind, names)
        built = {}  # name -> (fn or exception, set-up seconds): once per shape
        for mode in case.passes:
            if time.time() > deadline - 20:
                return False
            sets = make_inputs(shape, dtype, mode)
            ref = None
            group = []
            for name, (inc, build) in impls.items():
                row = dict(shape_fields(case, shape), mode=mode, impl=name)
                compiled = inc is not None and inc.compiled
                if compiled and time.time() > deadline - COMPILE_MARGIN_S:
                    row.update(error="not run: too close to the deadline to compile", fell_back="not compiled")
                    group.append(row)
                    continue
                setup_s = 0.0
                try:
                    if name not in built:
                        t0 = time.perf_counter()
                        built[name] = (build(shape, torch.device(DEVICE)), time.perf_counter() - t0)
                        setup_s = built[name][1]
                    row.update(measure(inc, built[name][0], shape, sets, mode, setup_s))
                    if ref is None and name.startswith("sdpa"):
                        ref = row["_out"]
                except Exception as exc:  # an incumbent that cannot run this shape
                    msg = (str(exc).strip().splitlines() or [""])[0]
                    row.update(error=f"{type(exc).__name__}: {msg[:200]}")
                    if compiled:
                        row["fell_back"] = "compile failed"
                group.append(row)
            for row in group:
                o = row.pop("_out", None)
                if o is not None and ref is not None:
                    row["max_abs_diff_vs_sdpa"] = float((o - ref).abs().max())
            rows.extend(group)
            del sets, group, ref
            torch.cuda.empty_cache()
    return True


def run_tests(out_dirs, timeout_s: float) -> int:
    """The GPU test tier (`pytest -m gpu_tier` on the GPU backends), as `make gpu-check` runs it:
    tools/gpu_check.sh --tier-only, so the command lives in one place. Writes tests.log in every
    folder; returns pytest's status (124: out of time)."""
    cmd = ["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--tier-only", "--out", out_dirs[0],
           "--tier-timeout", str(max(int(timeout_s), 10))]
    if len(out_dirs) > 1:
        cmd += ["--mirror", out_dirs[1]]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, GPU_PYTHON=sys.executable))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--skip-tests", action="store_true", help="no test tier (make gpu-check runs it before)")
    ap.add_argument("--tests-rc", type=int, default=None,
                    help="with --skip-tests: the exit status of the tier run before, recorded in the results")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu-name>)")
    ap.add_argument("--mirror", default=os.environ.get("PREFIX_ATTN_MIRROR") or None,
                    help="also write every result file into this folder, flat (default $PREFIX_ATTN_MIRROR; "
                         "make gpu-check passes the device tool's $OUT)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="epoch seconds by which to be done (default: now + 9 minutes)")
    ap.add_argument("--test-share", type=float, default=0.35, help="share of the time left that the tests may use")
    ap.add_argument("--incumbents", nargs="+", default=None, choices=list(bc.INCUMBENTS),
                    help="only these incumbents (default: every one that stands for the case)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device: this suite needs a GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    deadline = args.deadline or time.time() + 540

    out_dirs = [args.out or os.path.join(ROOT, "benchmarks", "results", gpu_slug())]
    if args.mirror and os.path.abspath(args.mirror) != os.path.abspath(out_dirs[0]):
        out_dirs.append(args.mirror)
    for d in out_dirs:
        os.makedirs(d, exist_ok=True)

    test_rc = args.tests_rc if args.skip_tests else run_tests(out_dirs, (deadline - time.time()) * args.test_share)
    if test_rc == 124:
        print("gpu_suite: the tests ran out of their share of the time (see tests.log)", flush=True)

    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                triton=_version("triton"), cuda=torch.version.cuda, date=datetime.date.today().isoformat(),
                commit=_git_commit(), host=platform.node(), tests_rc=test_rc, complete=False)
    meta.update(passes=dict(bc.PASS_LABELS), flops_convention=bc.FLOPS_CONVENTION, bytes_floor=bc.BYTES_CONVENTION,
                incumbents={n: i.what for n, i in bc.INCUMBENTS.items()}, dynamo=bc.configure_dynamo())
    rows = []
    save(out_dirs, meta, rows)  # the files exist, with the commit, even if the first case overruns
    cases = bc.gpu_cases(args.quick)
    for n_done, case in enumerate(cases):
        if time.time() > deadline - 20:
            print(f"gpu_suite: deadline reached after {n_done} of {len(cases)} cases", flush=True)
            break
        finished = run_case(case, rows, deadline, args.incumbents)
        s = case.shape
        print(f"{case.label} {case.dtype} B{s.B} H{s.H}/{s.hkv} N{s.N} Nk{s.nk} P{s.P} D{s.D} "
              f"{'done' if finished else 'cut short'} ({time.time() - deadline:+.0f} s to the deadline)", flush=True)
        meta["complete"] = finished and n_done + 1 == len(cases)
        bc.add_speedups(rows)
        save(out_dirs, meta, rows)
        if not finished:
            print(f"gpu_suite: deadline reached during case {n_done + 1} of {len(cases)}", flush=True)
            break
    bc.add_speedups(rows)
    md = save(out_dirs, meta, rows)
    print(md[-6000:])
    return 0 if args.skip_tests or test_rc == 0 else 1  # with --skip-tests, only the suite's own failures


def save(out_dirs, meta, rows) -> str:
    """results.json / .md / .png, each with the commit, in every folder (the ratios against the best
    incumbent are bc.add_speedups's, computed before)."""
    meta["tuned_configs"] = _tuned_configs()
    md = _markdown(meta, rows)
    for d in out_dirs:
        with open(os.path.join(d, "results.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(d, "results.md"), "w") as f:
            f.write(md)
        _plot(rows, os.path.join(d, "results.png"), f"{meta['gpu']}, commit {meta['commit']}")
    return md


def _tuned_configs():
    """The tile configs Triton's autotuner picked in this process, per kernel and key: the numbers
    to commit as the defaults in prefix_attn/triton_backend/configs.py."""
    try:
        from prefix_attn.triton_backend import tuning
    except Exception:  # noqa: BLE001 - no triton here: nothing was tuned
        return []
    return tuning.tuned_configs()


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _git_commit():
    """The project's commit, also without .git (tools/project_commit.py: $PREFIX_ATTN_COMMIT, this
    project's own git, the .commit stamp, else "unknown")."""
    try:
        return subprocess.check_output([sys.executable, os.path.join(ROOT, "tools", "project_commit.py")],
                                       text=True).strip()
    except Exception:
        return "unknown"


def _markdown(meta, rows):
    lines = [f"# prefix_attn on {meta['gpu']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}, "
             f"commit {meta['commit']}; tests exit code {meta['tests_rc']}"
             + ("" if meta.get("complete", True) else "; INCOMPLETE: the run hit its deadline"), "",
             "Passes: " + "; ".join(f"`{k}` {v}" for k, v in meta.get("passes", bc.PASS_LABELS).items()) + ".",
             f"FLOPs: {meta.get('flops_convention', bc.FLOPS_CONVENTION)}. GB/s: the bytes floor "
             f"({meta.get('bytes_floor', bc.BYTES_CONVENTION)}) over the time. first call s: set-up and first call, "
             "compile included, not in ms. FELL BACK: a compiled incumbent that did not run compiled; never the "
             "best incumbent.", "",
             "| case | dtype | B | Hq/Hkv | Nq | Nk | P | D | causal | pass | impl | ms | TFLOP/s | GB/s | peak MB "
             "| first call s | speedup vs best incumbent |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        head = (f"| {r.get('case', '-')} | {r['dtype']} | {r['B']} | {r['H']}/{r.get('Hkv', r['H'])} | {r['N']} "
                f"| {r.get('Nk', r['N'])} | {r['P']} | {r['D']} | {r['causal']} | {r['mode']} | {r['impl']} |")
        if "ms" in r:
            lines.append(head + f" {r['ms']:.3f} | {r['tflops']:.1f} | {r['gbps']:.0f} | {r['peak_mb']:.0f} "
                                f"| {r['first_call_s']:.2f} | {r.get('speedup_vs_best_incumbent', float('nan')):.2f} |")
        elif "fallback_ms" in r:
            lines.append(head + f" FELL BACK ({r['fell_back']}): {r['fallback_ms']:.3f} | "
                                f"{r['fallback_tflops']:.1f} | {r['fallback_gbps']:.0f} | {r['peak_mb']:.0f} "
                                f"| {r['first_call_s']:.2f} | - |")
        else:
            flag = f"FELL BACK ({r['fell_back']}): " if r.get("fell_back") else ""
            lines.append(head + f" - | - | - | - | - | {flag}{r.get('error', '')} |")
    tuned = meta.get("tuned_configs") or []
    lines += ["", "## Tile configs the autotuner picked", ""]
    lines += [f"- {t}" for t in tuned] or ["(none: autotuning off, or no Triton kernel ran)"]
    return "\n".join(lines) + "\n"


def _plot(rows, path, gpu):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    # prefix_only_bwd does little arithmetic per byte: GB/s against its floor says more
    panels = (("fwd", "tflops", "TFLOP/s (visible pairs)"), ("train_step", "tflops", "TFLOP/s (visible pairs)"),
              ("prefix_only_bwd", "gbps", "GB/s (bytes floor)"))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (mode, key, ylabel) in zip(axes, panels):
        sel = [r for r in rows if r["mode"] == mode and r["causal"] and r["dtype"] == "bf16" and "ms" in r
               and r.get("case") != "decode"]
        for impl in sorted({r["impl"] for r in sel}):
            pts = sorted((r["N"] * 1000 + r["P"] + r["D"] / 1000, r[key]) for r in sel if r["impl"] == impl)
            ax.plot(range(len(pts)), [p[1] for p in pts], marker="o", label=impl)
        ax.set_title(f"{mode}, causal, bf16")
        ax.set_xlabel("shape (N, P, D ascending)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"prefix_attn vs concatenation on {gpu}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
