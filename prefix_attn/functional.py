"""Public attention functions."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _dropout, backends
from ._inputs import check_inputs


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor] = None,
                     prefix_v: Optional[Tensor] = None, *, causal: bool = False,
                     softmax_scale: Optional[float] = None, key_padding_mask: Optional[Tensor] = None,
                     attn_mask: Optional[Tensor] = None, prefix_index: Optional[Tensor] = None,
                     dropout_p: float = 0.0, return_lse: bool = False, deterministic: bool = False,
                     backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention of q over [prefix ; sequence] keys and values, without concatenating them.

    Shapes (any strides; a transposed [B, N, H, D] view works without a copy):
        q                   [B, Hq, Nq, D]
        k, v                [B, Hkv, Nk, D]      Hq % Hkv == 0 (MHA, GQA, MQA)
        prefix_k, prefix_v  [Hkv, P, D]          shared by every row, or
                            [B, Hkv, P, D]       one prefix per row, or
                            [T, Hkv, P, D]       a bank: row b uses entry prefix_index[b]
        prefix_index        integer [B], values in [0, T); only with a bank
        key_padding_mask    bool or 0/1 integer [B, Nk], True = attend (HF's attention_mask)
        attn_mask           bool (True = attend) or additive float, broadcastable to
                            [B, Hq, Nq, Nk]
        returns out         [B, Hq, Nq, D], q's dtype (and q's layout when q is a dense view)
                lse         [B, Hq, Nq] float32, natural log, with return_lse=True

    Which keys a query sees (causal, Nq = 3, Nk = 5, P = 2; o visible, . hidden):

                  prefix   sequence
                  p0 p1  | k0 k1 k2 k3 k4
        query 0    o  o  |  o  o  o  .  .
        query 1    o  o  |  o  o  o  o  .
        query 2    o  o  |  o  o  o  o  o

    Prefix keys are visible to every query, always: masks never apply to them. Causal masking
    is bottom-right aligned on the sequence: query i sees key j iff j <= i + (Nk - Nq), as when
    decoding new queries against a KV cache. All given masks combine. A query that sees no key
    (possible only with P == 0) gets out = 0 and lse = -inf, never NaN.

    softmax_scale defaults to 1 / sqrt(D). Gradients flow to every input that requires grad
    and only to those: with only the prefix trainable, no dq / dk / dv work runs. A shared
    prefix's gradient is summed over rows inside the kernels; a bank's accumulates into the
    entries used. deterministic=True gives bit-identical gradients run to run. backend is
    "auto" (see `select_backend`) or one of `available_backends()`.

    dropout_p > 0 drops attention probabilities, of prefix and sequence keys alike, with that
    probability and scales the kept ones by 1 / (1 - dropout_p): dropout over the concatenated
    keys, as a model's attention dropout does in training. It applies whenever it is nonzero
    (pass 0.0 in eval, as with torch's SDPA). The mask comes from a counter-based stream seeded
    from torch's generator for q's device, so torch.manual_seed makes runs reproducible; the
    backward regenerates it. lse is the undropped softmax's.

    Mixed precision, as torch's SDPA: inside torch.autocast for q's device, q, k, v, the prefix
    and a float attn_mask are cast to autocast's dtype (floating tensors, float64 excepted), the
    output comes back in it, and each input's gradient in its own dtype (a float32 prefix table
    gets a float32 gradient). Outside autocast, inputs of different dtypes are a TypeError.
    """
    # Autocast is applied here, in Python, rather than by torch.library.register_autocast on the
    # ops: register_autocast casts to one dtype fixed at registration, while autocast's dtype is
    # chosen per region (float16 or bfloat16 on CUDA); the mixed-dtype check and the choice of
    # backend happen here, before any op, and must see the cast inputs; and the reference backend
    # is plain PyTorch, not an op. The ops themselves are the normalised internal form and take
    # matching dtypes only (they say so when called with mixed ones).
    cast_to = _autocast_dtype(q)
    if cast_to is not None:
        device_type = q.device.type
        q, k, v, prefix_k, prefix_v, attn_mask = (_autocast_cast(t, cast_to, device_type)
                                                  for t in (q, k, v, prefix_k, prefix_v, attn_mask))
    # The backend runs on the cast tensors with autocast off: the reference's own ops must not be
    # re-cast. (Inline, not a helper: the reference fallback's warning points at the caller.)
    with torch.autocast(q.device.type, enabled=False) if cast_to is not None else contextlib.nullcontext():
        inputs = check_inputs(q, k, v, prefix_k, prefix_v, causal=causal, softmax_scale=softmax_scale,
                              key_padding_mask=key_padding_mask, attn_mask=attn_mask, prefix_index=prefix_index)
        inputs.dropout_p = _dropout.check_dropout_p(dropout_p)
        if inputs.dropout_p > 0.0:
            inputs.dropout_seed, inputs.dropout_offset = _dropout.next_stream(q.device)
            if _dropout._recorders:
                B, Hq, Nq, _ = q.shape
                _dropout.note_call(inputs.dropout_seed, inputs.dropout_offset, inputs.dropout_p,
                                   (B, Hq, Nq, inputs.num_prefix, k.shape[2]), q.device)
        out, lse = backends.run(inputs, backend, bool(deterministic))
    return (out, lse) if return_lse else out


def _autocast_dtype(t) -> Optional[torch.dtype]:
    """The dtype torch.autocast casts torch's SDPA inputs to for tensors on t's device, or None
    where autocast is off there (or t is not a tensor, or its device has no autocast). Autocast
    is per device type: a CPU tensor inside autocast("cuda") is not cast, as with torch's ops."""
    if not isinstance(t, Tensor):
        return None
    device_type = t.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(t, dtype: torch.dtype, device_type: str):
    # What autocast's lower-precision policy casts: floating tensors on the autocast device,
    # float64 excepted (it then fails the dtype check, as torch's SDPA fails). The float
    # attn_mask is cast too, as autocast casts SDPA's. Bool / integer masks and prefix_index
    # pass. The cast is differentiable: a float32 leaf gets a float32 gradient.
    if (isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.dtype != dtype
            and t.device.type == device_type):
        return t.to(dtype)
    return t


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype prefix_attention computes in for an input like t: autocast's dtype inside an
    autocast region for t's device (t floating and not float64), else t's own."""
    cast_to = _autocast_dtype(t)
    return t.dtype if cast_to is None or _autocast_cast(t, cast_to, t.device.type) is t else cast_to


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, prefix_key: Optional[Tensor] = None,
                                 prefix_value: Optional[Tensor] = None) -> Tensor:
    """A drop-in for torch.nn.functional.scaled_dot_product_attention, plus an optional prefix.

    query [B, Hq, L, E] (or [Hq, L, E]), key / value [B, Hkv, S, E]; prefix_key / prefix_value
    [Hkv, P, E] or [B, Hkv, P, E]. Without a prefix the result is torch's. The prefix is
    visible to every query; attn_mask (bool True = attend, or additive float, broadcastable to
    [B, Hq, L, S]) covers the sequence keys only.

    Where torch's meaning and ours differ, this raises rather than guess: is_causal with
    L != S (torch aligns the mask top-left, prefix_attention bottom-right; call
    prefix_attention(causal=True) for the latter). dropout_p drops attention probabilities (of
    the prefix's keys too) whenever it is nonzero, as torch's does: pass 0.0 in eval. Inside
    torch.autocast the inputs are cast as autocast casts torch's (see `prefix_attention`).
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"prefix_attn.scaled_dot_product_attention: {name} must be a Tensor, got {type(t).__name__}")
    unbatched = query.dim() == 3
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"prefix_attn.scaled_dot_product_attention: query, key and value must be 4-D [B, H, N, E] "
                         f"(or 3-D [H, N, E]); got query {list(query.shape)}, key {list(key.shape)}, "
                         f"value {list(value.shape)}")
    if value.shape[-1] != query.shape[-1]:
        raise NotImplementedError(f"prefix_attn.scaled_dot_product_attention: value's head dim must equal query's; "
                                  f"got query {list(query.shape)}, value {list(value.shape)}")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"prefix_attn.scaled_dot_product_attention: query has {query.shape[1]} heads and key has "
                         f"{key.shape[1]}; pass enable_gqa=True for grouped-query attention")
    if is_causal and query.shape[2] != key.shape[2]:
        raise ValueError(f"prefix_attn.scaled_dot_product_attention: is_causal with query length {query.shape[2]} != "
                         f"key length {key.shape[2]} is ambiguous: torch aligns the causal mask top-left, "
                         "prefix_attn bottom-right. Use prefix_attn.prefix_attention(..., causal=True) for "
                         "bottom-right alignment, or pass an explicit attn_mask")
    out = prefix_attention(query, key, value, prefix_key, prefix_value, causal=is_causal, softmax_scale=scale,
                           attn_mask=attn_mask, dropout_p=dropout_p)
    return out.squeeze(0) if unbatched else out
