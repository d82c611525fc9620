"""Prefix attention: ours (prefix_attn.prefix_attention) against one incumbent, on CPU or GPU.

The default incumbent, `sdpa-cat`, is what Hugging Face PEFT prefix tuning does (expand the
shared prefix over the batch, torch.cat it in front of the keys and values, SDPA with the
equivalent boolean mask); --incumbent picks another of harness.attention.INCUMBENTS. Shapes,
passes, FLOP and byte counts and the measurement are harness.attention's, the GPU suite's too.

Per (config, pass): median ms of ours and the incumbent interleaved in one process (speedup =
incumbent ms / ours ms; also from the fastest runs), GFLOP/s from visible pairs, peak extra
memory of a whole step (CUDA max_memory_allocated; CPU peak RSS in a fresh process; mem ratio =
incumbent / ours), and the largest difference over the output and every gradient. Geometric
means over the target shapes are the headline.

Results: a markdown table on stdout; JSON, markdown and PNG under benchmarks/results/<hardware>/
(attention.*, attention-quick.*, attention-custom.*; --name).

    python benchmarks/bench_attention.py                  # default sweep (minutes on 2 CPU cores)
    python benchmarks/bench_attention.py --quick          # target shapes only, fewer repeats
    python benchmarks/bench_attention.py -P 0 64 256 -N 512 2048 --causal true --modes fwd
    python benchmarks/bench_attention.py --backend reference
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import attention as at, provenance, report, timer  # noqa: E402

DEFAULT_INCUMBENT = "sdpa-cat"
TRAIN_INCUMBENTS = [n for n, i in at.INCUMBENTS.items() if "train" in i.kinds]
# (causal, pass) pairs whose geometric-mean speedup over the target shapes is the headline.
HEADLINE = [(True, "fwd"), (True, "train_step"), (False, "fwd")]
# Below this the CPU measurement is noise: a smaller denominator makes the ratio a lower bound.
CPU_MEM_FLOOR_MB = 0.1
SHAPE_FIELDS = [f.name for f in dataclasses.fields(at.Shape)]


def side_by_side(rows: list[dict], incumbent: str, device) -> dict:
    """The two rows harness.attention.measure gives (ours, the incumbent) as one row of this
    benchmark's format: <side>_ms, <side>_gflops, <side>_mem_mb, speedup, mem_ratio, the diffs."""
    ours, inc = rows
    for r in rows:
        if "error" in r or "ms" not in r and "fallback_ms" not in r:
            raise RuntimeError(f"{r['impl']}: {r.get('error', 'not timed')}")
    shape = at.Shape(**{k: ours[k] for k in SHAPE_FIELDS})
    row = {"config": ours["config"], **shape.to_dict(), "Hkv": shape.hkv, "Nk": shape.nk, "mode": ours["mode"],
           "incumbent": incumbent, "flops": at.flops(shape, ours["mode"]),
           "bytes_floor": at.bytes_floor(shape, ours["mode"], at.elem_bytes(at.DTYPES[ours["dtype"]])),
           "reps": ours["reps"], "background_cpu": ours["background_cpu"], "cpu_per_wall": ours["cpu_per_wall"]}
    for side, r in (("ours", ours), ("incumbent", inc)):
        ms = r.get("ms", r.get("fallback_ms"))
        row.update({f"{side}_ms": ms, f"{side}_ms_min": r["ms_min"], f"{side}_ms_iqr": r["ms_iqr"],
                    f"{side}_gflops": row["flops"] / ms / 1e6, f"{side}_gbps": row["bytes_floor"] / ms / 1e6})
        if "peak_mb" in r:
            row[f"{side}_mem_mb"] = r["peak_mb"]
    if inc.get("fell_back"):
        row["incumbent_fell_back"] = inc["fell_back"]
    row["speedup"] = row["incumbent_ms"] / row["ours_ms"]
    row["speedup_min"] = row["incumbent_ms_min"] / row["ours_ms_min"]
    for k in ("max_abs_diff", "max_rel_diff", "diff_by_tensor"):
        if k in ours:
            row[k] = ours[k]
    if "ours_mem_mb" in row and "incumbent_mem_mb" in row:
        floor = CPU_MEM_FLOOR_MB if torch.device(device).type == "cpu" else 1e-6
        if max(row["ours_mem_mb"], row["incumbent_mem_mb"]) >= floor:
            row.update(mem_ratio=row["incumbent_mem_mb"] / max(row["ours_mem_mb"], floor),
                       mem_ratio_is_lower_bound=row["ours_mem_mb"] < floor)
    return row


def bench_one(shape: at.Shape, mode: str, *, backend="auto", device="cpu", dtype="fp32", incumbent=DEFAULT_INCUMBENT,
              **measure_kwargs) -> dict:
    """ours against the incumbent at one (shape, pass): one row (RuntimeError when either failed)."""
    if not at.INCUMBENTS[incumbent].applies(shape, "train"):
        raise ValueError(f"incumbent {incumbent} does not stand for {shape.name}")
    ours = "ours" if backend == "auto" else f"ours-{backend}"
    return side_by_side(at.measure(shape, mode, [ours, incumbent], device=device, dtype=dtype, **measure_kwargs),
                        incumbent, device)


def target_geomeans(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Geometric-mean speedup (and memory ratio) over the target shapes per (causal, pass)."""
    targets = {s.name for s in at.cpu_target_shapes()}
    out = {}
    for causal, mode in itertools.product((True, False), at.PASSES):
        sel = [r for r in rows if r["config"] in targets and r["causal"] == causal and r["mode"] == mode]
        if len(sel) != len(at.CPU_TARGET_SHAPES):
            continue
        key = f"{'causal' if causal else 'noncausal'}_{mode}"
        out[key] = {"speedup": at.geomean(r["speedup"] for r in sel),
                    "speedup_min": at.geomean(r["speedup_min"] for r in sel), "n": len(sel)}
        if all("mem_ratio" in r for r in sel):
            out[key]["mem_ratio"] = at.geomean(r["mem_ratio"] for r in sel)
    return out


def tables(rows: list[dict], gm: dict) -> str:
    inc = next((r["incumbent"] for r in rows), DEFAULT_INCUMBENT)
    c = report.cell
    text = report.markdown_table(rows, [
        ("config", lambda r: r["config"]), ("pass", lambda r: r["mode"]), ("ours ms", lambda r: c(r["ours_ms"], ".2f")),
        (f"{inc} ms", lambda r: c(r["incumbent_ms"], ".2f") + (" (fell back)" if r.get("incumbent_fell_back") else "")),
        ("speedup", lambda r: c(r["speedup"], ".2f") + "x"), ("ours GFLOP/s", lambda r: c(r["ours_gflops"], ".1f")),
        (f"{inc} GFLOP/s", lambda r: c(r["incumbent_gflops"], ".1f")),
        ("ours MB", lambda r: c(r.get("ours_mem_mb"), ".1f")), (f"{inc} MB", lambda r: c(r.get("incumbent_mem_mb"), ".1f")),
        ("mem ratio", lambda r: ((">" if r.get("mem_ratio_is_lower_bound") else "") + c(r["mem_ratio"], ".2f") + "x")
         if "mem_ratio" in r else "-"),
        ("max abs diff", lambda r: c(r.get("max_abs_diff"), ".1e"))])
    if gm:
        headline = {f"{'causal' if cz else 'noncausal'}_{m}" for cz, m in HEADLINE}
        text += (f"\n\nGeometric mean over the target shapes (speedup = {inc} ms / ours ms; memory ratio = "
                 f"{inc} MB / ours MB):\n\n" + report.markdown_table(gm.items(), [
                     ("target shapes", lambda kv: kv[0] + (" **(headline)**" if kv[0] in headline else "")),
                     ("geomean speedup (medians)", lambda kv: f"{kv[1]['speedup']:.2f}x"),
                     ("from fastest runs", lambda kv: f"{kv[1]['speedup_min']:.2f}x"),
                     ("geomean memory ratio", lambda kv: c(kv[1].get("mem_ratio"), ".2f") + "x"
                      if "mem_ratio" in kv[1] else "-")]))
    busy = [r for r in rows if (r.get("background_cpu") or 0) > timer.BUSY_CORES]
    if busy:
        text += (f"\n\nNote: other processes used up to {max(r['background_cpu'] for r in busy):.1f} cores while "
                 f"{len(busy)} of {len(rows)} rows were timed; those timings are less reliable (JSON: "
                 "background_cpu; rerun them with --redo-busy).")
    return text


def plot(rows: list[dict], path: str, title: str) -> bool:
    panels = [("speedup (incumbent ms / ours ms)", "speedup")]
    if any("mem_ratio" in r for r in rows):
        panels.append(("peak extra memory ratio (incumbent / ours)", "mem_ratio"))
    return report.bar_plot(path, title, [(label, {m: {r["config"]: r.get(key) for r in rows if r["mode"] == m}
                                                  for m in at.PASSES if any(r["mode"] == m for r in rows)})
                                         for label, key in panels], log=True, parity=True)


def finish(rows: list[dict], meta: dict, out_dir: str, stem: str, save: bool = True) -> None:
    gm = target_geomeans(rows)
    text = tables(rows, gm)
    print(text)
    if save:
        title = f"prefix_attn vs {meta['incumbent_name']} - {provenance.describe(meta['environment'])}"
        paths = report.write(out_dir, stem, {"meta": meta, "geomeans": gm, "rows": rows},
                             f"# prefix attention: ours vs {meta['incumbent_name']}\n\n"
                             f"{provenance.describe(meta['environment'])}\n\n{text}",
                             lambda path: plot(rows, path, title))
        print("wrote " + ", ".join(os.path.relpath(p) for p in paths), file=sys.stderr)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", default="auto", help="prefix_attn backend (auto, cpu, reference, triton, cuda)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(at.DTYPES))
    for flags, what in ((("-B", "--batch"), "batch sizes"), (("-H", "--heads"), "query heads"),
                        (("--hkv",), "KV heads (default = heads)"), (("-N", "--seqlen"), "query lengths"),
                        (("--nk",), "key lengths (default = seqlen)"), (("-P", "--prefix"), "prefix lengths"),
                        (("-D", "--headdim"), "head dims")):
        ap.add_argument(*flags, type=int, nargs="+", help=f"{what} (a custom sweep)")
    ap.add_argument("--causal", choices=["both", "true", "false"], default=None, help="custom sweep's causal settings")
    ap.add_argument("--modes", nargs="+", default=list(at.PASSES), choices=at.PASSES, help="passes (harness.attention)")
    ap.add_argument("--incumbent", default=DEFAULT_INCUMBENT, choices=TRAIN_INCUMBENTS)
    ap.add_argument("--no-targets", action="store_true", help="skip the three target shapes")
    ap.add_argument("--targets-only", action="store_true", help="only the three target shapes")
    ap.add_argument("--quick", action="store_true", help="target shapes (or the custom sweep), fwd and train_step, "
                                                          "1 warm-up, 3 repeats")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed runs per (config, pass)")
    ap.add_argument("--no-memory", action="store_true", help="skip peak memory")
    ap.add_argument("--memory-method", choices=["fork", "spawn"], default=None, help="CPU: how fresh processes start")
    ap.add_argument("--no-check", action="store_true", help="skip the max-abs-diff check")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="CPU: wait up to this long for other processes to use < 0.2 cores before each timing")
    ap.add_argument("--retries", type=int, default=0, help="CPU: time again, up to this often, when others were busy")
    ap.add_argument("--redo-busy", action="store_true", help="time again the disturbed rows of the results JSON this "
                                                             "command line would write, and rewrite it")
    ap.add_argument("--dropout", type=float, default=0.0, help="attention dropout, ours and the incumbent alike")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware>)")
    ap.add_argument("--name", default=None, help="file stem (default attention, attention-quick, attention-custom)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no files")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.min_reps, args.max_reps, args.budget = 1, 3, 3, 0.0
        if args.modes == list(at.PASSES):
            args.modes = ["fwd", "train_step"]
    return args


def shapes_from_args(args) -> tuple[list[at.Shape], str]:
    lists = (args.batch, args.heads, args.hkv, args.seqlen, args.nk, args.prefix, args.headdim)
    targets = [] if args.no_targets else at.cpu_target_shapes()
    if all(x is None for x in lists) and args.causal is None:
        if args.quick or args.targets_only:
            shapes, name = at.cpu_target_shapes(), "attention-quick" if args.quick else "attention-targets"
        else:
            shapes, name = list(dict.fromkeys(targets + at.cpu_default_sweep())), "attention"
        if args.dropout:
            name += f"-dropout{args.dropout:g}"
    else:
        causals = {"true": (True,), "false": (False,)}.get(args.causal, (True, False))
        shapes = targets + [at.Shape(B=b, H=h, Hkv=hkv, N=n, Nk=nk, P=p, D=d, causal=c)
                            for b, h, hkv, n, nk, p, d, c in itertools.product(
                                args.batch or [2], args.heads or [8], args.hkv or [0], args.seqlen or [512],
                                args.nk or [0], args.prefix if args.prefix is not None else [64],
                                args.headdim or [64], causals)]
        name = "attention-custom"
    return list(dict.fromkeys(dataclasses.replace(s, dropout=args.dropout) for s in shapes)), name


def run(shapes, modes, args, incumbent: str) -> tuple[list[dict], list[dict]]:
    """Every (shape, pass); a row that cannot run is reported and listed as skipped."""
    rows, skipped = [], []
    jobs = [(s, m) for s, m in itertools.product(shapes, modes) if not (m == "prefix_only_bwd" and s.P == 0)]
    for i, (shape, mode) in enumerate(jobs):
        try:
            row = bench_one(shape, mode, backend=args.backend, device=args.device, dtype=args.dtype,
                            incumbent=incumbent, warmup=args.warmup, min_reps=args.min_reps, max_reps=args.max_reps,
                            budget_s=args.budget, memory=not args.no_memory, check=not args.no_check,
                            retries=args.retries, wait_quiet_s=args.wait_quiet)
        except (NotImplementedError, ValueError, TypeError, RuntimeError) as e:
            print(f"[{i + 1}/{len(jobs)}] {shape.name} {mode}: skipped, {e}", file=sys.stderr, flush=True)
            skipped.append({"config": shape.name, "mode": mode, "error": str(e)})
            continue
        rows.append(row)
        print(f"[{i + 1}/{len(jobs)}] {shape.name:<28} {mode:<15} ours {row['ours_ms']:9.2f} ms  {incumbent} "
              f"{row['incumbent_ms']:9.2f} ms  {row['speedup']:5.2f}x  [others {row['background_cpu'] or 0:.1f} cores]",
              file=sys.stderr, flush=True)
    return rows, skipped


def redo_busy(path: str, args) -> int:
    """Time again the rows of an earlier run that other processes disturbed; rewrite its files."""
    with open(path) as f:
        saved = json.load(f)
    rows, meta = saved["rows"], saved["meta"]
    meta.setdefault("environment", provenance.environment(args.device, args.backend))  # files before the harness
    if {r["mode"] for r in rows} - set(at.PASSES):  # older pass names: their counts differ, run it whole
        print(f"# {path}: its passes predate {list(at.PASSES)}; run it again whole", file=sys.stderr)
        return 1
    todo = [i for i, r in enumerate(rows) if (r.get("background_cpu") or 0) > timer.BUSY_CORES]
    print(f"# {path}: {len(todo)} of {len(rows)} rows were timed on a busy machine", file=sys.stderr)
    for i in todo:
        old = rows[i]
        new, _ = run([at.Shape(**{k: old[k] for k in SHAPE_FIELDS if k in old})], [old["mode"]], args,
                     old.get("incumbent", DEFAULT_INCUMBENT))
        if new:
            rows[i] = {**old, **new[0], "redone": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    meta.setdefault("redone_rows", []).extend(f"{rows[i]['config']} {rows[i]['mode']}" for i in todo)
    finish(rows, meta, os.path.dirname(path), os.path.splitext(os.path.basename(path))[0], save=not args.no_save)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_method:
        os.environ["PREFIX_ATTN_MEMORY_METHOD"] = args.memory_method
    shapes, stem = shapes_from_args(args)
    stem = args.name or stem
    env = provenance.environment(args.device, args.backend)
    out_dir = args.out or provenance.results_dir(args.device)
    if args.redo_busy:
        return redo_busy(os.path.join(out_dir, stem + ".json"), args)
    print(f"# {provenance.describe(env)}; {len(shapes)} configs x {len(args.modes)} passes", file=sys.stderr)
    if torch.device(args.device).type == "cpu" and (env["loadavg_at_start"] or [0])[0] > 0.5:
        print(f"# warning: load average {env['loadavg_at_start'][0]}: other work will add noise", file=sys.stderr)
    rows, skipped = run(shapes, args.modes, args, args.incumbent)
    if not rows:
        print("nothing ran", file=sys.stderr)
        return 1
    env["loadavg_at_end"] = provenance.loadavg()
    meta = {"environment": env, "dtype": args.dtype, "argv": sys.argv[1:], "skipped": skipped,
            "timing": {"warmup": args.warmup, "min_reps": args.min_reps, "max_reps": args.max_reps,
                       "budget_s": args.budget, "statistic": "median", "order": "interleaved per repeat"},
            "flops_convention": at.FLOPS_CONVENTION, "bytes_floor": at.BYTES_CONVENTION, "passes": at.PASS_LABELS,
            "speedup": "incumbent_ms / ours_ms", "mem_ratio": "incumbent_mem / ours_mem",
            "incumbent_name": args.incumbent, "incumbent": at.INCUMBENTS[args.incumbent].what}
    finish(rows, meta, out_dir, stem, save=not args.no_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
