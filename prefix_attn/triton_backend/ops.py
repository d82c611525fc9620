"""torch.library ops for the Triton kernels: the schema, fake kernels and autograd of the compiled
ops (_ops.py), so that torch.compile sees one opaque op and autograd asks only for the gradients
it needs."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dropout, _ops
from .._inputs import check_op_grad_inputs, check_op_inputs
from .backward import triton_backward
from .forward import triton_forward


@torch.library.custom_op("prefix_attn::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
               prefix_index: Optional[Tensor], key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
               scale: float, causal: bool, deterministic: bool, dropout_p: float = 0.0, dropout_seed: int = 0,
               dropout_offset: int = 0) -> Tuple[Tensor, Tensor]:
    check_op_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale)
    _check_dropout_stream(dropout_p, dropout_seed, dropout_offset)
    return triton_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale, causal,
                          deterministic, dropout_p, dropout_seed, dropout_offset)


@torch.library.custom_op("prefix_attn::triton_bwd", mutates_args=())
def triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
               prefix_v: Optional[Tensor], prefix_index: Optional[Tensor], key_padding_mask: Optional[Tensor],
               attn_mask: Optional[Tensor], out: Tensor, lse: Tensor, dlse: Optional[Tensor], scale: float,
               causal: bool, deterministic: bool, need_dq: bool, need_dkv: bool, need_dprefix: bool,
               dropout_p: float = 0.0, dropout_seed: int = 0,
               dropout_offset: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_op_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale)
    check_op_grad_inputs(q, dout, out, lse, dlse)
    _check_dropout_stream(dropout_p, dropout_seed, dropout_offset)
    return triton_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse,
                           dlse, scale, causal, deterministic, need_dq, need_dkv, need_dprefix, dropout_p,
                           dropout_seed, dropout_offset)


def _check_dropout_stream(dropout_p: float, seed: int, offset: int) -> None:
    """As dropout_params in csrc/prefix_attn_api.cpp: p in [0, 1), the seed a non-negative int64,
    the offset a uint32 (what _dropout.next_stream draws)."""
    _dropout.check_dropout_p(dropout_p)
    if seed < 0:
        raise ValueError(f"prefix_attn: dropout_seed must be non-negative, got {seed}")
    if not 0 <= offset < 2**32:
        raise ValueError(f"prefix_attn: dropout_offset must lie in [0, 2^32), got {offset}")


_ops.register_attention_op(triton_fwd, triton_bwd)
