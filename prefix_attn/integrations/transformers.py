"""Prefix tuning for Hugging Face transformers models, with attention run by prefix_attn.

    from prefix_attn.integrations.transformers import add_prefix_tuning
    model = add_prefix_tuning(model, num_virtual_tokens=64)   # same model, modified in place
    loss = model(input_ids, attention_mask=mask, labels=labels).loss   # only the prefix trains
    model.generate(input_ids, attention_mask=mask, max_new_tokens=32)

This module is the public path of the integration; the code lives in prefix_attn.integrations.hf,
one module per job (its __init__ has the map, and how the integration plugs into transformers).
"""
from __future__ import annotations

# The public names, from the modules they live in (re-exports, hence the noqa).
from ..prefix_encoder import PrefixEncoder  # noqa: F401  (what add_prefix_tuning attaches)
from .hf._state import (ATTN_IMPLEMENTATION, ENCODER_DECODER_SITES, KV_SINK_KWARG,  # noqa: F401
                        NO_PREFIX, PREFIX_KWARG)
from .hf.attach import add_prefix_tuning, get_prefix_encoder, prefix_disabled, remove_prefix_tuning  # noqa: F401
from .hf.attention import prefix_attention_forward, prefix_attention_mask, prefix_slot  # noqa: F401
from .hf.geometry import ENCODER_DECODER_MODEL_TYPES  # noqa: F401
from .hf.head import TASK_HEADS  # noqa: F401
from .hf.io import (CONFIG_NAME, FORMAT_NAME, FORMAT_VERSION, HEAD_PREFIX, WEIGHTS_NAME,  # noqa: F401
                    init_prefix_from_text, load_prefix, save_prefix)
from .hf.peft_io import load_peft_prefix, read_peft_adapter, save_peft_prefix  # noqa: F401

__all__ = [
    "ATTN_IMPLEMENTATION", "add_prefix_tuning", "remove_prefix_tuning", "get_prefix_encoder", "prefix_disabled",
    "init_prefix_from_text", "save_prefix", "load_prefix", "load_peft_prefix", "save_peft_prefix",
    "prefix_attention_forward", "prefix_attention_mask",
]
