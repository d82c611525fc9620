"""End to end: prefix (and prompt) tuning with prefix_attn against PEFT, same model, same prefix.

    python benchmarks/bench_e2e.py                  # the CPU cases, writes results/<hardware>/e2e.{json,md,png}
    python benchmarks/bench_e2e.py --quick          # 2 repeats, no memory: a smoke run
    python benchmarks/bench_e2e.py --cases train generate --reps 7 --wait-quiet 30
    python3 benchmarks/bench_e2e.py --device cuda --budget 150 [--deadline EPOCH] [--merge-into DIR]

CPU cases (harness.models.CPU_CASES; SmolLM2-135M-Instruct, float32, frozen, only the prefix or
prompt trains): train (B=4 x N=256, P=64: forward, backward, AdamW), train_gc (the same, ours
with gradient checkpointing, which PEFT's prefix tuning refuses), train_bf16 (the forward under
torch.autocast bfloat16, as Trainer(bf16=True)), generate (greedy, exactly 32 new tokens, B=8
left-padded prompts of 40-64 tokens, KV cache), prompt_train (prompt tuning, B=8 x N=128, a soft
prompt of 64: ours runs the prompt once per step as a batch of one and feeds its K/V to every row
through the prefix kernel; PEFT prepends it to every row; benchmarks/README.md has its FLOP floor).

CUDA cases (harness.models.gpu_cases, bf16, most important first; `tools/gpu_check.sh` runs them
after the kernel suite): a Llama of 1.1 B parameters from a config with random weights (train and
train_gc at N = 2048, P = 128, at the batch that fills the card for PEFT's step; generate at
B = 128, 16, 1, 512-token prompts, 256 new tokens), then SmolLM2 where installed. The budget
(--budget seconds, never past --deadline) is shared by weight; a case that cannot start in time
is recorded as skipped; results are rewritten after every case. --merge-into DIR puts the rows
under "e2e" in DIR/results.json and a section of DIR/results.md. --tiny: the CUDA cases' code
paths at tiny shapes (tests/integrations/test_hf_bench_e2e.py runs them on CPU and on the faked
CUDA device of tools/fake_cuda).

tokens/s = tokens per call (train: B*N; generate: B*new tokens) over the median of interleaved
ABBA repeats; peak memory as harness.models says (CPU: a fresh process per measurement).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import models as hm, provenance, report  # noqa: E402

E2E_SECTION = "## End to end: prefix tuning against PEFT (bench_e2e.py)"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def markdown(rows: list[dict], targets: list[dict], meta: dict) -> str:
    c = report.cell

    def ours(fn):
        return lambda r: fn(r) if r.get("impl") == "ours" and "tokens_per_s" in r else ""

    def measured(fn):
        return lambda r: fn(r) if "tokens_per_s" in r else ""

    def note(r):
        if "tokens_per_s" not in r:
            return r.get("skipped") or r.get("error") or ""
        same = r.get("same_tokens_as_peft")
        return r["timing"] + ("" if same is None else f"; same tokens as PEFT: {same:.0%}") if r["impl"] == "ours" else ""

    env = meta["environment"]
    head = (f"{provenance.describe(env)}; {meta['dtype']}; transformers {env['versions']['transformers']}, peft "
            f"{env['versions']['peft']}, prefix_attn backend {meta['backend']}"
            + ("" if meta.get("complete") else "; INCOMPLETE (budget or deadline)")
            + ("; TINY SHAPES: a smoke run, not a measurement" if meta.get("tiny") else ""))
    table = report.markdown_table(rows, [
        ("case", lambda r: r["case"]),
        ("impl", measured(lambda r: r["impl"] + (" + grad. ckpt" if r["checkpointing"] else ""))),
        ("B", measured(lambda r: r["batch"])), ("tokens/s", measured(lambda r: f"{r['tokens_per_s']:.0f}")),
        ("step s (median)", measured(lambda r: f"{r['median_s']:.3f}")),
        ("first call s", measured(lambda r: f"{r['first_call_s']:.1f}")),
        ("peak MB (step)", measured(lambda r: c(r["peak_mb"], ".0f"))),
        ("peak MB (+ model)", measured(lambda r: c(r["peak_total_mb"], ".0f"))),
        ("tokens/s vs PEFT", ours(lambda r: c(r["speed_vs_peft"], ".2f") + "x" * (r["speed_vs_peft"] is not None))),
        ("memory vs PEFT", ours(lambda r: c(r["memory_vs_peft"], ".2f") + "x" * (r["memory_vs_peft"] is not None))),
        ("note", note)])
    choices = {r["case"]: r["batch_choice"] for r in rows if r.get("batch_choice") not in (None, "fixed")}
    target_table = report.markdown_table(targets, [
        ("target", lambda t: f"{t['case']} {t['metric']} {t['target']}"),
        ("ours / PEFT", lambda t: c(t["ratio_ours_over_peft"], ".3f")),
        ("met", lambda t: "not measured" if t["met"] is None else ("yes" if t["met"] else "NO"))])
    return "\n".join([head, "", table, *([""] + [f"- batch of {k}: {v}" for k, v in choices.items()] if choices else []),
                      "", target_table])


def plot(rows: list[dict], path: str, title: str) -> bool:
    done = [r for r in rows if "tokens_per_s" in r]
    return report.bar_plot(path, title, [
        (label, {("prefix_attn" if impl == "ours" else "PEFT"): {r["case"]: r[key] for r in done if r["impl"] == impl}
                 for impl in hm.IMPLS})
        for label, key in (("tokens / s (higher is better)", "tokens_per_s"),
                           ("peak extra memory, MB (lower is better)", "peak_mb"))])


def save(out_dir, merge_into, meta, rows, targets) -> None:
    """e2e.json / .md / .png in out_dir; in each merge_into folder, a section of results.json / .md."""
    md = markdown(rows, targets, meta)
    doc = {"meta": meta, "rows": rows, "targets": targets}
    if out_dir:
        report.write(out_dir, "e2e", doc, f"# End to end: prefix_attn against PEFT\n\n{md}",
                     lambda path: plot(rows, path, f"prefix_attn vs PEFT - {provenance.describe(meta['environment'])}"))
    for d in merge_into:
        report.merge_section(d, "results", "e2e", doc, E2E_SECTION, md)


def keep_other_cases(rows: list[dict], path: str) -> tuple[list[dict], dict[str, dict]]:
    """rows, plus the rows of the other cases from an earlier e2e.json at path, and {case: that
    run's commit and date}."""
    if not os.path.exists(path):
        return rows, {}
    with open(path) as f:
        earlier = json.load(f)
    ran = {r["case"] for r in rows}
    old = [r for r in earlier.get("rows", []) if r["case"] not in ran]
    meta = earlier.get("meta", {})
    source = {"commit": meta.get("commit", meta.get("git_commit")), "date": meta.get("date")}
    return old + rows, {r["case"]: source for r in old}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = list(dict.fromkeys([*hm.CPU_CASES, *(c.name for c in hm.gpu_cases() + hm.gpu_cases(tiny=True))]))
    ap.add_argument("--cases", nargs="+", default=None, choices=names, help="default: every case of the device")
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per implementation (interleaved)")
    ap.add_argument("--mem-repeats", type=int, default=1, help="CPU: fresh processes per memory measurement")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="CPU: wait up to this long per case for quiet")
    ap.add_argument("--quick", action="store_true", help="2 repeats, no memory: a smoke run, not a measurement")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware>)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (on a shared machine 1 avoids OpenMP "
                                                              "barriers waiting on descheduled threads)")
    ap.add_argument("--keep-other-cases", action="store_true",
                    help="keep the rows of the cases not run from the results folder's e2e.json")
    ap.add_argument("--device", default="cpu", help="cuda: the CUDA cases, in --dtype; cpu: the CPU cases, float32")
    ap.add_argument("--tiny", action="store_true", help="the CUDA cases' code paths at tiny shapes (a smoke test)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="the CUDA cases' dtype")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all cases (default: CUDA 600, CPU none)")
    ap.add_argument("--deadline", type=float, default=None, help="epoch seconds: never run past it")
    ap.add_argument("--min-case-s", type=float, default=None, help="skip a case with less time left (default 20; "
                                                                   "--tiny and CPU 0)")
    ap.add_argument("--max-batch", type=int, default=None, help="cap of the filling batch (default 256; --tiny 4)")
    ap.add_argument("--max-step-s", type=float, default=3.0, help="the filling batch's predicted step time cap")
    ap.add_argument("--merge-into", action="append", default=[], help="also put the rows into DIR/results.json and "
                                                                      "DIR/results.md (repeatable)")
    args = ap.parse_args(argv)
    cpu_cases = args.device == "cpu" and not args.tiny
    if args.quick:
        args.reps, args.mem_repeats = 2, 0
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the fresh processes of the memory measurements
    dev = torch.device(args.device)
    dtype = torch.float32 if cpu_cases else DTYPES[args.dtype]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    start = time.time()
    end = start + (args.budget if args.budget is not None else (float("inf") if cpu_cases else 600.0))
    end = min(end, args.deadline or float("inf"))
    min_case_s = args.min_case_s if args.min_case_s is not None else (0.0 if args.tiny or cpu_cases else 20.0)
    all_cases = list(hm.CPU_CASES.values()) if cpu_cases else hm.gpu_cases(args.tiny)
    cases = [c for c in all_cases if not args.cases or c.name in args.cases]
    targets_spec = hm.CPU_TARGETS if cpu_cases else hm.GPU_TARGETS
    import prefix_attn

    env = provenance.environment(dev)
    meta = {"benchmark": "e2e", "environment": env, "commit": env["commit"], "date": env["date"],
            "device_name": env.get("gpu") or f"{env['cpu_model']} ({env['cpu_cores']} cores)",
            "dtype": str(dtype).replace("torch.", "") if cpu_cases else args.dtype, "tiny": args.tiny,
            "backend": prefix_attn.select_backend(torch.zeros(1, 1, 1, 64, device=dev, dtype=dtype)),
            "budget_s": args.budget, "reps_max": args.reps, "threads": torch.get_num_threads(), "complete": False}
    out_dir = None if args.no_save or (args.tiny and not args.out) else (args.out or provenance.results_dir(dev))
    print(f"bench_e2e: {provenance.describe(env)}, {meta['dtype']}, backend {meta['backend']}", flush=True)
    rows: list[dict] = []
    base, loaded = None, None
    for i, case in enumerate(cases):
        left = end - time.time()
        if left < max(min_case_s, 1e-9) and left != float("inf"):
            rows.append({"case": case.name, "skipped": f"not run: {max(left, 0):.0f} s left of the budget"})
            print(f"  {case.name}: skipped, {left:.0f} s left", flush=True)
            continue
        case_end = time.time() + left * case.weight / sum(c.weight for c in cases[i:])
        print(f"case {case.name} ({case.model}, B {case.batch})", flush=True)
        try:
            if loaded != case.model:
                base = None
                gc.collect()
                base, loaded = hm.load_base(case.model, dev, dtype, args.tiny), case.model
            kwargs = dict(reps=args.reps, case_end=case_end, end=end, max_batch=args.max_batch or (4 if args.tiny else 256),
                          max_step_s=args.max_step_s, cpu_memory=args.mem_repeats if cpu_cases else 0,
                          wait_quiet_s=args.wait_quiet)
            try:
                rows += hm.run_case(case, base, dev, **kwargs)
            except torch.OutOfMemoryError:
                if case.batch != "fill" or end - time.time() < min_case_s:
                    raise
                print(f"  {case.name}: out of memory at the filling batch; again with 60% of the free memory", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                rows += hm.run_case(case, base, dev, fill_fraction=0.6, **kwargs)
        except LookupError as e:
            rows.append({"case": case.name, "skipped": f"not run: {e}"})
        except torch.OutOfMemoryError as e:
            rows.append({"case": case.name, "error": f"out of memory: {str(e).splitlines()[0]}"})
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        for r in rows[-2:]:
            if "tokens_per_s" in r:
                print(f"  {r['case']}/{r['impl']}: B {r['batch']}, {r['tokens_per_s']:.0f} tokens/s, peak "
                      f"{report.cell(r['peak_mb'], '.0f')} MB, {r['timing']}", flush=True)
        meta["elapsed_s"] = time.time() - start
        save(out_dir, args.merge_into, meta, rows, hm.check_targets(rows, targets_spec, all_cases))
    meta["complete"] = bool(rows) and all(not r.get("skipped") and not r.get("error") for r in rows)
    if args.keep_other_cases and out_dir:
        rows, meta["kept_rows"] = keep_other_cases(rows, os.path.join(out_dir, "e2e.json"))
    targets = hm.check_targets(rows, targets_spec, all_cases)
    save(out_dir, args.merge_into, meta, rows, targets)
    print("\n" + markdown(rows, targets, meta))
    if out_dir:
        print(f"\nwrote {out_dir}/e2e.json, e2e.md, e2e.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
