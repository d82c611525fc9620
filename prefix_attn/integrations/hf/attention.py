"""The attention function and the mask function registered under ATTN_IMPLEMENTATION, and their
registration with transformers' AttentionInterface and AttentionMaskInterface (done by
add_prefix_tuning, undone when no model uses the name)."""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor, nn

from transformers import AttentionInterface
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function, causal_mask_function,
                                       prepare_padding_mask, sdpa_mask)

from ... import _inputs
from ...backends import ENV_VAR, select_backend
from ...functional import compute_dtype, prefix_attention
from ._state import ATTN_IMPLEMENTATION, KV_SINK_KWARG, NO_PREFIX, PAST_KWARG, PREFIX_KWARG, SLOT_ATTR, users
from .t5 import attend_with_prefix_bias, prefix_position_bias, with_position_bias

# Attention kwargs some models pass that change the math and that the kernel does not implement.
_UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks")


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
        attn_mask = with_position_bias(module, position_bias[..., : key.shape[-2]], attn_mask)
        if prefix_k is not None:
            past = kwargs.get(PAST_KWARG)
            prefix_bias = prefix_position_bias(module, query.shape[2], key.shape[2] - query.shape[2]
                                                if past is None else past, prefix_k.shape[-2], query.device)
    dtype = compute_dtype(query)  # autocast's, inside an autocast region (query may be float32 there)
    if torch.compiler.is_compiling():
        backend = _compiled_backend(query.device.type, dtype)
    else:
        backend = _backend_for(query.device.type, dtype, os.environ.get(ENV_VAR))
    B, Hq, Nq, D = query.shape
    Hkv = key.shape[1]
    if prefix_bias is not None:
        out = attend_with_prefix_bias(query, key, value, prefix_k, prefix_v, prefix_bias, kwargs.get("prefix_index"),
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
    if SLOT_ATTR in module.__dict__:
        return module.__dict__[SLOT_ATTR]
    return getattr(module, "layer_idx", None)


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


def register(user) -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefix_attention_mask)
    users.add(user)


def unregister(user) -> None:
    users.discard(user)
    if not users:
        AttentionInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
        AttentionMaskInterface._global_mapping.pop(ATTN_IMPLEMENTATION, None)
