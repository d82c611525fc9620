"""Prompt tuning (Lester et al. 2021) and P-tuning for causal decoders, run through the prefix kernel.

    from prefix_attn.integrations.prompt_tuning import add_prompt_tuning, export_prompt_as_prefix
    model = add_prompt_tuning(model, num_virtual_tokens=64, init_text="Answer briefly.", tokenizer=tok)
    loss = model(input_ids, attention_mask=mask, labels=labels).loss   # only the soft prompt trains
    model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    export_prompt_as_prefix(model)    # after training: a fixed prefix, served as cheaply as prefix tuning

This module is the public path; the code, and why it is cheaper than prepending the prompt to
every row, is in prefix_attn.integrations.hf.prompt.
"""
from __future__ import annotations

# The public names, from the modules they live in (re-exports, hence the noqa).
from .hf._state import KV_SINK_KWARG  # noqa: F401
from .hf.attach import add_prefix_tuning, prefix_disabled, remove_prefix_tuning  # noqa: F401
from .hf.prompt import (SoftPrompt, add_prompt_tuning, export_prompt_as_prefix, get_soft_prompt,  # noqa: F401
                        load_peft_prompt, prompt_prefix_table, remove_prompt_tuning, save_peft_prompt)

__all__ = ["SoftPrompt", "add_prompt_tuning", "remove_prompt_tuning", "get_soft_prompt", "export_prompt_as_prefix",
           "load_peft_prompt", "save_peft_prompt"]
