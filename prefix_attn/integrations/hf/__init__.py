"""The Hugging Face integration: prefix tuning and prompt tuning of transformers models, attention
run by prefix_attn. Its public paths are prefix_attn.integrations.transformers (prefix tuning)
and prefix_attn.integrations.prompt_tuning (prompt tuning); this package holds the code, one
module per job. Importing it imports nothing; its modules need transformers.

Module map (each module imports only those above it, and none of another's private names):

    _state.py     what the modules share: the attention kwargs and attributes they agree on,
                  PrefixSource (the protocol of the trainable thing attached to a model, which
                  PrefixEncoder and SoftPrompt implement), Geometry, PrefixTuning (what was
                  changed on a model) and how to find it from any model or PEFT wrapper
    t5.py         T5 and its kin: the relative position bias, and the prefix keys' own bias
    roberta.py    RoBERTa and its kin: positions that count real tokens past the padding
    bart.py       BART and its kin: positions shifted inside the stack's position embedding
    attention.py  the attention function and the mask function, and their registration
    geometry.py   layers, KV heads and head dim; encoder-decoder attention sites
    head.py       the task head that trains with the prefix (P-Tuning v2)
    quantized.py  quantized bases marked as adapter-trained for the HF Trainer
    refusals.py   the models refused at the call, with one line that says why
    hooks.py      what runs every forward call: the stacks' pre-hook, the generate wrapper
    attach.py     add_prefix_tuning / remove_prefix_tuning; attach(), the same for any PrefixSource
    io.py         save_prefix / load_prefix (prefix_attn's own files), init_prefix_from_text
    peft_io.py    PEFT prefix-tuning adapters: load_peft_prefix / save_peft_prefix
    prompt.py     prompt tuning and P-tuning: SoftPrompt, add_prompt_tuning, PEFT prompt adapters

How it plugs in (one generic path for every model that uses transformers' AttentionInterface):

- The model's `config._attn_implementation` becomes "prefix_attn", a name registered in
  transformers' `AttentionInterface` (the attention function) and `AttentionMaskInterface`
  (the mask function; without one, transformers hands a custom attention attention_mask=None
  and padding would be lost).
- A forward pre-hook on the decoder (`model.base_model`) runs the PrefixSource once per
  forward call and passes the per-layer prefixes down as an attention kwarg, `prefix_attn_kv`;
  transformers forwards such kwargs to every attention call. The hook also checks and forwards
  `prefix_index` (multi-task batches) and shifts the positions (`position_offset`).
- The attention function calls `prefix_attn.prefix_attention` with the layer's prefix: the
  prefix is never expanded over the batch, never concatenated, never stored in the KV cache.
  Decoding attends to [prefix ; cache] in the kernel: causal masking there is bottom-right
  aligned, which is what a KV cache needs.
- The mask function hands over the 2-D padding mask [B, Nk] when the mask is the plain causal
  one over a cache that starts at 0 (the usual case), the padding as one row [B, 1, 1, Nk] when
  it is the plain bidirectional one (encoders, cross-attention), and otherwise the full boolean
  mask (sliding windows, static caches, packed sequences), in which case causal is off.

Encoder-decoder models (BART, T5 and their kin): a prefix per attention module, for the
encoder's self-attention, the decoder's self-attention and its cross-attention (`sites`), a hook
on each stack, the slot of each attention module written on it (`prefix_slot`), BART's positions
shifted by a hook on its position embeddings (bart.py), and T5's relative position bias given to
the prefix keys (t5.py).

Everything here is undone by `remove_prefix_tuning(model)`. The only global change is the
registration of the new name "prefix_attn" with the two interfaces; it is removed again when
no model uses it. Positions: with position_offset=True (the default) the real tokens take
positions P, P+1, ... as in PEFT (whose prefix sits in the KV cache as P past tokens), so
adapters trained with PEFT give the same logits; with position_offset=False they start at 0.
"""
