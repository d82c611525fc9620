"""Prefix tuning for Hugging Face transformers models, with attention run by prefix_attn.

    from prefix_attn.integrations.transformers import add_prefix_tuning
    model = add_prefix_tuning(model, num_virtual_tokens=64)   # same model, modified in place
    loss = model(input_ids, attention_mask=mask, labels=labels).loss   # only the prefix trains
    model.generate(input_ids, attention_mask=mask, max_new_tokens=32)

How it plugs in (one generic path for every model that uses transformers' AttentionInterface):

- The model's `config._attn_implementation` becomes "prefix_attn", a name registered in
  transformers' `AttentionInterface` (the attention function) and `AttentionMaskInterface`
  (the mask function; without one, transformers hands a custom attention attention_mask=None
  and padding would be lost).
- A forward pre-hook on the decoder (`model.base_model`) runs the PrefixEncoder once per
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
shifted by a hook on its position embeddings, and T5's relative position bias given to the prefix
keys (`_prefix_position_bias`, `_attend_with_prefix_bias`).

Everything here is undone by `remove_prefix_tuning(model)`. The only global change is the
registration of the new name "prefix_attn" with the two interfaces; it is removed again when
no model uses it. Positions: with position_offset=True (the default) the real tokens take
positions P, P+1, ... as in PEFT (whose prefix sits in the KV cache as P past tokens), so
adapters trained with PEFT give the same logits; with position_offset=False they start at 0.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import os
import types
import warnings
import weakref
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function, causal_mask_function,
                                       prepare_padding_mask, sdpa_mask)

from .. import __version__, _inputs
from ..backends import ENV_VAR, select_backend
from ..cascade import merge_attention_states
from ..functional import compute_dtype, prefix_attention
from ..prefix_encoder import PrefixEncoder

__all__ = [
    "ATTN_IMPLEMENTATION", "add_prefix_tuning", "remove_prefix_tuning", "get_prefix_encoder", "prefix_disabled",
    "init_prefix_from_text", "save_prefix", "load_prefix", "load_peft_prefix", "save_peft_prefix",
    "prefix_attention_forward", "prefix_attention_mask",
]

#: The name registered in transformers' AttentionInterface and AttentionMaskInterface.
ATTN_IMPLEMENTATION = "prefix_attn"
#: The attention kwarg that carries the per-layer prefixes from the decoder's hook to attention.
PREFIX_KWARG = "prefix_attn_kv"
#: An attention kwarg, a list with a slot per layer: attention stores each layer's (key, value)
#: there, as it attends to them (after rotary, with the KV cache). Prompt tuning's batch-1 pass
#: over the soft prompt collects its per-layer prefix this way (integrations/prompt_tuning.py).
KV_SINK_KWARG = "prefix_attn_kv_sink"

CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix_model.safetensors"
FORMAT_NAME = "prefix_attn.prefix_tuning"
#: 1: the prefix encoder's tensors; 2: also the trained task head's, named HEAD_PREFIX + the name in
#: the model (written only when there is one, so files without a head stay readable by version 1).
FORMAT_VERSION = 2
HEAD_PREFIX = "task_head."

#: The attribute add_prefix_tuning writes on each attention module of an encoder-decoder model:
#: the index of its prefix in the per-layer list (see prefix_slot).
_SLOT_ATTR = "_prefix_attn_slot"
#: Where an encoder-decoder model can take a prefix: the encoder's self-attention, the decoder's
#: self-attention (causal) and the decoder's cross-attention. Li & Liang prefix all three.
ENCODER_DECODER_SITES = ("encoder", "decoder", "cross")
#: The sites of PEFT's encoder-decoder prefix tuning (SEQ_2_SEQ_LM), as PEFT 0.21 runs under
#: transformers 5: it builds the cross-attention prefix too, then discards it (it resets the
#: cross-attention cache), and the encoder never had one.
_PEFT_SITES = ("decoder",)


def _peft_seq2seq_layers(num_layers: int) -> list:
    """For each decoder layer l, the layer of a PEFT SEQ_2_SEQ_LM adapter's table its self-attention
    reads: 2 l mod L, not l. PEFT 0.21 views the table [P, L * 2, H, D], concatenates it with itself
    along the layer axis (meant for the cross-attention copy) and hands decoder layer l the
    (key, value) pair at rows 4 l, 4 l + 1 of that; rows 4 l + 2, 4 l + 3 go to the cross-attention
    cache, which it then resets. So with an even L, decoder layers l and l + L / 2 share a prefix
    and half the table is never read (measured against PEFT: tests/integrations/test_hf_encdec.py)."""
    return [(2 * layer) % num_layers for layer in range(num_layers)]


#: prefix_slot's answer for an attention module without a prefix.
NO_PREFIX = -1

# Attention kwargs some models pass that change the math and that the kernel does not implement.
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks")
#: An attention kwarg for T5 and its kin: the number of tokens in the self-attention cache before
#: this call, which places the queries (StaticCache keys span the whole buffer, not that count).
_PAST_KWARG = "prefix_attn_past"
#: The attribute add_prefix_tuning writes on each attention module of T5 and its kin: the module
#: whose relative-position embedding gives its prefix keys their bias (None: cross-attention, which
#: has no position bias).
_BIAS_ATTR = "_prefix_attn_bias_owner"


# ----------------------------------------------------------------------------------------------
# The attention function and the mask function


def prefix_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                             dropout: float = 0.0, **kwargs):
    """transformers AttentionInterface function: attention over [prefix ; key/value].

    query [B, Hq, Nq, D], key / value [B, Hkv, Nk, D] (the KV cache included, the prefix not);
    attention_mask is what `prefix_attention_mask` made: None, a bool padding mask [B, Nk]
    (causal attention over it, if the module is causal), a bool [B, 1, 1, Nk] (one row of keys for
    every query: key padding, nothing causal) or a full mask [B, 1 or Hq, Nq, Nk] (bool or
    additive float). T5's `position_bias` is added to the scores, and the prefix keys get theirs.
    The layer's prefix comes from kwargs[PREFIX_KWARG][module.layer_idx], the task ids from
    kwargs["prefix_index"]. `dropout` is the model's attention dropout (0 in eval): it drops
    prefix and sequence probabilities alike. Returns (out [B, Nq, Hq, D], None): no attention
    weights.
    """
    layers = kwargs.get(PREFIX_KWARG)
    if layers is None:
        raise RuntimeError(
            f"prefix_attn: the attention of {type(module).__name__} ran without its prefix. Attention "
            f"implementation {ATTN_IMPLEMENTATION!r} is set by add_prefix_tuning, whose hook on the decoder passes "
            f"the prefix as the attention kwarg {PREFIX_KWARG!r}; this model did not forward it to its attention")
    for name in _UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"prefix_attn: attention with {name}={kwargs[name]!r} is not supported")
    sink = kwargs.get(KV_SINK_KWARG)
    if sink is not None:
        sink[module.layer_idx] = (key, value)
    prefix_k = prefix_v = None
    slot = prefix_slot(module) if len(layers) else NO_PREFIX  # an empty tuple: switched off (prefix_disabled)
    if slot != NO_PREFIX:
        if slot is None or not 0 <= slot < len(layers):
            raise RuntimeError(f"prefix_attn: {type(module).__name__} reads prefix layer {slot!r} (its layer_idx, or "
                               f"its encoder-decoder slot), but the prefix has {len(layers)} layers")
        prefix_k, prefix_v = layers[slot]
        if prefix_k.dtype != query.dtype:  # e.g. a float32 prefix in a bfloat16 model
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)

    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    key_padding_mask = attn_mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            key_padding_mask = attention_mask
        elif attention_mask.dtype == torch.bool and attention_mask.shape[1:3] == (1, 1):
            # One row of keys for every query (prefix_attention_mask's bidirectional padding, or a
            # full mask of a single query): key padding, nothing causal.
            key_padding_mask, causal = attention_mask[:, 0, 0, : key.shape[-2]], False
        else:
            # A full mask already holds the causal structure (and sliding windows etc.).
            attn_mask = attention_mask[..., : key.shape[-2]]
            causal = False
    position_bias = kwargs.get("position_bias")
    prefix_bias = None
    if position_bias is not None:  # T5: a relative position bias, added to the scores
        attn_mask = _with_position_bias(module, position_bias[..., : key.shape[-2]], attn_mask)
        if prefix_k is not None:
            past = kwargs.get(_PAST_KWARG)
            prefix_bias = _prefix_position_bias(module, query.shape[2], key.shape[2] - query.shape[2]
                                                if past is None else past, prefix_k.shape[-2], query.device)
    dtype = compute_dtype(query)  # autocast's, inside an autocast region (query may be float32 there)
    if torch.compiler.is_compiling():
        backend = _compiled_backend(query.device.type, dtype)
    else:
        backend = _backend_for(query.device.type, dtype, os.environ.get(ENV_VAR))
    B, Hq, Nq, D = query.shape
    Hkv = key.shape[1]
    if prefix_bias is not None:
        out = _attend_with_prefix_bias(query, key, value, prefix_k, prefix_v, prefix_bias, kwargs.get("prefix_index"),
                                       causal=causal, softmax_scale=scaling, key_padding_mask=key_padding_mask,
                                       attn_mask=attn_mask, dropout_p=float(dropout or 0.0), backend=backend)
        return out.transpose(1, 2), None
    grouped = Nq == 1 and attn_mask is None and Hq != Hkv
    if grouped:
        # Decoding one token per row: the query heads sharing a KV head become that head's queries
        # (heads h of KV head h // (Hq / Hkv), as repeat_kv). One query position masks nothing
        # causally, so the math is the same, and the kernel reads each KV head once, not Hq / Hkv times.
        query, causal = query.reshape(B, Hkv, Hq // Hkv, D), False
    out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal, softmax_scale=scaling,
                           key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                           prefix_index=kwargs.get("prefix_index") if prefix_k is not None else None,
                           dropout_p=float(dropout or 0.0),
                           backend=backend)
    if grouped:
        out = out.reshape(B, Hq, Nq, D)
    return out.transpose(1, 2), None


def prefix_slot(module: nn.Module) -> Optional[int]:
    """Which entry of the per-layer prefix list an attention module reads: NO_PREFIX (-1) for
    none, None if the module does not say.

    Decoder-only and encoder-only models: the module's layer_idx. Encoder-decoder models, whose
    encoder self-attention, decoder self-attention and decoder cross-attention share layer
    indices: the slot add_prefix_tuning wrote on each attention module (NO_PREFIX where that
    kind of attention has no prefix)."""
    if _SLOT_ATTR in module.__dict__:
        return module.__dict__[_SLOT_ATTR]
    return getattr(module, "layer_idx", None)


def _with_position_bias(module: nn.Module, bias: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
    """T5's relative position bias [1 or B, H, Nq, Nk] over the sequence keys, with the full mask
    (if any) folded in: the additive float attn_mask of prefix_attention."""
    owner = module.__dict__.get(_BIAS_ATTR)
    if owner is not None and owner.relative_attention_bias.weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"prefix_attn: {type(module).__name__}'s relative position bias requires grad (its embedding is "
            "trained); prefix_attention takes the bias as an additive mask, without a gradient. Freeze "
            "relative_attention_bias, as prefix tuning does")
    # Frozen embedding (or none: cross-attention's zeros), so nothing to differentiate; under
    # checkpointing T5 still marks the bias as requiring grad (a leaf of zeros, or a layer's output).
    bias = bias.detach()
    if attn_mask is None:
        return bias
    if attn_mask.dtype == torch.bool:
        return bias.masked_fill(~attn_mask, float("-inf"))
    return bias + attn_mask


def _prefix_position_bias(module: nn.Module, num_queries: int, past, P: int, device) -> Optional[Tensor]:
    """T5's relative position bias [1, H, Nq, P] of the prefix keys, or None where they have none.

    The prefix keys sit at positions 0 .. P-1, before the sequence (as PEFT's prefix does, as P past
    tokens of the cache): query i of a call after `past` cached tokens is at P + past + i, so prefix
    key j is P + past + i - j places back. Relative positions make this independent of
    position_offset. Cross-attention has no position bias."""
    if _BIAS_ATTR not in module.__dict__:
        raise NotImplementedError(
            f"prefix_attn: {type(module).__name__} passes a relative position bias, and prefix_attn does not know "
            "which bias its prefix keys should get (it knows T5's, set up by add_prefix_tuning)")
    owner = module.__dict__[_BIAS_ATTR]
    if owner is None:
        return None
    embedding = owner.relative_attention_bias
    where = embedding.weight.device
    queries = torch.arange(num_queries, device=where)[:, None] + (past + P)
    keys = torch.arange(P, device=where)[None, :]
    buckets = owner._relative_position_bucket(keys - queries, bidirectional=not owner.is_decoder,
                                              num_buckets=owner.relative_attention_num_buckets,
                                              max_distance=owner.relative_attention_max_distance)
    return embedding(buckets).permute(2, 0, 1).unsqueeze(0).detach().to(device)  # [1, H, Nq, P]


def _attend_with_prefix_bias(query, key, value, prefix_k, prefix_v, prefix_bias, prefix_index, *, causal,
                             softmax_scale, key_padding_mask, attn_mask, dropout_p, backend) -> Tensor:
    """Attention over [prefix ; sequence] where the prefix keys carry a bias of their own (T5's):
    the kernels take masks on the sequence keys only, so two calls, one over the sequence (its bias
    and masks as attn_mask), one over the prefix keys as a sequence (their bias as attn_mask), merged
    exactly by their log-sum-exps. Dropout stays exact: each call drops its own probabilities, and
    the merge rescales them by the same factors as the undropped softmax. The prefix call reads the
    prefix as [B, Hkv, P, D] (a broadcast view for a shared prefix; its gradient is summed over the
    rows by autograd, a [B, Hkv, P, D] tensor the fused path does not need)."""
    B = query.shape[0]
    if prefix_k.dim() == 3:  # shared by the batch
        keys, values = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
    elif prefix_index is not None:  # a bank
        keys, values = prefix_k[prefix_index], prefix_v[prefix_index]
    else:
        keys, values = prefix_k, prefix_v
    out_seq, lse_seq = prefix_attention(query, key, value, causal=causal, softmax_scale=softmax_scale,
                                        key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p,
                                        return_lse=True, backend=backend)
    out_pre, lse_pre = prefix_attention(query, keys, values, softmax_scale=softmax_scale, attn_mask=prefix_bias,
                                        dropout_p=dropout_p, return_lse=True, backend=backend)
    # out_seq's dtype: the calls', autocast's inside an autocast region, as torch's SDPA
    return merge_attention_states(out_seq, lse_seq, out_pre, lse_pre)[0]


@functools.lru_cache(maxsize=None)
def _backend_for(device_type: str, dtype: torch.dtype, env_override: Optional[str]) -> str:
    """The backend "auto" picks for these tensors, looked up once: resolving "auto" probes which
    backends exist on every call (~60 us, as long as a decode step's attention). The reference
    stays "auto", so that its fallback warning still fires. env_override (PREFIX_ATTN_BACKEND)
    is part of the key, so changing the variable changes the choice."""
    name = select_backend(torch.empty(0, device=device_type, dtype=dtype))
    return "auto" if name == "reference" else name


@torch._dynamo.assume_constant_result
def _compiled_backend(device_type: str, dtype: torch.dtype) -> str:
    # Resolving "auto" calls into the compiled extension (a pybind function dynamo cannot
    # trace); under torch.compile the choice is made at trace time and baked into the graph.
    return _backend_for(device_type, dtype, os.environ.get(ENV_VAR))


def prefix_attention_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                          mask_function=causal_mask_function, attention_mask: Optional[Tensor] = None, **kwargs):
    """transformers AttentionMaskInterface function for "prefix_attn".

    The plain causal mask over keys 0 .. kv_length-1, with the queries the last q_length of
    them (a dynamic cache, or no cache): the kernel's bottom-right aligned causal mask is exactly
    that, so only the padding is needed: the bool padding mask [B, kv_length], or None when
    nothing is padded.
    The plain bidirectional mask (encoders, cross-attention): the padding as [B, 1, 1, kv_length],
    one row for every query, or None when nothing is padded.
    Anything else (sliding windows, static caches, packed sequences, custom mask functions): the
    full bool mask [B, 1, q_length, kv_length] from transformers' sdpa_mask.
    """
    if (mask_function is causal_mask_function and not isinstance(q_offset, Tensor)
            and not isinstance(kv_offset, Tensor) and kv_offset == 0 and q_offset + q_length == kv_length):
        return _padding_only(attention_mask, kv_length)
    if mask_function is bidirectional_mask_function and not isinstance(kv_offset, Tensor) and kv_offset == 0:
        # Encoders and cross-attention: every query sees every real key. One row for all queries,
        # which the attention function reads as key padding without causal masking.
        padding = _padding_only(attention_mask, kv_length)
        return None if padding is None else padding[:, None, None, :]
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def _padding_only(attention_mask: Optional[Tensor], kv_length: int) -> Optional[Tensor]:
    """The bool padding mask [B, kv_length] of HF's attention_mask, or None when nothing is padded.

    No padding at all: no mask (the kernels skip the per-key test), as transformers' own sdpa
    does. Only where asking is free: not while compiling (a data-dependent branch), and not on
    CUDA, where reading the answer back would synchronise every step (and keep it out of a CUDA
    graph); the kernels test the all-True mask instead."""
    if attention_mask is None:
        return None
    padding = prepare_padding_mask(attention_mask, kv_length, 0)[:, :kv_length]
    if _inputs._host_reads_are_free(padding) and not torch.compiler.is_compiling() and bool(padding.all()):
        return None
    return padding


# The prefix tunings (one per model, copies included) using the registered name; weak, so that a
# model dropped without remove_prefix_tuning does not keep the name registered forever.
_users: "weakref.WeakSet" = weakref.WeakSet()


def _register(user) -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_attention_mask)
    _users.add(user)


def _unregister(user) -> None:
    _users.discard(user)
    if not _users:
        AttentionInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
        AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)


# ----------------------------------------------------------------------------------------------
# Model geometry


@dataclass(frozen=True)
class _Geometry:
    num_layers: int  # prefixed attention modules: the layers, or for encoder-decoders the slots
    num_kv_heads: int
    head_dim: int
    model_type: str
    sites: Tuple[str, ...] = ()  # encoder-decoder models: the attentions with a prefix; () otherwise


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(_hf_model(model).config, "is_encoder_decoder", False))


def _geometry(model: nn.Module, sites=None) -> _Geometry:
    """Layers, KV heads and head dim of the model's attention, from its config, checked against
    its attention modules (GQA and head_dim != hidden / heads are the usual traps). For an
    encoder-decoder model, of the attention at `sites` (see ENCODER_DECODER_SITES)."""
    model = _hf_model(model)
    config = _text_config(model)
    if _is_encoder_decoder(model):
        return _encoder_decoder_geometry(model, sites)
    if sites is not None:
        raise ValueError(f"prefix_attn: sites={sites!r} is for encoder-decoder models (it picks among "
                         f"{ENCODER_DECODER_SITES}); {type(model).__name__} has one attention per layer")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    geometry = _Geometry(config.num_hidden_layers, kv_heads, head_dim, getattr(config, "model_type", ""))
    seen = set()
    for name, module in model.named_modules():
        k_proj = getattr(module, "k_proj", None)
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(k_proj, nn.Linear) or layer_idx is None:
            continue
        seen.add(layer_idx)
        module_dim = getattr(module, "head_dim", head_dim)
        if module_dim != head_dim or k_proj.out_features != kv_heads * head_dim:
            raise ValueError(
                f"prefix_attn: {name} has head_dim {module_dim} and k_proj out_features {k_proj.out_features}, but "
                f"the config says {kv_heads} KV heads of dim {head_dim}; layers of different shapes are not supported")
    if seen and seen != set(range(geometry.num_layers)):
        raise ValueError(f"prefix_attn: the model's attention layers have layer_idx {sorted(seen)}, expected "
                         f"0 .. {geometry.num_layers - 1}")
    return geometry


# Encoder-decoder models: where each kind of attention module sits in its layer (BART and its kin;
# T5 and its kin).
_SELF_ATTENTION_NAMES = ("self_attn", "SelfAttention")
_CROSS_ATTENTION_NAMES = ("encoder_attn", "EncDecAttention")


def _check_sites(sites) -> Tuple[str, ...]:
    """sites as a tuple in ENCODER_DECODER_SITES' order; None means all three."""
    if sites is None:
        return ENCODER_DECODER_SITES
    given = (sites,) if isinstance(sites, str) else tuple(sites)
    unknown = [site for site in given if site not in ENCODER_DECODER_SITES]
    if unknown or not given or len(set(given)) != len(given):
        raise ValueError(f"prefix_attn: sites must name one or more of {ENCODER_DECODER_SITES} (encoder "
                         f"self-attention, decoder self-attention, decoder cross-attention), each once; got {sites!r}")
    return tuple(site for site in ENCODER_DECODER_SITES if site in given)


#: Encoder-decoder model types whose attention this integration has been checked on: BART and T5 by
#: tests/integrations/test_hf_encdec.py; the others, which share BART's or T5's attention code, once
#: against the plain model with the prefix as P past tokens of the decoder's cache. Others are
#: refused by name: some build their attention outside transformers' AttentionInterface (LED,
#: PegasusX's encoder, FSMT), make their causal decoder's causality a mask of their own
#: (BigBirdPegasus, PegasusX), or number relative positions differently (UMT5).
ENCODER_DECODER_MODEL_TYPES = ("bart", "mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "plbart",
                               "m2m_100", "t5", "mt5", "switch_transformers")


def _stacks(model: nn.Module) -> Dict[str, nn.Module]:
    """{"encoder": the encoder stack, "decoder": the decoder stack} of an encoder-decoder model."""
    model = _hf_model(model)
    return {"encoder": model.get_encoder(), "decoder": model.get_decoder()}


def _encoder_decoder_attention(model: nn.Module) -> Dict[str, list]:
    """The attention modules of an encoder-decoder model, by site, in layer order: one per layer
    of its stack, or NotImplementedError naming what was not found."""
    found = {site: [] for site in ENCODER_DECODER_SITES}
    expected = {}
    for stack_name, stack in _stacks(model).items():
        layers = getattr(stack, "layers", None) or getattr(stack, "block", None)
        expected[stack_name] = len(layers) if layers is not None else None
        for name, module in stack.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _SELF_ATTENTION_NAMES:
                found[stack_name].append((f"{stack_name}.{name}", module))
            elif leaf in _CROSS_ATTENTION_NAMES and stack_name == "decoder":
                found["cross"].append((f"{stack_name}.{name}", module))
    expected["cross"] = expected["decoder"]
    wrong = {site: len(found[site]) for site in ENCODER_DECODER_SITES
             if expected[site] is None or len(found[site]) != expected[site]}
    if wrong:
        raise NotImplementedError(
            f"prefix_attn: {type(_hf_model(model)).__name__} is an encoder-decoder model whose attention modules were "
            f"not found, one per layer, as {_SELF_ATTENTION_NAMES} (self) and {_CROSS_ATTENTION_NAMES} (cross): "
            f"found {wrong} where its stacks have {expected} layers")
    return found


def _attention_shape(name: str, module: nn.Module) -> Tuple[int, int]:
    """(heads, head dim) of an attention module with a k_proj (BART) or k (T5) projection."""
    head_dim = getattr(module, "head_dim", None) or getattr(module, "key_value_proj_dim", None)
    k_proj = getattr(module, "k_proj", None) or getattr(module, "k", None)
    if not isinstance(k_proj, nn.Linear) or not head_dim:
        raise NotImplementedError(f"prefix_attn: cannot read the heads and head dim of {name} "
                                  f"({type(module).__name__}): no k_proj / k linear layer and head_dim")
    return k_proj.out_features // head_dim, head_dim


def _encoder_decoder_geometry(model: nn.Module, sites) -> _Geometry:
    sites = _check_sites(sites)
    model_type = getattr(_text_config(model), "model_type", "")
    if model_type not in ENCODER_DECODER_MODEL_TYPES:
        raise NotImplementedError(
            f"prefix_attn: {type(model).__name__} (model_type {model_type!r}) is an encoder-decoder model this "
            f"integration has not been checked on; supported: {', '.join(ENCODER_DECODER_MODEL_TYPES)}")
    attention = _encoder_decoder_attention(model)
    for site, modules in attention.items():  # the kernels' causal flag comes from is_causal
        for name, module in modules:
            if bool(getattr(module, "is_causal", None)) != (site == "decoder"):
                raise NotImplementedError(
                    f"prefix_attn: {name} ({type(module).__name__}) has is_causal="
                    f"{getattr(module, 'is_causal', None)!r}, but as the {site} attention it should be "
                    f"{site == 'decoder'}: its causality would be lost or invented")
    shapes = {}
    for site in sites:
        for name, module in attention[site]:
            shapes.setdefault(_attention_shape(name, module), []).append(name)
    if len(shapes) != 1:
        described = "; ".join(f"{heads} heads of dim {dim}: {names[0]} and {len(names) - 1} more"
                              for (heads, dim), names in shapes.items())
        raise ValueError(f"prefix_attn: one prefix table needs the same heads and head dim in every prefixed "
                         f"attention, but the attention at sites {sites} has {described}; choose sites that agree")
    (heads, head_dim), = shapes
    return _Geometry(sum(len(attention[site]) for site in sites), heads, head_dim,
                     getattr(_text_config(model), "model_type", ""), sites)


# ----------------------------------------------------------------------------------------------
# Attaching and removing


@dataclass(eq=False)  # compared and hashed by identity: _users holds it weakly
class _PrefixTuning:
    """What add_prefix_tuning changed on a model, so remove_prefix_tuning can undo it."""
    encoder: PrefixEncoder
    position_offset: bool
    geometry: _Geometry
    previous_attn_implementation: Optional[str]
    previous_requires_grad: Dict[str, bool]
    hooks: list = field(default_factory=list)  # forward pre-hooks on the stacks (and position embeddings)
    slotted: list = field(default_factory=list)  # attention modules given a prefix slot (encoder-decoders)
    relative_bias: bool = False  # T5 and its kin: the hooks pass the cache length (_PAST_KWARG)
    enabled: bool = True
    generate_index: Optional[Tensor] = None  # prefix_index of the running model.generate
    wrapped_generate: bool = False
    head: Tuple[str, ...] = ()  # the task head's parameters, trained with the prefix (names in the model)
    marked: bool = False  # a quantized base, marked as adapter-trained for the Trainer (_ADAPTER_MARKER)

    def __deepcopy__(self, memo):
        # copy.deepcopy(model) copies this with the model: the copy uses the registered name too,
        # and must keep it registered after the original's remove_prefix_tuning.
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for f in fields(self):
            setattr(copied, f.name, copy.deepcopy(getattr(self, f.name), memo))
        _users.add(copied)
        return copied


_STATE_ATTR = "_prefix_attn_tuning"


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel -> LoraModel -> model), else model.

    Prefix tuning always lives on the transformers model itself, so that a LoRA model can get a
    prefix, and a prefix-tuned model can get LoRA, in either order."""
    if isinstance(model, PreTrainedModel):
        return model
    get_base_model = getattr(model, "get_base_model", None)  # peft.PeftModel's
    return get_base_model() if callable(get_base_model) else model


def _has_peft_adapters(model: nn.Module, hf_model: nn.Module) -> bool:
    """A PeftModel wrapper, or a transformers model with adapters injected (model.add_adapter)."""
    return hf_model is not model or bool(getattr(hf_model, "_hf_peft_config_loaded", False))


def _state(model: nn.Module) -> Optional[_PrefixTuning]:
    return _hf_model(model).__dict__.get(_STATE_ATTR)


def _require_state(model: nn.Module, what: str) -> _PrefixTuning:
    state = _state(model)
    if state is None:
        raise ValueError(f"prefix_attn: {what} needs a model prepared with add_prefix_tuning")
    return state


def get_prefix_encoder(model: nn.Module) -> Optional[PrefixEncoder]:
    """The PrefixEncoder add_prefix_tuning attached to model, or None."""
    state = _state(model)
    return None if state is None else state.encoder


@contextlib.contextmanager
def prefix_disabled(model: nn.Module):
    """Within the block the model runs without its prefix, as the base model (positions from 0),
    still through prefix_attn's kernels. E.g. to compare generations before and after tuning."""
    state = _require_state(model, "prefix_disabled")
    previous, state.enabled = state.enabled, False
    try:
        yield model
    finally:
        state.enabled = previous


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
        except (ValueError, KeyError, ImportError) as exc:
            raise ValueError(f"prefix_attn: {type(model).__name__} refused attention implementation {name!r}: {exc}")
    if model.config._attn_implementation != name:  # older models, or no setter
        model.config._attn_implementation = name
    text_config = _text_config(model)
    if text_config is not model.config and text_config._attn_implementation != name:
        text_config._attn_implementation = name


def _as_prefix_index(index, num_tasks: int, batch: int, device: torch.device,
                     from_generate: bool = False) -> Optional[Tensor]:
    """Checks prefix_index's type and shape against the batch; an int means every row. from_generate:
    generate() may have expanded each input row into several adjacent rows (beams, samples)."""
    if num_tasks == 1:
        if index is not None:
            raise ValueError("prefix_attn: prefix_index was given, but the prefix has a single task (num_tasks=1); "
                             "use add_prefix_tuning(..., num_tasks=T) for one prefix per task")
        return None
    if index is None:
        raise ValueError(f"prefix_attn: prefix_index is required: the prefix is a bank of num_tasks={num_tasks} "
                         "prefixes; pass model(..., prefix_index=task_ids) (or model.generate(..., "
                         "prefix_index=task_ids)) with one task id per row")
    if not isinstance(index, Tensor):
        index = torch.as_tensor(index)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"prefix_attn: prefix_index must hold integer task ids, got dtype {index.dtype}")
    if index.dim() == 0:
        index = index.expand(batch)
    expanded = from_generate and index.dim() == 1 and 0 < index.shape[0] < batch and batch % index.shape[0] == 0
    if index.dim() != 1 or (index.shape[0] != batch and not expanded):
        raise ValueError(f"prefix_attn: prefix_index must have shape [B] = [{batch}] (one task id per row), got "
                         f"{list(index.shape)}")
    if expanded:  # num_beams * num_return_sequences adjacent rows per input row
        index = index.repeat_interleave(batch // index.shape[0])
    # Its values are checked against the bank of num_tasks entries by the attention ops that
    # index it, in every layer: on CPU exactly, on CUDA without a host synchronisation (a read
    # here would cost one per step, and keep the step out of a CUDA graph).
    return index.to(device=device, dtype=torch.int64)


def _stack_pre_hook(state: _PrefixTuning, positions: bool, module: nn.Module, args, kwargs):
    """Before a decoder (or encoder) stack runs: its attention's prefixes, the checked task ids and,
    where `positions` (decoder-only and encoder-only models), the positions shifted by P."""
    if args:  # bind positional arguments to their names so they can be read and replaced
        names = [n for n, p in inspect.signature(module.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kwargs = {**dict(zip(names, args)), **kwargs}
        args = ()
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("prefix_attn: the decoder got neither input_ids nor inputs_embeds")
    batch, length = inputs.shape[0], inputs.shape[1]

    index = kwargs.pop("prefix_index", None)
    if not state.enabled:
        kwargs[PREFIX_KWARG] = ()
        return args, kwargs
    from_generate = index is None and state.generate_index is not None
    if from_generate:
        index = state.generate_index
    index = _as_prefix_index(index, state.encoder.num_tasks, batch, inputs.device, from_generate)
    if index is not None:
        kwargs["prefix_index"] = index
    if _owns_fsdp_unit(state.encoder):
        # The pairs are views of the encoder's parameters, read by every layer's forward and
        # backward; FSDP2 would free an unit's gathered parameters as soon as its forward returns.
        # Kept until its backward instead (a few MB). In the root unit, the usual setup, they are.
        state.encoder.set_reshard_after_forward(False)
    kwargs[PREFIX_KWARG] = state.encoder()
    if not positions:
        if state.relative_bias:  # T5: where the queries sit, for the prefix keys' bias
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            # A StaticCache answers with a tensor it then advances in place as layers write to it
            kwargs[_PAST_KWARG] = past.clone() if isinstance(past, Tensor) else past
        return args, kwargs

    if (kwargs.get("attention_mask") is None and kwargs.get("position_ids") is None
            and kwargs.get("cache", kwargs.get("past_key_values")) is None):
        # With no mask, no positions and no cache, transformers searches the position ids for packed
        # sequences and reads the answer back: a host synchronisation on CUDA, every step.
        # Positions made from a range are never packed; an all-ones mask over the new tokens (all
        # the keys, with no cache) says so, gives the same attention, and skips that search.
        kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=inputs.device)
    if state.position_offset:
        P = state.encoder.num_virtual_tokens
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = _padding_aware_positions(module, kwargs.get("input_ids"), past + P, length, inputs.device)
            if position_ids is None:
                position_ids = torch.arange(past, past + length, device=inputs.device).unsqueeze(0) + P
        else:
            position_ids = position_ids + P
        # PEFT's prefix is P tokens already in the cache, so its real tokens sit at P, P+1, ...
        kwargs["position_ids"] = position_ids
    return args, kwargs


def _position_shift_hook(state: _PrefixTuning, module: nn.Module, args, kwargs):
    """Before an encoder-decoder stack's position embedding (BART and its kin, which compute positions
    inside the stack, from the cache length): positions shifted by P, as if the prefix were P past
    tokens. Binds (input_ids, cache length, position_ids) by name; the cache length's name varies."""
    if not state.enabled:
        return args, kwargs
    names = list(inspect.signature(module.forward).parameters)
    kwargs = {**dict(zip(names, args)), **kwargs}
    P = state.encoder.num_virtual_tokens
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + P
    else:
        length = next(name for name in _CACHE_LENGTH_NAMES if name in names)
        kwargs[length] = kwargs.get(length, 0) + P
    return (), kwargs


#: What position embeddings of encoder-decoder models call the number of tokens before the first.
_CACHE_LENGTH_NAMES = ("cache_length", "past_key_values_length", "past_length")


def _padding_aware_positions(module: nn.Module, input_ids: Optional[Tensor], past: int, length: int,
                             device: torch.device) -> Optional[Tensor]:
    """Positions by the model's own rule where it numbers real tokens past the padding (RoBERTa
    and its kin: padding_idx + 1 + the token's rank among the row's real tokens), shifted by
    `past` tokens, as that rule does for a cache; None for models that count 0, 1, ..."""
    embeddings = getattr(module, "embeddings", None)
    rule = getattr(embeddings, "create_position_ids_from_input_ids", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if rule is None or padding_idx is None:
        return None
    if input_ids is None:  # inputs_embeds: the rule counts every token as real
        return torch.arange(past, past + length, device=device).unsqueeze(0) + padding_idx + 1
    return rule(input_ids, padding_idx, past)


def _owns_fsdp_unit(module: nn.Module) -> bool:
    """Whether fully_shard (FSDP2) made `module` an FSDP unit of its own."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _own_config(model: nn.Module, outer: nn.Module) -> list:
    """Give the model a config object of its own, shared by its submodules (and a PEFT wrapper,
    `outer`) as the old one was; returns what was replaced, [(module, attribute, old config)], to
    undo it.

    transformers reads the attention implementation from the config at every forward, and models
    built from one config object share it: switching it in place would switch every such model to
    "prefix_attn", whose attention fails without the hook. The copy stays with the model after
    remove_prefix_tuning (with the previous implementation), so whatever was set on model.config
    in the meantime is kept. copy.deepcopy(model), FSDP and save_pretrained see an ordinary config."""
    memo: dict = {}
    copy.deepcopy(model.config, memo)  # memo: id of the config and of each sub-config -> its copy
    replaced = []
    for module in {id(m): m for m in (*outer.modules(), *model.modules())}.values():
        for attr, value in list(module.__dict__.items()):
            if isinstance(value, PretrainedConfig) and isinstance(memo.get(id(value)), PretrainedConfig):
                replaced.append((module, attr, value))
                module.__dict__[attr] = memo[id(value)]
    return replaced


#: The model classes whose task head trains with the prefix by default (P-Tuning v2), by how their
#: class name ends, and the submodules one of which is their output layer: the modules_to_save of
#: PEFT's SEQ_CLS, TOKEN_CLS and QUESTION_ANS task types.
TASK_HEADS = {"ForSequenceClassification": ("classifier", "score"),
              "ForTokenClassification": ("classifier", "score"),
              "ForQuestionAnswering": ("qa_outputs",)}


def _task_head(model: nn.Module) -> Tuple[str, ...]:
    """The submodules of model that make its task head (everything outside the pretrained base
    model: e.g. BERT's `classifier`, RoBERTa's `classifier` (dense + out_proj), Llama's `score`,
    `qa_outputs`); () for a model with no task head (language models: their lm_head is part of
    the pretrained model). NotImplementedError for a task model whose head is not recognised."""
    kind = next((kind for kind in TASK_HEADS if type(model).__name__.endswith(kind)), None)
    if kind is None:
        return ()
    base = getattr(model, "base_model", model)
    modules = tuple(name for name, child in model.named_children()
                    if child is not base and name != "prefix_encoder" and next(child.parameters(), None) is not None)
    if base is model or not any(name in TASK_HEADS[kind] for name in modules):
        raise NotImplementedError(
            f"prefix_attn: cannot find the task head of {type(model).__name__}: expected one of "
            f"{TASK_HEADS[kind]} beside its base model, found {list(modules)}; pass train_head=False to "
            "train the prefix alone")
    return modules


def _head_parameters(model: nn.Module, modules: Tuple[str, ...]) -> Dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.split(".", 1)[0] in modules}


#: transformers' marker of a model with trainable adapters attached (its PEFT integration sets it
#: in add_adapter / load_adapter). The Trainer refuses to train a quantized model without it
#: (trainer_utils.validate_quantization_for_training). A prefix-tuned model is such a model: its
#: frozen base never changes. add_prefix_tuning sets it on quantized bases only.
_ADAPTER_MARKER = "_hf_peft_config_loaded"
#: The PreTrainedModel methods that read the marker as "PEFT adapters are in model.peft_config"
#: (transformers 5.24): saving only the adapters, the adapter API, and enabling input grads for
#: checkpointing. While the model has no PEFT adapters, they run with the marker hidden, as on
#: the model without prefix tuning. tests/integrations/test_hf_quantized.py checks the list
#: against transformers' source.
_MARKER_READERS = ("save_pretrained", "_activation_checkpointing_enable", "_activation_checkpointing_disable",
                   "load_adapter", "add_adapter", "set_adapter", "disable_adapters", "enable_adapters",
                   "active_adapters", "get_adapter_state_dict", "delete_adapter")


def _marker_hidden_call(name: str, self: nn.Module, *args, **kwargs):
    """model.<name>(...) as on the model without the marker, unless PEFT adapters were added."""
    hide = not getattr(self, "peft_config", None)
    if hide:
        self.__dict__.pop(_ADAPTER_MARKER, None)  # the class default, False, shows
    try:
        return getattr(type(self), name)(self, *args, **kwargs)
    finally:
        state = _state(self)
        if state is not None and state.marked:
            self.__dict__[_ADAPTER_MARKER] = True


def _mark_adapter_trained(model: nn.Module, state: _PrefixTuning) -> None:
    if not getattr(model, "is_quantized", False) or getattr(model, _ADAPTER_MARKER, False):
        return  # not quantized (the Trainer asks nothing), or PEFT adapters marked it already
    model.__dict__[_ADAPTER_MARKER] = True
    state.marked = True
    for name in _MARKER_READERS:
        if callable(getattr(type(model), name, None)) and name not in model.__dict__:
            # Bound methods (not closures), so that copy.deepcopy(model) rebinds them to the copy.
            model.__dict__[name] = types.MethodType(functools.partial(_marker_hidden_call, name), model)


def _unmark_adapter_trained(model: nn.Module, state: _PrefixTuning) -> None:
    if not state.marked:
        return
    for name in _MARKER_READERS:
        wrapper = model.__dict__.get(name)
        if isinstance(wrapper, types.MethodType) and isinstance(wrapper.__func__, functools.partial) \
                and wrapper.__func__.func is _marker_hidden_call:
            del model.__dict__[name]
    if not getattr(model, "peft_config", None):  # else PEFT adapters added since: the marker is theirs too
        model.__dict__.pop(_ADAPTER_MARKER, None)
    state.marked = False


def add_prefix_tuning(model: nn.Module, num_virtual_tokens: int, *, prefix_projection: bool = False,
                      encoder_hidden_size: Optional[int] = None, num_tasks: int = 1,
                      position_offset: bool = True, dropout: float = 0.0, sites=None,
                      train_head: bool = True) -> nn.Module:
    """Prefix-tune a transformers model with prefix_attn; returns the same model, modified in place.

    - Every existing parameter is frozen; a trainable `PrefixEncoder` is attached as
      `model.prefix_encoder` (P = num_virtual_tokens prefix keys/values for every layer and KV
      head; see PrefixEncoder for prefix_projection, encoder_hidden_size, num_tasks, dropout).
    - train_head=True (the default): the task head of a `...ForSequenceClassification`,
      `...ForTokenClassification` or `...ForQuestionAnswering` model (whatever sits beside the
      base model: `classifier`, `score`, `qa_outputs`) trains with the prefix, as in P-Tuning v2
      and PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS task types; save_prefix saves it and
      load_prefix loads it. train_head=False freezes it too (the prefix trains alone). Models
      without a task head (language models) are not affected; a task model whose head is not
      recognised is refused unless train_head=False. On a PEFT model the head keeps PEFT's flags
      (its modules_to_save).
    - A quantized base (e.g. `from_pretrained(..., quantization_config=...)`, or a GGUF file)
      is marked as carrying trainable adapters, so the HF Trainer accepts it, as it does PEFT's;
      nothing else sees the mark (save_pretrained saves as before).
    - The model gets its own copy of its config (the attention implementation is switched there),
      so other models built from the same config object are not affected.
    - Refused at the call, with a line that says why: models it cannot run correctly (attention
      soft-capping, attention sinks, state-space or recurrent layers, vision and audio models,
      decoders and encoders that do not support custom attention functions).
    - On a PEFT model (e.g. LoRA: a `peft.PeftModel`, or adapters added with `model.add_adapter`)
      the adapters' trainable parameters stay trainable, so both train; the prefix goes on the
      transformers model inside, and every function here accepts the wrapper. LoRA added after
      (`get_peft_model(model, LoraConfig(...))`) freezes the prefix, as it freezes everything but
      LoRA: `get_prefix_encoder(peft_model).requires_grad_(True)` trains it again.
    - Attention runs through prefix_attn (config._attn_implementation = "prefix_attn").
    - num_tasks > 1: each row picks its prefix: `model(..., prefix_index=task_ids)`,
      `model.generate(..., prefix_index=task_ids)` (an int tensor [B], or one int for all rows).
    - position_offset=True: real tokens take positions P, P+1, ... as with PEFT prefix tuning
      (PEFT adapters loaded with `load_peft_prefix` give PEFT's logits); False: 0, 1, ...
    - Encoder-decoder models (BART and its kin): `sites` says which attention gets a prefix, any of
      "encoder" (the encoder's self-attention), "decoder" (the decoder's causal self-attention)
      and "cross" (the decoder's attention to the encoder); all three by default, as Li & Liang.
      Each prefixed attention module has its own prefix: the table holds L_enc + 2 L_dec layers
      with all three, in that order. `sites=("decoder",)` is what PEFT's SEQ_2_SEQ_LM prefix
      tuning computes (under transformers 5 it prefixes only the decoder's self-attention):
      load_peft_prefix and save_peft_prefix use it. position_offset shifts the positions of each
      stack whose self-attention has a prefix.

    Works with model.generate (the prefix stays out of the KV cache), gradient checkpointing
    (non-reentrant, transformers' default), torch.compile, the HF Trainer and DDP. Multi-task
    training with the Trainer needs remove_unused_columns=False so prefix_index reaches the
    model. Under FSDP2 (`fully_shard`), call it before sharding: the prefix then shards with the
    unit that holds it (the root, unless the encoder gets a unit of its own). Undo with
    `remove_prefix_tuning(model)`.
    """
    outer, model = model, _hf_model(model)
    if _state(model) is not None:
        raise ValueError("prefix_attn: this model already has prefix tuning; call remove_prefix_tuning(model) first")
    if not hasattr(model, "config") or not hasattr(model.config, "_attn_implementation"):
        raise TypeError(f"prefix_attn: add_prefix_tuning needs a transformers PreTrainedModel, got {type(model).__name__}")
    if hasattr(model, "prefix_encoder"):
        raise ValueError(f"prefix_attn: {type(model).__name__} already has an attribute 'prefix_encoder'")
    _check_supported(model)
    geometry = _geometry(model, sites)
    keep_adapters = _has_peft_adapters(outer, model)  # PEFT froze the base already; its adapters train on
    head = _task_head(model) if train_head and not keep_adapters else ()

    reference = next(model.parameters(), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None and reference.dtype.is_floating_point else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # train the prefix in float32; attention casts it to the model's dtype
    encoder = PrefixEncoder(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, num_virtual_tokens,
                            prefix_projection=prefix_projection, encoder_hidden_size=encoder_hidden_size,
                            num_tasks=num_tasks, dropout=dropout, device=device, dtype=dtype)

    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    state = _PrefixTuning(encoder, bool(position_offset), geometry, model.config._attn_implementation, previous)
    _register(state)
    replaced = _own_config(model, outer)
    try:
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    except Exception:
        for module, attr, config in replaced:
            module.__dict__[attr] = config
        _unregister(state)
        raise
    for p in model.parameters():
        p.requires_grad_(keep_adapters and p.requires_grad)
    head_parameters = _head_parameters(model, head)
    for p in head_parameters.values():
        p.requires_grad_(True)
    state.head = tuple(head_parameters)
    model.prefix_encoder = encoder  # a submodule: .to(), state_dict, DDP and optimizers see it
    model.__dict__[_STATE_ATTR] = state
    try:
        if geometry.sites:
            _attach_encoder_decoder(model, state)
        else:
            decoder = getattr(model, "base_model", model)
            state.hooks.append(decoder.register_forward_pre_hook(functools.partial(_stack_pre_hook, state, True),
                                                                 with_kwargs=True))
    except Exception:
        remove_prefix_tuning(model)  # leaves the model as it found it
        raise

    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        # A bound method (not a closure), so that copy.deepcopy(model) rebinds it to the copy.
        model.generate = types.MethodType(_generate, model)
        state.wrapped_generate = True
    _mark_adapter_trained(model, state)
    return outer


def _attach_encoder_decoder(model: nn.Module, state: _PrefixTuning) -> None:
    """Slots on every attention module (encoder self, decoder self, decoder cross, in layer order;
    NO_PREFIX where the site has none), a pre-hook on each stack (the encoder also runs alone, in
    generate), and the position shift on the stacks whose self-attention has a prefix."""
    sites = state.geometry.sites
    slot = 0
    for site, modules in _encoder_decoder_attention(model).items():
        for _, module in modules:
            module.__dict__[_SLOT_ATTR] = slot if site in sites else NO_PREFIX
            slot += site in sites
            state.slotted.append(module)
            if hasattr(module, "relative_attention_num_buckets"):  # T5 and its kin: relative position bias
                module.__dict__[_BIAS_ATTR] = None if site == "cross" else _bias_owner(module, modules[0][1])
                state.relative_bias = True
    for stack_name, stack in _stacks(model).items():
        state.hooks.append(stack.register_forward_pre_hook(functools.partial(_stack_pre_hook, state, False),
                                                           with_kwargs=True))
        embed = getattr(stack, "embed_positions", None)
        if not state.position_offset or stack_name not in sites or embed is None:
            continue  # T5 and its kin have no absolute positions: relative ones need no shift
        names = inspect.signature(embed.forward).parameters
        if "position_ids" not in names and not any(name in names for name in _CACHE_LENGTH_NAMES):
            raise NotImplementedError(
                f"prefix_attn: cannot shift the positions of {type(model).__name__}'s {stack_name} by the prefix "
                f"length: its {type(embed).__name__} takes neither position_ids nor a cache length; use "
                "position_offset=False")
        state.hooks.append(embed.register_forward_pre_hook(functools.partial(_position_shift_hook, state),
                                                           with_kwargs=True))


def _bias_owner(module: nn.Module, first: nn.Module) -> nn.Module:
    """The attention module whose relative_attention_bias biases `module`'s scores: its own where it
    has one, else (T5: only the first layer of a stack has the embedding; the others reuse the bias
    it computes) the stack's first self-attention."""
    owner = module if getattr(module, "has_relative_attention_bias", False) else first
    if not getattr(owner, "has_relative_attention_bias", False):
        raise NotImplementedError(f"prefix_attn: cannot find the relative position bias of {type(module).__name__}")
    return owner


def _detach(model: nn.Module, state: _PrefixTuning) -> None:
    """Remove the hooks and the slots add_prefix_tuning put on the model's modules."""
    for hook in state.hooks:
        hook.remove()
    for module in state.slotted:
        module.__dict__.pop(_SLOT_ATTR, None)
        module.__dict__.pop(_BIAS_ATTR, None)
    state.hooks.clear()
    state.slotted.clear()


#: Layer kinds (config.layer_types and its kin) of softmax attention, which a prefix extends.
_ATTENTION_LAYER_KINDS = ("attention", "full_attention", "sliding_attention", "chunked_attention")
#: Config fields that name each layer's kind, in the model families that mix kinds.
_LAYER_KIND_FIELDS = ("layer_types", "layers_block_type", "block_types")
#: What a model's main input must be: the stack's hook reads the batch and length from it.
_TOKEN_INPUTS = ("input_ids", "inputs_embeds")


def _state_space_fields(config) -> list:
    """The config fields that describe state-space (Mamba-style) layers, if any."""
    return sorted(key for key in config.to_dict()
                  if key.startswith(("mamba_", "ssm_", "n_mamba")) or key in ("state_size", "time_step_rank"))


def _check_supported(model: nn.Module) -> None:
    """Refuse, by name and with one line that says why, the models whose attention this integration
    would get wrong or could not reach. Runs before anything is changed."""
    config = _text_config(model)
    name = f"{type(model).__name__} (model_type {getattr(config, 'model_type', '?')!r})"
    encoder_decoder = _is_encoder_decoder(model)
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input not in _TOKEN_INPUTS:
        raise NotImplementedError(
            f"prefix_attn: {name} takes {main_input} (a vision or audio model); prefix and prompt tuning here "
            f"are for token models, whose stack takes {' or '.join(_TOKEN_INPUTS)}")
    if getattr(config, "num_attention_heads", None) is None:
        raise NotImplementedError(
            f"prefix_attn: {name} has no attention layers (its config has no num_attention_heads: a state-space or "
            "recurrent model), so there are no attention keys and values for a prefix to extend")
    kinds = set()
    for field_name in _LAYER_KIND_FIELDS:
        value = getattr(config, field_name, None)
        if isinstance(value, (list, tuple)):
            kinds.update(str(kind) for kind in value)
    other = sorted(kinds.difference(_ATTENTION_LAYER_KINDS))
    state_space = _state_space_fields(config)
    if other or state_space:
        what = f"layers of kind {other}" if other else f"state-space layers ({', '.join(state_space[:3])}, ...)"
        raise NotImplementedError(
            f"prefix_attn: {name} mixes attention with {what}, which carry what they read from token to token "
            "in a state that a prefix of attention keys and values does not reach; only all-attention models "
            "are supported")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise NotImplementedError(
            f"prefix_attn: {name} soft-caps its attention scores (attn_logit_softcapping={softcap}), which "
            "prefix_attn's kernels do not implement")
    sinks = next((module_name for module_name, module in model.named_modules()
                  if isinstance(getattr(module, "sinks", None), Tensor)), None)
    if sinks is not None:
        raise NotImplementedError(
            f"prefix_attn: {name} gives its attention learned sinks ({sinks}.sinks), extra softmax terms that "
            "prefix_attn's kernels do not implement")
    if hasattr(config, "relative_attention_num_buckets") and not encoder_decoder:
        raise NotImplementedError(
            f"prefix_attn: {name} adds a relative position bias (T5's position_bias) to its attention scores, and "
            "its prefix keys need a bias of their own: add_prefix_tuning sets that up for encoder-decoder models "
            "(T5ForConditionalGeneration and its kin) only")
    if not encoder_decoder and not getattr(type(model), "_supports_attention_backend", False):
        # The class's own word that its layers hand attention kwargs (our prefix) through to a
        # registered attention function. Some models that dispatch there do not (StableLM: its
        # attention would run without the prefix). Encoder-decoders are checked by model type.
        raise NotImplementedError(
            f"prefix_attn: {name} does not support custom attention functions (_supports_attention_backend is "
            "False: its attention is its own, or its layers do not pass attention kwargs through), so its "
            "attention would never see the prefix")


def _generate(self, *args, prefix_index=None, **kwargs):
    """model.generate, plus prefix_index (one task id per row, for a bank of prefixes).

    transformers' generate rejects kwargs the model's forward does not name, so prefix_index
    travels around it to the decoder's hook; rows that generate expands (num_beams,
    num_return_sequences) keep their task."""
    state = _state(self)
    if state is None:
        return type(self).generate(self, *args, **kwargs)
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if prefix_index is not None and inputs is not None:  # check against the batch given, before any work
        prefix_index = _as_prefix_index(prefix_index, state.encoder.num_tasks, inputs.shape[0], inputs.device)
    state.generate_index = prefix_index
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        state.generate_index = None


def remove_prefix_tuning(model: nn.Module) -> PrefixEncoder:
    """Undo add_prefix_tuning: the previous attention implementation, requires_grad flags and
    generate; the hook and `model.prefix_encoder` go. Returns the detached PrefixEncoder."""
    model = _hf_model(model)
    state = _state(model)
    if state is None:
        raise ValueError("prefix_attn: this model has no prefix tuning to remove")
    _detach(model, state)
    _unmark_adapter_trained(model, state)
    if state.wrapped_generate:
        model.__dict__.pop("generate", None)
    del model.prefix_encoder
    previous = state.previous_attn_implementation
    if previous is not None:
        _set_attn_implementation(model, previous)
    for name, p in model.named_parameters():
        p.requires_grad_(state.previous_requires_grad.get(name, p.requires_grad))
    del model.__dict__[_STATE_ATTR]
    _unregister(state)
    return state.encoder


# ----------------------------------------------------------------------------------------------
# Saving and loading


def _mismatch_error(what: str, path: str, mismatches) -> ValueError:
    lines = "\n".join(f"  {name}: file has {got}, model has {want}" for name, got, want in mismatches)
    return ValueError(f"prefix_attn: {what} at {path} does not fit this model:\n{lines}")


def _check_geometry(geometry: _Geometry, num_layers, num_kv_heads, head_dim, what: str, path: str) -> None:
    mismatches = [(name, got, want) for name, got, want in (
        ("num_layers", num_layers, geometry.num_layers),
        ("num_kv_heads", num_kv_heads, geometry.num_kv_heads),
        ("head_dim", head_dim, geometry.head_dim)) if got != want]
    if mismatches:
        raise _mismatch_error(what, path, mismatches)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _full_state_dict(tensors: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], bool]:
    """The tensors (the encoder's state dict, the head's parameters), whole and on the CPU, and
    whether any was sharded (a DTensor, as FSDP2 makes them); gathering a sharded one is a
    collective every rank must join."""
    whole, sharded = {}, False
    for name, t in tensors.items():
        if _is_dtensor(t):
            t, sharded = t.full_tensor(), True
        whole[name] = t.detach().contiguous().cpu()
    return whole, sharded


def _like(t: Tensor, target: Tensor) -> Tensor:
    """t, read from a file, on target's device and dtype, and sharded as target is (FSDP2: every
    rank read the whole file and keeps its own shard, no communication)."""
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                 target.placements, src_data_rank=None)
    return t.to(device=target.device, dtype=target.dtype)


def save_prefix(model: nn.Module, path: str) -> None:
    """Save the prefix of a prefix-tuned model to the directory `path`: prefix_model.safetensors
    (the PrefixEncoder's tensors, MLP included, so training can resume, and the task head's when
    it was trained with the prefix: add_prefix_tuning's train_head) and prefix_config.json.

    From a model sharded by FSDP2, call it on every rank: the prefix is gathered whole (a
    collective) and global rank 0 writes the files."""
    from safetensors.torch import save_file

    state = _require_state(model, "save_prefix")
    tensors, sharded = _full_state_dict(state.encoder.state_dict())
    parameters = dict(_hf_model(model).named_parameters())
    head, head_sharded = _full_state_dict({name: parameters[name] for name in state.head})
    if (sharded or head_sharded) and torch.distributed.get_rank() != 0:
        return
    tensors.update({HEAD_PREFIX + name: t for name, t in head.items()})
    os.makedirs(path, exist_ok=True)
    config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION if head else 1,
              "prefix_attn_version": __version__, "model_type": state.geometry.model_type,
              "position_offset": state.position_offset, "encoder": state.encoder.config()}
    if head:
        config["head"] = sorted(head)
    if state.geometry.sites:  # an encoder-decoder model: which of its attentions have a prefix
        config["sites"] = list(state.geometry.sites)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def load_prefix(model: nn.Module, path: str) -> nn.Module:
    """Load a prefix saved by save_prefix into model; returns the model.

    A model without prefix tuning gets it (add_prefix_tuning with the saved settings; the task
    head trains on if it was saved, i.e. trained); a model that has it must have the same
    settings. A saved task head is loaded into the model's head (whether or not it trains now);
    a file without one leaves the head as it is. Shapes are checked against the model first, and
    a mismatch raises a ValueError that lists every field that does not fit. Into a model sharded
    by FSDP2, every rank loads the file and keeps its own shard (no communication).
    """
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("format") != FORMAT_NAME:
        raise ValueError(f"prefix_attn: {os.path.join(path, CONFIG_NAME)} is not a prefix_attn prefix "
                         f"(format {config.get('format')!r}); for a PEFT adapter use load_peft_prefix")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"prefix_attn: {path} has format version {config['format_version']}; this prefix_attn "
                         f"reads up to {FORMAT_VERSION}")
    saved = config["encoder"]
    sites = tuple(config["sites"]) if config.get("sites") else None
    if (sites is not None) != _is_encoder_decoder(model):
        raise ValueError(f"prefix_attn: the prefix at {path} was saved from "
                         f"{'an encoder-decoder' if sites else 'a decoder-only or encoder-only'} model (sites "
                         f"{sites}), which {type(_hf_model(model)).__name__} is not")
    _check_geometry(_geometry(model, sites), saved["num_layers"], saved["num_kv_heads"], saved["head_dim"],
                    "the prefix", path)
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    head = {name[len(HEAD_PREFIX):]: t for name, t in tensors.items() if name.startswith(HEAD_PREFIX)}
    _check_head(model, head, config.get("head", []), path)
    state = _state(model)
    if state is None:
        add_prefix_tuning(model, saved["num_virtual_tokens"], prefix_projection=saved["prefix_projection"],
                          encoder_hidden_size=saved["encoder_hidden_size"], num_tasks=saved["num_tasks"],
                          position_offset=config.get("position_offset", True), dropout=saved.get("dropout", 0.0),
                          sites=sites, train_head=bool(head))
        state = _state(model)
    else:
        current = {**state.encoder.config(), "position_offset": state.position_offset,
                   "sites": state.geometry.sites or None}
        wanted = {**saved, "position_offset": config.get("position_offset", True), "sites": sites}
        mismatches = [(k, wanted[k], current[k]) for k in ("num_virtual_tokens", "num_tasks", "prefix_projection",
                                                         "encoder_hidden_size", "position_offset", "sites")
                      if wanted.get(k) != current.get(k) and not (k == "encoder_hidden_size" and
                                                                  not wanted["prefix_projection"])]
        if mismatches:
            raise _mismatch_error("the prefix", path, mismatches)

    tensors = {name: t for name, t in tensors.items() if not name.startswith(HEAD_PREFIX)}
    _check_shapes(tensors, state.encoder.state_dict(), "the prefix tensors", path)
    current = state.encoder.state_dict()
    for name, t in tensors.items():
        if _is_dtensor(current[name]):  # sharded by FSDP2: every rank read the file and keeps its own shard
            tensors[name] = _like(t, current[name])
    state.encoder.load_state_dict(tensors)
    if head:
        parameters = dict(_hf_model(model).named_parameters())
        with torch.no_grad():
            for name, t in head.items():
                parameters[name].copy_(_like(t, parameters[name]))
    return model


def _check_shapes(got: Dict[str, Tensor], expected: Dict[str, Tensor], what: str, path: str) -> None:
    got = {name: tuple(t.shape) for name, t in got.items()}
    expected = {name: tuple(t.shape) for name, t in expected.items()}
    if got != expected:
        mismatches = [(name, list(got[name]) if name in got else "nothing",
                       list(expected[name]) if name in expected else "nothing")
                      for name in sorted(set(got) | set(expected)) if got.get(name) != expected.get(name)]
        raise _mismatch_error(what, path, mismatches)


def _check_head(model: nn.Module, head: Dict[str, Tensor], listed, path: str) -> None:
    """A saved task head must be the one prefix_config.json lists, and fit the model's task head
    exactly (no other parameter of the model can be written by a prefix file)."""
    if sorted(head) != sorted(listed):
        raise ValueError(f"prefix_attn: {path} lists task-head tensors {sorted(listed)} in {CONFIG_NAME} but holds "
                         f"{sorted(head)} in {WEIGHTS_NAME}")
    if not head:
        return
    hf_model = _hf_model(model)
    modules = _task_head(hf_model)
    if not modules:
        raise ValueError(f"prefix_attn: the prefix at {path} comes with a task head ({sorted(head)[0]}, ...), but "
                         f"{type(hf_model).__name__} has none")
    _check_shapes(head, _head_parameters(hf_model, modules), "the task head", path)


def read_peft_adapter(path: str) -> Tuple[Dict[str, Any], str, str]:
    """(adapter_config.json's contents, its path, the path of adapter_model.safetensors) of the PEFT
    adapter directory `path`. A pickled adapter_model.bin is refused, never loaded."""
    config_file = os.path.join(path, "adapter_config.json")
    weights_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"prefix_attn: {path} holds adapter_model.bin, a pickle, which prefix_attn does not "
                             "load; re-save the adapter with safe_serialization=True")
        raise FileNotFoundError(f"prefix_attn: no adapter_model.safetensors in {path}")
    with open(config_file) as f:
        return json.load(f), config_file, weights_file


def load_peft_prefix(model: nn.Module, path: str, *, task: Optional[int] = None) -> nn.Module:
    """Load a PEFT prefix-tuning adapter (a directory with adapter_config.json and
    adapter_model.safetensors) into model; returns the model.

    PEFT stores `prompt_embeddings` [P, L * 2 * Hkv * D], each virtual token's vector laid out
    [L, 2 (key, value), Hkv, D], already projected when PEFT trained with prefix_projection.
    An encoder-decoder adapter (SEQ_2_SEQ_LM) prefixes the decoder's self-attention only (what
    PEFT computes under transformers 5), so the model gets sites=("decoder",).
    A model without prefix tuning gets add_prefix_tuning(model, P) (position_offset=True, as
    PEFT); one with a plain-table prefix of length P gets it loaded; with num_tasks > 1, `task`
    says which bank entry receives it (so several PEFT adapters can serve one batch).
    """
    from safetensors.torch import load_file

    config, config_file, weights_file = read_peft_adapter(path)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"prefix_attn: {config_file} is a {config.get('peft_type')!r} adapter, not PREFIX_TUNING")
    encoder_decoder = _is_encoder_decoder(model)
    submodules = config.get("num_transformer_submodules", 1)
    if submodules != (2 if encoder_decoder else 1):
        kind = "an encoder-decoder" if encoder_decoder else "a decoder-only or encoder-only"
        raise ValueError(f"prefix_attn: {config_file} has num_transformer_submodules={submodules} (PEFT writes 2 for "
                         f"encoder-decoder models, 1 otherwise), but {type(_hf_model(model)).__name__} is {kind} model")
    sites = _PEFT_SITES if encoder_decoder else None
    geometry = _geometry(model, sites)
    kv_heads = config.get("num_attention_heads")
    head_dim = config["token_dim"] // kv_heads if kv_heads else None
    _check_geometry(geometry, config.get("num_layers"), kv_heads, head_dim, "the PEFT adapter", path)

    tensors = load_file(weights_file)
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"prefix_attn: {weights_file} has no 'prompt_embeddings' tensor (found {sorted(tensors)})")
    embeddings = tensors["prompt_embeddings"]
    P = config["num_virtual_tokens"]
    L, H, D = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
    if tuple(embeddings.shape) != (P, L * 2 * H * D):
        raise _mismatch_error("the PEFT adapter", path,
                              [("prompt_embeddings", list(embeddings.shape), [P, L * 2 * H * D])])

    state = _state(model)
    if state is None:
        add_prefix_tuning(model, P, sites=sites)
        state = _state(model)
    else:
        encoder = state.encoder
        if state.geometry.sites != geometry.sites:
            raise _mismatch_error("the PEFT adapter", path, [("sites", geometry.sites, state.geometry.sites)])
        if encoder.prefix_projection:
            raise ValueError("prefix_attn: the model's prefix uses prefix_projection; a PEFT adapter is a plain "
                             "table (merge the encoder with model.prefix_encoder.merge() first)")
        if encoder.num_virtual_tokens != P:
            raise _mismatch_error("the PEFT adapter", path, [("num_virtual_tokens", P, encoder.num_virtual_tokens)])
        if encoder.num_tasks > 1 and task is None:
            raise ValueError(f"prefix_attn: the model's prefix is a bank of {encoder.num_tasks} tasks; pass task= to "
                             "say which entry the adapter goes into")
        if not state.position_offset:
            warnings.warn("prefix_attn: the model uses position_offset=False, while PEFT's prefix shifts positions by "
                          "P; its outputs will differ from PEFT's", stacklevel=2)
    table = embeddings.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)  # [L, 2, Hkv, P, D]
    if encoder_decoder:  # the decoder layers read PEFT's table in its own order (see _peft_seq2seq_layers)
        table = table[_peft_seq2seq_layers(L)]
    weight = state.encoder.weight
    state.encoder.load_table(table.to(device=weight.device, dtype=weight.dtype), task=task)
    return model


def save_peft_prefix(model: nn.Module, path: str, *, task: Optional[int] = None) -> None:
    """Save the prefix as a PEFT prefix-tuning adapter (adapter_config.json and
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads: PEFT's layout, a
    plain table (prefix_projection is folded), one task (`task` picks it from a bank).
    Its outputs equal this model's when position_offset=True (PEFT's positions)."""
    from safetensors.torch import save_file

    state = _require_state(model, "save_peft_prefix")
    if state.head:
        warnings.warn(f"prefix_attn: save_peft_prefix writes the prefix alone; the trained task head "
                      f"({', '.join(state.head)}) is not in it (save_prefix keeps both)", stacklevel=2)
    encoder = state.encoder
    encoder_decoder = bool(state.geometry.sites)
    if encoder_decoder and state.geometry.sites != _PEFT_SITES:
        raise ValueError(f"prefix_attn: this model's prefix covers sites {state.geometry.sites}; a PEFT prefix-tuning "
                         "adapter of an encoder-decoder model prefixes only the decoder's self-attention (under "
                         "transformers 5), so it can hold only a prefix trained with sites=('decoder',)")
    if encoder.num_tasks > 1 and task is None:
        raise ValueError(f"prefix_attn: the prefix is a bank of {encoder.num_tasks} tasks; pass task= to choose one "
                         "(a PEFT prefix-tuning adapter holds one prefix)")
    task = 0 if task is None else task
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < encoder.num_tasks:
        raise ValueError(f"prefix_attn: task must be an int in [0, {encoder.num_tasks}), got {task!r}")
    with torch.no_grad():
        table = encoder.table()[:, :, task]  # [L, 2, Hkv, P, D]
    L, _, H, P, D = table.shape
    if encoder_decoder:  # PEFT's decoder layer l reads its table's layer 2 l mod L (see _peft_seq2seq_layers)
        peft_table = torch.zeros_like(table)  # layers PEFT never reads stay zero
        written = {}
        for layer, row in enumerate(_peft_seq2seq_layers(L)):
            if row in written and not torch.equal(table[layer], table[written[row]]):
                raise ValueError(
                    f"prefix_attn: a PEFT SEQ_2_SEQ_LM adapter cannot hold this prefix: PEFT 0.21 gives decoder layers "
                    f"{written[row]} and {layer} the same entry of its table (layer 2 l mod {L}), but their prefixes "
                    "differ. Save it with save_prefix instead")
            written[row] = layer
            peft_table[row] = table[layer]
        table = peft_table
    embeddings = table.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D)  # PEFT: token-major [P, L, 2, Hkv, D]
    config = {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM",
              "num_virtual_tokens": P, "token_dim": H * D, "num_attention_heads": H, "num_layers": L,
              "num_transformer_submodules": 2 if encoder_decoder else 1,
              "encoder_hidden_size": H * D, "prefix_projection": False, "inference_mode": True,
              "base_model_name_or_path": getattr(_text_config(_hf_model(model)), "_name_or_path", None) or None,
              "revision": None, "modules_to_save": None, "auto_mapping": None}
    os.makedirs(path, exist_ok=True)
    save_file({"prompt_embeddings": embeddings.detach().contiguous().cpu()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


@torch.no_grad()
def init_prefix_from_text(model: nn.Module, input_ids, *, task: Optional[int] = None) -> nn.Module:
    """Initialise the prefix with the keys and values the model itself computes for a text of
    exactly P tokens (Li & Liang's initialisation from real activations); returns the model.

    input_ids: [P] or [1, P]. The text runs at positions 0 .. P-1, so with position_offset=True
    the model then behaves exactly as if the text were prepended to every input. With a bank,
    `task` picks the entry (None: all of them). Needs a plain-table prefix.
    """
    state = _require_state(model, "init_prefix_from_text")
    encoder = state.encoder
    if encoder.prefix_projection:
        raise ValueError("prefix_attn: init_prefix_from_text needs a plain-table prefix, not prefix_projection")
    if state.geometry.sites:
        raise NotImplementedError(
            "prefix_attn: init_prefix_from_text is for decoder-only and encoder-only models; an encoder-decoder's "
            "prefixes (encoder, decoder, cross-attention) have no single text whose keys and values they would be")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    P = encoder.num_virtual_tokens
    if tuple(ids.shape) != (1, P):
        raise ValueError(f"prefix_attn: init_prefix_from_text needs exactly num_virtual_tokens={P} tokens, shape "
                         f"[{P}] or [1, {P}]; got {list(ids.shape)}")
    model = _hf_model(model)
    decoder = getattr(model, "base_model", model)
    with prefix_disabled(model):
        out = decoder(input_ids=ids.to(_encoder_device(encoder)), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    table = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    table = table.to(encoder.weight.dtype)  # [L, 2, Hkv, P, D]
    if task is None:
        table = table.unsqueeze(2).expand(-1, -1, encoder.num_tasks, -1, -1, -1)
    encoder.load_table(table, task=task)
    return model


def _encoder_device(encoder: PrefixEncoder) -> torch.device:
    return next(encoder.parameters()).device
