"""T5 and its kin: the relative position bias, and the bias of the prefix keys.

T5 adds a relative position bias to its attention scores. The sequence keys get the bias the
model passes (`position_bias`); the prefix keys, which the model never sees, get theirs from the
same embedding, as P past tokens before the sequence (as PEFT's prefix in the cache). The kernels
take masks on the sequence keys only, so attention with a prefix bias is two calls merged by
their log-sum-exps (attend_with_prefix_bias)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...cascade import merge_attention_states
from ...functional import prefix_attention
from ._state import BIAS_ATTR


def with_position_bias(module: nn.Module, bias: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
    """T5's relative position bias [1 or B, H, Nq, Nk] over the sequence keys, with the full mask
    (if any) folded in: the additive float attn_mask of prefix_attention."""
    owner = module.__dict__.get(BIAS_ATTR)
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


def prefix_position_bias(module: nn.Module, num_queries: int, past, P: int, device) -> Optional[Tensor]:
    """T5's relative position bias [1, H, Nq, P] of the prefix keys, or None where they have none.

    The prefix keys sit at positions 0 .. P-1, before the sequence (as PEFT's prefix does, as P past
    tokens of the cache): query i of a call after `past` cached tokens is at P + past + i, so prefix
    key j is P + past + i - j places back. Relative positions make this independent of
    position_offset. Cross-attention has no position bias."""
    if BIAS_ATTR not in module.__dict__:
        raise NotImplementedError(
            f"prefix_attn: {type(module).__name__} passes a relative position bias, and prefix_attn does not know "
            "which bias its prefix keys should get (it knows T5's, set up by add_prefix_tuning)")
    owner = module.__dict__[BIAS_ATTR]
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


def attend_with_prefix_bias(query, key, value, prefix_k, prefix_v, prefix_bias, prefix_index, *, causal,
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


def bias_owner(module: nn.Module, first: nn.Module) -> nn.Module:
    """The attention module whose relative_attention_bias biases `module`'s scores: its own where it
    has one, else (T5: only the first layer of a stack has the embedding; the others reuse the bias
    it computes) the stack's first self-attention."""
    owner = module if getattr(module, "has_relative_attention_bias", False) else first
    if not getattr(owner, "has_relative_attention_bias", False):
        raise NotImplementedError(f"prefix_attn: cannot find the relative position bias of {type(module).__name__}")
    return owner
