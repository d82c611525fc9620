"""Encoder-decoder prefix tuning on CPU: prefix_attn vs PEFT, one training step, same prefix.

    python benchmarks/bench_seq2seq.py                 # writes results/<hardware>/seq2seq.{json,md}
    python benchmarks/bench_seq2seq.py --quick         # 2 repeats, tiny: a smoke run, not a measurement

Models (float32, random weights from a config; only the prefix trains):

    t5-small-config    T5's small shape: 6 + 6 layers, d_model 512, 8 heads of dim 64, d_ff 2048,
                       vocabulary 32128, its relative position bias (32 buckets, distance 128).
    bart-base-config   BART's base shape: 6 + 6 layers, d_model 768, 12 heads of dim 64,
                       FFN 3072, vocabulary 50265, learned positions.

Implementations, one training step each (forward, backward, AdamW on the prefix), B = 8 rows,
a source of 256 tokens, a target of 64, a prefix of P = 32:

    peft      PEFT 0.21's SEQ_2_SEQ_LM prefix tuning: under transformers 5, the decoder's
              self-attention only, as P past tokens of its cache, copied per row.
    ours      add_prefix_tuning(sites=("decoder",)): the same computation (PEFT's table, loaded
              in PEFT's layer order, gives PEFT's logits: tests/integrations/test_hf_encdec.py).
    ours-all  add_prefix_tuning with Li & Liang's three prefixes (encoder, decoder, cross-
              attention): more work than PEFT does, no PEFT counterpart; shown for its cost.

T5's prefix keys carry a position bias, which the kernels do not take: its attention runs as two
kernel calls merged by log-sum-exp (README, "Encoder-decoders"), and the prefix call's backward
makes a [B, H, P, D] gradient per layer. BART's runs in one call.

Measured as bench_e2e.py does (its time_interleaved): all implementations of a model in one
process, warmed up, run alternately (in order, then in reverse), medians; tokens/s counts source + target tokens; peak memory is
the step's extra resident memory in a fresh process per measurement (benchmarks/memory.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from typing import Any, Callable

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

MODELS = {
    "t5-small-config": ("T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0)),
    "bart-base-config": ("BartForConditionalGeneration", "BartConfig", dict(
        vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)),
}
SHAPE = dict(batch=8, source=256, target=64, prefix=32)
TINY_SHAPE = dict(batch=2, source=16, target=8, prefix=4)
TINY = {"t5-small-config": dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, vocab_size=128),
        "bart-base-config": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                 decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=128)}
IMPLS = ("ours", "peft", "ours-all")


def base_model(name: str, tiny: bool = False, seed: int = 0):
    import transformers

    transformers.logging.set_verbosity_error()
    model_cls, config_cls, kwargs = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**kwargs, **(TINY[name] if tiny else {})})
    return getattr(transformers, model_cls)(config)


def _peft_table(model, P: int, seed: int) -> torch.Tensor:
    """PEFT's prompt_embeddings [P, L * 2 * H * D], N(0, 1) as PEFT initialises it."""
    from prefix_attn.integrations.hf.geometry import model_geometry

    geometry = model_geometry(model, ("decoder",))
    width = geometry.num_layers * 2 * geometry.num_kv_heads * geometry.head_dim
    return torch.randn(P, width, generator=torch.Generator().manual_seed(seed))


def build(impl: str, model, P: int, seed: int = 0):
    """`model` prefix-tuned by impl, PEFT and ours with the same prefix values."""
    from peft import PrefixTuningConfig, get_peft_model

    table = _peft_table(model, P, seed)
    if impl == "peft":
        peft_model = get_peft_model(model, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(table)
        return peft_model
    from prefix_attn.integrations.transformers import add_prefix_tuning, get_prefix_encoder, load_peft_prefix

    if impl == "ours":
        # through PEFT's own file format and layer order: the same prefix PEFT runs
        import tempfile

        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory() as path:
            peft_model = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                                 num_virtual_tokens=P))
            peft_model.save_pretrained(path)
            save_file({"prompt_embeddings": table}, os.path.join(path, "adapter_model.safetensors"))
            return load_peft_prefix(model, path)
    if impl == "ours-all":
        add_prefix_tuning(model, P)
        with torch.no_grad():
            get_prefix_encoder(model).weight.normal_(generator=torch.Generator().manual_seed(seed))
        return model
    raise ValueError(impl)


def make_step(model, shape: dict, seed: int = 0) -> Callable[[], Any]:
    """One training step: forward with labels, backward, AdamW on the trainable parameters."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab // 2), vocab, (shape["batch"], shape["source"]), generator=g)
    labels = torch.randint(min(100, vocab // 2), vocab, (shape["batch"], shape["target"]), generator=g)
    mask = torch.ones_like(ids)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def memory_step(name: str, impl: str, tiny: bool = False, seed: int = 0) -> Callable[[], Any]:
    """memory.py target: the step to measure, built in the fresh child process."""
    shape = TINY_SHAPE if tiny else SHAPE
    return make_step(build(impl, base_model(name, tiny), shape["prefix"], seed), shape, seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=6, help="timed rounds (every implementation once per round)")
    ap.add_argument("--quick", action="store_true", help="tiny configs, 2 rounds: a smoke run, not a measurement")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware>)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import datetime

    from bench_attention import git_commit, hardware_info
    from bench_e2e import time_interleaved
    from memory import measure_peak_extra

    shape, reps = (TINY_SHAPE, 2) if args.quick else (SHAPE, args.reps)
    hw = hardware_info(torch.device("cpu"))
    print(f"{hw['cpu_model']}, torch {torch.__version__} ({torch.get_num_threads()} threads), shape {shape}",
          flush=True)
    rows = []
    for name in args.models:
        base = base_model(name, args.quick)
        calls = {impl: make_step(build(impl, copy.deepcopy(base), shape["prefix"]), shape) for impl in IMPLS}
        times = time_interleaved(calls, reps)
        del calls
        tokens = shape["batch"] * (shape["source"] + shape["target"])
        for impl in IMPLS:
            peak = measure_peak_extra("bench_seq2seq:memory_step", {"name": name, "impl": impl, "tiny": args.quick})
            median = statistics.median(times[impl])
            rows.append({"model": name, "impl": impl, **shape, "seconds": times[impl], "median_s": median,
                         "tokens_per_s": tokens / median, "peak_mb": peak / 1e6})
            print(f"  {name}/{impl}: {tokens / median:.0f} tokens/s, {peak / 1e6:.0f} MB", flush=True)
    lines = ["# Encoder-decoder prefix tuning, one training step (CPU, float32)", "",
             f"{hw['cpu_model']}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
             f"B = {shape['batch']}, source {shape['source']}, target {shape['target']}, P = {shape['prefix']}; "
             f"medians of {reps} interleaved rounds. `benchmarks/bench_seq2seq.py` says what each row runs.", "",
             "| model | impl | tokens/s | step (s, median) | peak memory (MB) | tokens/s vs PEFT | memory vs PEFT |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        peft = next(r for r in rows if r["model"] == row["model"] and r["impl"] == "peft")
        ratio = "" if row["impl"] == "peft" else f"{row['tokens_per_s'] / peft['tokens_per_s']:.2f}x"
        mem = "" if row["impl"] == "peft" or peft["peak_mb"] <= 0 else f"{row['peak_mb'] / peft['peak_mb']:.2f}x"
        lines.append(f"| {row['model']} | {row['impl']} | {row['tokens_per_s']:.0f} | {row['median_s']:.3f} | "
                     f"{row['peak_mb']:.0f} | {ratio} | {mem} |")
    print("\n".join(lines))
    if not args.no_save and not args.quick:
        out = args.out or os.path.join(_HERE, "results", hw["slug"])
        os.makedirs(out, exist_ok=True)
        meta = {"benchmark": "seq2seq", "hardware": hw, "git_commit": git_commit(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
                "shape": shape, "reps": reps, "notes": __doc__}
        with open(os.path.join(out, "seq2seq.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(out, "seq2seq.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {out}/seq2seq.json, seq2seq.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
