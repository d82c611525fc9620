"""End-to-end prefix tuning of SmolLM2-135M-Instruct: prefix_attn vs PEFT, same model, same prefix.

    python benchmarks/bench_e2e.py                # all cases, writes results/<hardware>/e2e.{json,png,md}
    python benchmarks/bench_e2e.py --quick        # fewer repeats, for a smoke run
    python benchmarks/bench_e2e.py --cases train generate --reps 7 --wait-quiet 30

Cases (float32; the model is frozen, only the prefix trains):

    train      one training step: forward, backward, AdamW step on the prefix; B=4 x N=256
               tokens, P=64. prefix_attn vs PEFT prefix tuning.
    train_gc   the same step with gradient checkpointing for prefix_attn. PEFT's prefix tuning
               cannot use it (it raises), so PEFT runs without, as in `train`.
    generate   greedy generation of exactly 32 new tokens for B=8 left-padded prompts of 40-64
               tokens, P=64, with a KV cache.

What is measured:

- tokens/s: tokens processed per second of wall time. train: B*N / step time; generate:
  B*32 generated tokens / time of the whole generate() call (prefill included). Both
  implementations live in one process, are warmed up, then run alternately in ABBA order
  (ours, PEFT, PEFT, ours, ...) so that load from other processes, and the cost of running
  right after the other one, hit both alike; the median is reported (the JSON also has every
  repeat).
- peak memory: peak RSS during one call minus RSS just before it, with the model loaded and
  one warm-up call done, in a FRESH process per measurement (benchmarks/memory.py:
  VmHWM - VmRSS, glibc malloc tuned so freed memory leaves the process). That is the memory
  the step itself needs: activations, autograd's saved tensors, temporaries, logits.

PEFT and transformers 5: PEFT 0.21 hands its prefix cache to generate() under the old name
`past_key_values`; transformers 5's generate passes its own empty cache as `cache`, which wins,
so PEFT's generate silently runs WITHOUT the prefix. Here PEFT's prefix cache is moved to
`cache` on the prefill step (`examples/peft_compat.py`), so PEFT does the work it intends to do;
both implementations then produce the same tokens, which the script checks.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for path in (_HERE, os.path.join(_ROOT, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import smollm2  # noqa: E402  (examples/smollm2.py)
from peft_compat import fix_peft_generate  # noqa: E402  (examples/peft_compat.py)

CASES = {
    "train": dict(kind="train", batch=4, seq=256, prefix=64, checkpointing=False),
    "train_gc": dict(kind="train", batch=4, seq=256, prefix=64, checkpointing=True),
    "generate": dict(kind="generate", batch=8, seq=64, prefix=64, new_tokens=32),
}
IMPLS = ("ours", "peft")
TARGETS = [  # (case, metric, comparison, bound): ours / PEFT must satisfy it
    ("train", "tokens_per_s", ">=", 1.0),
    ("train", "peak_mb", "<", 1.0),
    ("train_gc", "peak_mb", "<=", 0.6),
    ("generate", "tokens_per_s", ">=", 1.0),
]


# --------------------------------------------------------------------------- building

def _prefix_table(model, P: int, seed: int) -> torch.Tensor:
    """The shared prefix, [L, 2, Hkv, P, D], N(0, 1) as PEFT initialises its table."""
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    return torch.randn(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, P, D, generator=g)


def build_model(impl: str, model, P: int, seed: int = 0, checkpointing: bool = False):
    """`model` prefix-tuned by impl ("ours" or "peft"), with the same prefix values either way."""
    table = _prefix_table(model, P, seed)
    if impl == "ours":
        from prefix_attn.integrations.transformers import add_prefix_tuning

        add_prefix_tuning(model, P)
        model.prefix_encoder.load_table(table)
        if checkpointing:
            model.gradient_checkpointing_enable()
        return model
    if impl == "peft":
        from peft import PrefixTuningConfig, get_peft_model

        if checkpointing:
            raise ValueError("PEFT prefix tuning does not work with gradient checkpointing")
        peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        L, _, H, _, D = table.shape
        with torch.no_grad():  # PEFT's row for virtual token p is laid out [L, 2, Hkv, D]
            peft_model.prompt_encoder["default"].embedding.weight.copy_(
                table.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D))
        fix_peft_generate(peft_model)
        return peft_model
    raise ValueError(impl)


def make_inputs(case: dict, vocab: int, pad_id: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, N = case["batch"], case["seq"]
    ids = torch.randint(100, vocab, (B, N), generator=g)  # skip the special tokens at the start
    mask = torch.ones(B, N, dtype=torch.long)
    if case["kind"] == "generate":  # left padding: prompts of 40 .. 64 tokens
        for b in range(B):
            pads = int(torch.randint(0, N - 40 + 1, (1,), generator=g))
            mask[b, :pads] = 0
            ids[b, :pads] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def build_call(impl: str, case_name: str, seed: int = 0, model=None) -> Tuple[Callable[[], Any], int, Any]:
    """(call, tokens per call, the model): one training step or one generate() for impl."""
    case = CASES[case_name]
    if model is None:
        model, _ = smollm2.load_smollm2(tokenizer=False)
    ckpt = case.get("checkpointing", False) and impl == "ours"
    model = build_model(impl, model, case["prefix"], seed, checkpointing=ckpt)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    inputs = make_inputs(case, model.config.vocab_size, pad_id, seed)
    if case["kind"] == "train":
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        labels = inputs["input_ids"]

        def call():
            out = model(**inputs, labels=labels, use_cache=False)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach()

        return call, case["batch"] * case["seq"], model

    model.eval()
    new = case["new_tokens"]

    def call():
        return model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=pad_id)

    return call, case["batch"] * new, model


def memory_step(impl: str, case: str, seed: int = 0) -> Callable[[], Any]:
    """memory.py target: the call to measure, built in the fresh child process."""
    torch.manual_seed(seed)
    call, _, _ = build_call(impl, case, seed)
    return call


# --------------------------------------------------------------------------- measuring

def time_interleaved(calls: Dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Alternate the implementations in ABBA order: whichever runs right after the other pays for
    the caches and heap pages the other left behind (worth several percent here), so each one
    runs first in half of the rounds."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    order = list(calls)
    for rep in range(reps):
        for name in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _background_cpu() -> Optional[float]:
    try:
        from bench_attention import background_cpu

        return background_cpu()
    except Exception:
        return None


def _wait_quiet(seconds: float) -> Optional[float]:
    if seconds <= 0:
        return _background_cpu()
    from bench_attention import wait_for_quiet

    return wait_for_quiet(seconds)


def run_case(case_name: str, reps: int, mem_repeats: int, wait_quiet: float, base_model) -> List[dict]:
    from memory import measure_peak_extra

    load_before = _wait_quiet(wait_quiet)
    calls, tokens, models = {}, {}, {}
    for impl in IMPLS:
        calls[impl], tokens[impl], models[impl] = build_call(impl, case_name, model=copy.deepcopy(base_model))
    if CASES[case_name]["kind"] == "generate":
        same = torch.equal(calls["ours"](), calls["peft"]())
        print(f"  {case_name}: ours and PEFT generate the same tokens: {same}", flush=True)
    times = time_interleaved(calls, reps)
    load_after = _background_cpu()
    del calls, models
    rows = []
    for impl in IMPLS:
        print(f"  {case_name}/{impl}: peak memory in fresh processes ...", flush=True)
        peaks = [measure_peak_extra("bench_e2e:memory_step", {"impl": impl, "case": case_name}, device="cpu")
                 for _ in range(mem_repeats)]
        t = times[impl]
        median = statistics.median(t)
        rows.append({
            "case": case_name, "impl": impl, **CASES[case_name],
            "checkpointing": bool(CASES[case_name].get("checkpointing")) and impl == "ours",
            "tokens_per_call": tokens[impl], "seconds": t, "median_s": median,
            "tokens_per_s": tokens[impl] / median, "min_s": min(t),
            "peak_mb_all": [p / 1e6 for p in peaks], "peak_mb": statistics.median(peaks) / 1e6,
            "background_cpu_cores": [load_before, load_after],
        })
    return rows


def check_targets(rows: List[dict]) -> List[dict]:
    by = {(r["case"], r["impl"]): r for r in rows}
    out = []
    for case, metric, op, bound in TARGETS:
        if (case, "ours") not in by or (case, "peft") not in by:
            continue
        ratio = by[(case, "ours")][metric] / by[(case, "peft")][metric]
        ok = {">=": ratio >= bound, "<": ratio < bound, "<=": ratio <= bound}[op]
        out.append({"case": case, "metric": metric, "ratio_ours_over_peft": ratio, "target": f"{op} {bound}",
                    "met": bool(ok)})
    return out


# --------------------------------------------------------------------------- reporting

def markdown(rows: List[dict], targets: List[dict]) -> str:
    by = {(r["case"], r["impl"]): r for r in rows}
    lines = ["| case | impl | tokens/s | step (s, median) | peak memory (MB) | tokens/s vs PEFT | memory vs PEFT |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        peft = by.get((r["case"], "peft"))
        impl = r["impl"] + (" + grad. checkpointing" if r["checkpointing"] else "")
        speed = f"{r['tokens_per_s'] / peft['tokens_per_s']:.2f}x" if peft and r["impl"] != "peft" else ""
        mem = f"{r['peak_mb'] / peft['peak_mb']:.2f}x" if peft and r["impl"] != "peft" else ""
        lines.append(f"| {r['case']} | {impl} | {r['tokens_per_s']:.0f} | {r['median_s']:.3f} | "
                     f"{r['peak_mb']:.0f} | {speed} | {mem} |")
    lines += ["", "| target | ours / PEFT | met |", "| --- | ---: | --- |"]
    for t in targets:
        lines.append(f"| {t['case']} {t['metric']} {t['target']} | {t['ratio_ours_over_peft']:.3f} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)


def plot(rows: List[dict], path: str, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by = {(r["case"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for ax, metric, label in ((axes[0], "tokens_per_s", "tokens / s (higher is better)"),
                              (axes[1], "peak_mb", "peak extra memory, MB (lower is better)")):
        for i, impl in enumerate(IMPLS):
            xs = [c for c in range(len(cases)) if (cases[c], impl) in by]
            vals = [by[(cases[c], impl)][metric] for c in xs]
            bars = ax.bar([x + (i - 0.5) * width for x in xs], vals, width,
                          label="prefix_attn" if impl == "ours" else "PEFT prefix tuning")
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace("train_gc", "train\n(ours: grad. ckpt)") for c in cases])
        ax.set_title(label, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per implementation (interleaved)")
    ap.add_argument("--mem-repeats", type=int, default=1, help="fresh processes per memory measurement")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="wait up to this many seconds per case for other processes to go quiet")
    ap.add_argument("--quick", action="store_true", help="2 repeats: a smoke run, not a measurement")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware>)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 2

    from bench_attention import git_commit, hardware_info
    import peft
    import transformers

    import prefix_attn

    hw = hardware_info(torch.device("cpu"))
    print(f"{hw['cpu_model']}, {hw['cpu_cores']} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, peft {peft.__version__}, prefix_attn backend "
          f"{prefix_attn.select_backend(torch.zeros(1, 1, 1, 64))}", flush=True)
    base_model, _ = smollm2.load_smollm2(tokenizer=False)
    rows = []
    for case in args.cases:
        print(f"case {case}: {CASES[case]}", flush=True)
        rows += run_case(case, args.reps, args.mem_repeats, args.wait_quiet, base_model)
    targets = check_targets(rows)
    table = markdown(rows, targets)
    print()
    print(table)
    if args.no_save:
        return 0
    meta = {"benchmark": "e2e", "model": "SmolLM2-135M-Instruct (float32, de-quantized from Q4_1 GGUF)",
            "hardware": hw, "git_commit": git_commit(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "prefix_attn": prefix_attn.__version__},
            "backend": prefix_attn.select_backend(torch.zeros(1, 1, 1, 64)), "reps": args.reps,
            "mem_repeats": args.mem_repeats, "notes": __doc__}
    out_dir = args.out or os.path.join(_HERE, "results", hw["slug"])
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "e2e.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": targets}, f, indent=2)
    with open(os.path.join(out_dir, "e2e.md"), "w") as f:
        f.write(f"# End-to-end: SmolLM2-135M-Instruct, prefix_attn vs PEFT ({hw['cpu_model']})\n\n{table}\n")
    title = (f"SmolLM2-135M prefix tuning, fp32, P=64: prefix_attn vs PEFT - {hw['cpu_model']}, "
             f"{hw['cpu_cores']} cores")
    wrote_png = plot(rows, os.path.join(out_dir, "e2e.png"), title)
    print(f"\nwrote {out_dir}/e2e.json, e2e.md" + (", e2e.png" if wrote_png else " (no matplotlib: no PNG)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
