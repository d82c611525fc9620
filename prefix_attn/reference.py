"""The oracle: plain PyTorch that builds [prefix ; sequence] explicitly and masks it.

It takes the normalised arguments every backend takes (see `_inputs.AttnInputs`) and computes
in the inputs' precision, with the scores and softmax in at least float32, as PyTorch's own
math attention does. Autograd comes for free. Keep it obviously right; speed is not its job.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _dropout


def reference_forward(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
                      prefix_index: Optional[Tensor], key_padding_mask: Optional[Tensor],
                      attn_mask: Optional[Tensor], scale: float, causal: bool, dropout_p: float = 0.0,
                      dropout_seed: int = 0, dropout_offset: int = 0,
                      dropout_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """out [B, Hq, Nq, D] in q's dtype and lse [B, Hq, Nq] in float32 (float64 for float64 inputs).

    prefix_k / prefix_v: [T, Hkv, P, D]; row b uses entry prefix_index[b], else 0 when T == 1,
    else b. key_padding_mask: bool [B, Nk]. attn_mask: bool or float, broadcastable to
    [B, Hq, Nq, Nk]. All masks apply to the sequence keys only.

    dropout_p > 0 drops probabilities of prefix and sequence keys alike by the stream of
    (dropout_seed, dropout_offset) (see _dropout.py), or by `dropout_mask` (bool
    [B, Hq, Nq, P + Nk], True = kept) when given, and rescales the kept ones by 1 / (1 - p).
    lse is the undropped softmax's.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]

    if prefix_k is None:
        prefix_k = k.new_zeros(B, Hkv, 0, D)
        prefix_v = v.new_zeros(B, Hkv, 0, D)
    elif prefix_index is not None:
        prefix_k, prefix_v = prefix_k[prefix_index], prefix_v[prefix_index]
    elif prefix_k.shape[0] == 1:
        prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
    P = prefix_k.shape[2]

    keys = torch.cat([prefix_k, k], dim=2)
    values = torch.cat([prefix_v, v], dim=2)
    group = Hq // Hkv
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)

    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q @ keys.transpose(-1, -2)).to(acc_dtype) * scale  # [B, Hq, Nq, P + Nk]

    visible = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool, device=q.device)
    if causal:
        i = torch.arange(Nq, device=q.device)[:, None]
        j = torch.arange(Nk, device=q.device)[None, :]
        visible = visible & (j <= i + (Nk - Nq))  # bottom-right aligned
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    seq_scores = scores[..., P:]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            seq_scores = seq_scores + attn_mask.to(acc_dtype)
    seq_scores = seq_scores.masked_fill(~visible, float("-inf"))
    scores = torch.cat([scores[..., :P], seq_scores], dim=-1)

    # A row with no visible key (only possible when P == 0) gets out = 0, lse = -inf, and zero
    # gradients, also through lse: logsumexp and softmax see finite inputs there (an all -inf
    # row would give NaN gradients even times a zero), and their results are overwritten.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(empty[..., 0], float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        probs = _dropout.apply_reference(probs, dropout_seed, dropout_offset, dropout_p, P, dropout_mask)
    out = probs.to(values.dtype) @ values
    return out.to(q.dtype), lse
