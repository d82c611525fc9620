"""GPU benchmark suite: prefix attention, ours against every incumbent, on one CUDA device.

    python3 benchmarks/gpu_suite.py [--quick] [--out benchmarks/results/<gpu>] [--incumbents NAME ...]

The cases (harness.attention.gpu_cases, most important first): the targets (bf16, head dim 128,
N = 8192, P in {128, 512, 16}), a decoding step (Nq = 1, B = 64, a 4096-token cache, P = 128,
32 query / 8 KV heads), grouped heads in training (32 / 8, N = 4096), dropout, then the grid
(fp16 and bf16, D in {64, 128}, P in {16, 128, 512}, N in {512, 2048, 8192}), causal then
non-causal, each pass of harness.attention (decoding: fwd only), for ours-triton and ours-cuda
where present and every incumbent that stands for the case. harness.attention.measure times each
(shape, pass): all implementations interleaved, CUDA events, rotating among 3 input sets so
repeats don't just measure L2, medians; the first call (set-up and compile) apart as
`first call s`; peak memory of a whole step (max_memory_allocated); TFLOP/s from visible pairs,
GB/s against the bytes floor. A compiled incumbent that fails to compile or runs eagerly is
flagged FELL BACK and never counts as the best incumbent.

A lent GPU gives one command at most 10 minutes, so the suite keeps to a deadline (--deadline,
epoch seconds; `make gpu-check`, tools/gpu_check.sh, passes one and runs the test tier first;
run alone, the suite runs that tier with a share of the time), a pass starts only while there is
time left (a compiled incumbent only with a minute left), and the results (results.md / .json /
.png, each with the commit) are rewritten after every case under benchmarks/results/<gpu>/
(--out) and --mirror DIR (default $PREFIX_ATTN_MIRROR), so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]

import prefix_attn  # noqa: E402
from harness import attention as at, provenance, report  # noqa: E402

# Where the suite runs and which of our backends it times. Only a CPU smoke test, with
# torch.cuda's timing calls faked, sets them otherwise (tests/test_bench_common.py).
DEVICE = "cuda"
OURS_BACKENDS = ("triton", "cuda")


def run_case(case: at.KernelCase, rows: list, deadline: float, names=None) -> bool:
    """Every shape, pass and implementation of one case, appended to rows. False when the
    deadline cut it short."""
    available = prefix_attn.available_backends()
    for shape in case.shapes():
        impls = [f"ours-{b}" for b in OURS_BACKENDS if b in available]
        impls += [i.name for i in at.incumbents_for(shape, case.kind, names)]
        for mode in case.passes:
            if time.time() > deadline - 20:
                return False
            rows += at.measure(shape, mode, impls, device=DEVICE, dtype=case.dtype, n_sets=3, warmup=3, reps=15,
                               memory=torch.device(DEVICE).type == "cuda", deadline=deadline,
                               fields={"case": case.label})
            if torch.device(DEVICE).type == "cuda":
                torch.cuda.empty_cache()
    return True


def run_tests(out_dirs, timeout_s: float) -> int:
    """The GPU test tier as `make gpu-check` runs it (tools/gpu_check.sh --tier-only, so the command
    lives in one place): tests.log in every folder; pytest's status (124: out of time)."""
    cmd = ["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), "--tier-only", "--out", out_dirs[0],
           "--tier-timeout", str(max(int(timeout_s), 10))] + (["--mirror", out_dirs[1]] if len(out_dirs) > 1 else [])
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, GPU_PYTHON=sys.executable))


def markdown(meta: dict, rows: list[dict]) -> str:
    c = report.cell

    def ms(r):
        if "fallback_ms" in r:
            return f"FELL BACK ({r['fell_back']}): {r['fallback_ms']:.3f}"
        return c(r.get("ms"), ".3f")

    def last(r):
        if "ms" in r:
            return c(r.get("speedup_vs_best_incumbent"), ".2f")
        return (f"FELL BACK ({r['fell_back']}): " if r.get("fell_back") and "fallback_ms" not in r else "") + \
            r.get("error", "-")

    table = report.markdown_table(rows, [
        ("case", lambda r: r.get("case", "-")), ("dtype", lambda r: r["dtype"]), ("B", lambda r: r["B"]),
        ("Hq/Hkv", lambda r: f"{r['H']}/{r['Hkv']}"), ("Nq", lambda r: r["N"]), ("Nk", lambda r: r["Nk"]),
        ("P", lambda r: r["P"]), ("D", lambda r: r["D"]), ("causal", lambda r: r["causal"]), ("pass", lambda r: r["mode"]),
        ("impl", lambda r: r["impl"]), ("ms", ms),
        ("TFLOP/s", lambda r: c(r.get("tflops", r.get("fallback_tflops")), ".1f")),
        ("GB/s", lambda r: c(r.get("gbps", r.get("fallback_gbps")), ".0f")), ("peak MB", lambda r: c(r.get("peak_mb"), ".0f")),
        ("first call s", lambda r: c(r.get("first_call_s"), ".2f")), ("speedup vs best incumbent", last)])
    tuned = meta.get("tuned_configs") or []
    return "\n".join([
        f"# prefix_attn on {meta['gpu']}", "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, {meta['date']}, commit {meta['commit']}; "
        f"tests exit code {meta['tests_rc']}" + ("" if meta.get("complete", True) else
                                                 "; INCOMPLETE: the run hit its deadline"), "",
        "Passes: " + "; ".join(f"`{k}` {v}" for k, v in at.PASS_LABELS.items()) + ".",
        f"FLOPs: {at.FLOPS_CONVENTION}. GB/s: the bytes floor ({at.BYTES_CONVENTION}) over the time. MB = 10^6 "
        "bytes. first call s: set-up and first call, compile included, not in ms. FELL BACK: a compiled incumbent "
        "that did not run compiled; never the best incumbent.", "", table, "",
        "## Tile configs the autotuner picked", ""] +
        ([f"- {t}" for t in tuned] or ["(none: autotuning off, or no Triton kernel ran)"])) + "\n"


def plot(rows: list[dict], path: str, title: str) -> bool:
    # prefix_only_bwd does little arithmetic per byte: GB/s against its floor says more
    sel = [r for r in rows if r["causal"] and r["dtype"] == "bf16" and "ms" in r and r.get("case") != "decode"]
    panels = [(f"{mode}, causal, bf16: {label}", {impl: {r["config"]: r[key] for r in sel
                                                         if r["impl"] == impl and r["mode"] == mode}
                                                  for impl in dict.fromkeys(r["impl"] for r in sel)})
              for mode, key, label in (("fwd", "tflops", "TFLOP/s"), ("train_step", "tflops", "TFLOP/s"),
                                       ("prefix_only_bwd", "gbps", "GB/s (bytes floor)"))]
    return report.bar_plot(path, title, panels)


def _tuned_configs():
    """The tile configs Triton's autotuner picked in this process: the numbers to commit as the
    defaults in prefix_attn/triton_backend/configs.py."""
    try:
        from prefix_attn.triton_backend import tuning
    except Exception:  # noqa: BLE001 - no triton here: nothing was tuned
        return []
    return tuning.tuned_configs()


def save(out_dirs, meta, rows) -> str:
    """results.json / .md / .png in every folder (the speedups are at.add_speedups's, computed before)."""
    meta["tuned_configs"] = _tuned_configs()
    md = markdown(meta, rows)
    report.write(out_dirs, "results", {"meta": meta, "rows": rows}, md,
                 lambda path: plot(rows, path, f"prefix_attn vs concatenation on {meta['gpu']}, commit {meta['commit']}"))
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--skip-tests", action="store_true", help="no test tier (make gpu-check runs it before)")
    ap.add_argument("--tests-rc", type=int, default=None, help="with --skip-tests: the tier's exit status, recorded")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<gpu-name>)")
    ap.add_argument("--mirror", default=os.environ.get("PREFIX_ATTN_MIRROR") or None,
                    help="also write every result file into this folder (default $PREFIX_ATTN_MIRROR)")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds to be done by (default now + 9 min)")
    ap.add_argument("--test-share", type=float, default=0.35, help="share of the time left the tests may use")
    ap.add_argument("--incumbents", nargs="+", default=None, choices=list(at.INCUMBENTS),
                    help="only these incumbents (default: every one that stands for the case)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device: this suite needs a GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    deadline = args.deadline or time.time() + 540
    out_dirs = [args.out or provenance.results_dir("cuda")]
    if args.mirror and os.path.abspath(args.mirror) != os.path.abspath(out_dirs[0]):
        out_dirs.append(args.mirror)
    test_rc = args.tests_rc if args.skip_tests else run_tests(out_dirs, (deadline - time.time()) * args.test_share)
    if test_rc == 124:
        print("gpu_suite: the tests ran out of their share of the time (see tests.log)", flush=True)
    env = provenance.environment("cuda")
    meta = dict(gpu=env["gpu"], torch=env["versions"]["torch"], triton=env["versions"]["triton"], cuda=env["cuda"],
                date=env["date"], commit=env["commit"], host=env["host"], tests_rc=test_rc, complete=False,
                environment=env, passes=at.PASS_LABELS, flops_convention=at.FLOPS_CONVENTION,
                bytes_floor=at.BYTES_CONVENTION, incumbents={n: i.what for n, i in at.INCUMBENTS.items()},
                dynamo=at.configure_dynamo())
    rows: list[dict] = []
    save(out_dirs, meta, rows)  # the files exist, with the commit, even if the first case overruns
    cases = at.gpu_cases(args.quick)
    for n_done, case in enumerate(cases):
        if time.time() > deadline - 20:
            print(f"gpu_suite: deadline reached after {n_done} of {len(cases)} cases", flush=True)
            break
        finished = run_case(case, rows, deadline, args.incumbents)
        print(f"{case.label} {case.dtype} {case.shape.name} {'done' if finished else 'cut short'} "
              f"({time.time() - deadline:+.0f} s to the deadline)", flush=True)
        meta["complete"] = finished and n_done + 1 == len(cases)
        at.add_speedups(rows)
        save(out_dirs, meta, rows)
        if not finished:
            print(f"gpu_suite: deadline reached during case {n_done + 1} of {len(cases)}", flush=True)
            break
    print(save(out_dirs, meta, rows)[-6000:])
    return 0 if args.skip_tests or test_rc == 0 else 1  # with --skip-tests, only the suite's own failures


if __name__ == "__main__":
    sys.exit(main())
