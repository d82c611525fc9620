"""The oracle: plain PyTorch that builds [prefix ; sequence] explicitly and masks it.

It takes the normalised arguments every backend takes (see `_inputs.AttnInputs`) and computes
as PyTorch's own math attention does: q @ k^T and probs @ v are matmuls in the inputs' dtype,
the masking, softmax and lse in at least float32. Autograd comes for free. Keep it obviously
right; speed is not its job.
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

    if key_padding_mask is not None:
        # A padded key never affects any result, whatever it holds (inf and NaN included): its
        # zero probability would still multiply its value (0 * inf = NaN), and its zero score
        # gradient its key. Zeroed here, its own dk / dv are exactly 0 too.
        kept = key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(~kept, 0.0), v.masked_fill(~kept, 0.0)

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
    # gradients, also through lse: the softmax sees finite inputs there (an all -inf row would
    # give NaN gradients even times a zero), and its results are overwritten.
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)
    # lse = max + log(sum(exp(s - max))) with the max held constant: the gradient is exactly the
    # softmax. torch.logsumexp's backward is exp(s - lse) instead, and when every visible score is
    # near finfo.min (an additive Hugging Face mask over all of them) lse rounds to the max,
    # log(l) is lost, and that gradient comes out l times too large.
    if scores.shape[-1]:
        row_max = scores.detach().amax(dim=-1, keepdim=True)
    else:  # no key at all (P = Nk = 0)
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    lse = (row_max + (scores - row_max).exp().sum(dim=-1, keepdim=True).log())[..., 0]
    lse = lse.masked_fill(empty[..., 0], float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        probs = _dropout.apply_reference(probs, dropout_seed, dropout_offset, dropout_p, P, dropout_mask)
    out = (probs.to(values.dtype) @ values).to(q.dtype)
    # q's layout, as the kernels give (a transposed [B, N, H, D] view of q gives one of out).
    return torch.empty_like(q).copy_(out), lse
