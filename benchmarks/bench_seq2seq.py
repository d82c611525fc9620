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

Measured as bench_e2e.py does (harness.timer): all implementations of a model in one process,
warmed up, run alternately (in order, then in reverse), medians; tokens/s counts source + target
tokens; peak memory is the step's extra resident memory in a fresh process (harness.memory).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from harness import memory, provenance, report, timer  # noqa: E402

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


def build(impl: str, model, P: int, seed: int = 0):
    """`model` prefix-tuned by impl, PEFT and ours with the same prefix values."""
    import tempfile

    from peft import PrefixTuningConfig, get_peft_model
    from safetensors.torch import save_file

    from prefix_attn.integrations.transformers import add_prefix_tuning, get_prefix_encoder, load_peft_prefix

    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    peft_model = get_peft_model(model if impl == "peft" else copy.deepcopy(model), config)
    weight = peft_model.prompt_encoder["default"].embedding.weight  # [P, layers * 2 * heads * head dim]
    table = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))  # N(0, 1), as PEFT's init
    if impl == "peft":
        with torch.no_grad():
            weight.copy_(table)
        return peft_model
    if impl == "ours":  # through PEFT's own file format and layer order: the same prefix PEFT runs
        with tempfile.TemporaryDirectory() as path:
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
    """harness.memory's target: the step to measure, built in the fresh child process."""
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
    shape, reps = (TINY_SHAPE, 2) if args.quick else (SHAPE, args.reps)
    env = provenance.environment("cpu")
    print(f"{provenance.describe(env)}, shape {shape}", flush=True)
    rows = []
    tokens = shape["batch"] * (shape["source"] + shape["target"])
    for name in args.models:
        base = base_model(name, args.quick)
        calls = {impl: make_step(build(impl, copy.deepcopy(base), shape["prefix"]), shape) for impl in IMPLS}
        times = timer.time_interleaved(calls, "cpu", warmup=1, reps=reps, abba=True)
        del calls
        for impl in IMPLS:
            peak = memory.measure_peak_extra("bench_seq2seq:memory_step", {"name": name, "impl": impl, "tiny": args.quick})
            median = statistics.median(times[impl]) / 1e3
            rows.append({"model": name, "impl": impl, **shape, "seconds": [t / 1e3 for t in times[impl]],
                         "median_s": median, "tokens_per_s": tokens / median, "peak_mb": peak / 1e6})
            print(f"  {name}/{impl}: {tokens / median:.0f} tokens/s, {peak / 1e6:.0f} MB", flush=True)

    def vs_peft(r, key):
        peft = next(p for p in rows if p["model"] == r["model"] and p["impl"] == "peft")
        return "" if r["impl"] == "peft" or peft[key] <= 0 else f"{r[key] / peft[key]:.2f}x"

    md = "\n".join([
        "# Encoder-decoder prefix tuning, one training step (CPU, float32)", "",
        f"{provenance.describe(env)}; B = {shape['batch']}, source {shape['source']}, target {shape['target']}, "
        f"P = {shape['prefix']}; medians of {reps} interleaved rounds. `benchmarks/bench_seq2seq.py` says what each "
        "row runs.", "",
        report.markdown_table(rows, [("model", lambda r: r["model"]), ("impl", lambda r: r["impl"]),
                                     ("tokens/s", lambda r: f"{r['tokens_per_s']:.0f}"),
                                     ("step (s, median)", lambda r: f"{r['median_s']:.3f}"),
                                     ("peak memory (MB)", lambda r: f"{r['peak_mb']:.0f}"),
                                     ("tokens/s vs PEFT", lambda r: vs_peft(r, "tokens_per_s")),
                                     ("memory vs PEFT", lambda r: vs_peft(r, "peak_mb"))])])
    print(md)
    if not args.no_save and not args.quick:
        meta = {"benchmark": "seq2seq", "environment": env, "commit": env["commit"], "date": env["date"],
                "shape": shape, "reps": reps}
        paths = report.write(args.out or provenance.results_dir("cpu"), "seq2seq", {"meta": meta, "rows": rows}, md)
        print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
