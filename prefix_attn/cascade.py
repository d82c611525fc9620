"""Merging partial attention results: the cascade primitive.

Attention over the keys of A and B together equals the two attentions over A and over B alone,
each returning its output and log-sum-exp, merged by those log-sum-exps:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

It is how a prefix whose keys need something the kernels take only on the sequence (T5's
relative position bias on the prefix keys) is computed from two `prefix_attention` calls, and how
shared-prefix serving kernels (cascade attention) split the work.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge two attention results over disjoint key sets into the result over their union.

    Shapes: out_a, out_b [..., D] (e.g. [B, H, N, D]) in one dtype; lse_a, lse_b [...] (natural
    log, as `prefix_attention(..., return_lse=True)` returns). Returns (out [..., D] in out_a's
    dtype, lse [...] in float32, float64 for float64 inputs). The merge runs in at least float32.

    A row that saw no key in one part (lse -inf, out 0) takes the other part's result unchanged;
    a row that saw no key in either gets out 0 and lse -inf, and zero gradients, never NaN.
    Differentiable in all four inputs. Dropout, when each part applied it over its own keys with
    the undropped softmax's lse, stays exact: the merge rescales both parts by the factors of the
    undropped softmax over the union.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"prefix_attn.merge_attention_states: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"prefix_attn.merge_attention_states: {name} must be floating, got {t.dtype}")
    if out_a.shape != out_b.shape or out_a.dim() < 1:
        raise ValueError(f"prefix_attn.merge_attention_states: out_a and out_b must have one shape [..., D]; got "
                         f"{list(out_a.shape)} and {list(out_b.shape)}")
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"prefix_attn.merge_attention_states: out_b has dtype {out_b.dtype} but out_a has "
                        f"{out_a.dtype}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != out_a.shape[:-1]:
            raise ValueError(f"prefix_attn.merge_attention_states: {name} must be out's shape without its last dim "
                             f"{list(out_a.shape[:-1])}; got {list(lse.shape)}")
    for name, t in (("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if t.device != out_a.device:
            raise ValueError(f"prefix_attn.merge_attention_states: {name} is on {t.device} but out_a is on "
                             f"{out_a.device}")

    acc = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), torch.float32)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    # log(exp(a) + exp(b)) about the larger one, written out so that a row with no key on either
    # side (both -inf) stays -inf with a zero gradient: torch.logaddexp's backward gives NaN there.
    top = torch.maximum(lse_a, lse_b)
    nothing = torch.isneginf(top)
    top = torch.where(nothing, torch.zeros_like(top), top).detach()
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    total = torch.where(nothing, torch.ones_like(total), total)
    lse = torch.where(nothing, torch.full_like(top, float("-inf")), top + torch.log(total))
    out = (out_a.to(acc) * (w_a / total).unsqueeze(-1) + out_b.to(acc) * (w_b / total).unsqueeze(-1))
    return out.to(out_a.dtype), lse
