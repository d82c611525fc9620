"""Host-side helpers every launcher shares: score units, dot precision, optional tensors."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dropout
from . import configs
from .tiles import LOG2E as _LOG2E

LOG2E = float(_LOG2E.value)  # the kernels' constant, on the host


def score_units(attn_mask: Optional[Tensor], scale: float) -> Tuple[float, float]:
    """(score multiplier, EXP_MUL). Scores are base 2 (the scale times log2 e folded into one
    constant, exp2 taken directly) unless an additive float mask is given: Hugging Face masks
    hold finfo.min, which times log2 e overflows to -inf, so scores stay natural then."""
    if mask_kind(attn_mask) == 2:
        return scale, LOG2E
    return scale * LOG2E, 1.0


def mask_kind(attn_mask: Optional[Tensor]) -> int:
    """0: no attn_mask; 1: bool (True = attend); 2: additive float."""
    if attn_mask is None:
        return 0
    return 1 if attn_mask.dtype == torch.bool else 2


def dot_args(dtype: torch.dtype, D: int) -> dict:
    """Constexprs of the head dim and the matmul precision. float32 inputs must not silently
    drop to TF32; the interpreter's bf16 dot is wrong, so it multiplies in float32 too."""
    f32 = configs.INTERPRET or dtype == torch.float32
    bd = configs.block_d(D)
    return dict(BLOCK_D=bd, EVEN_D=bd == D, DOT_F32=f32, PRECISION="ieee" if f32 else "tf32")


def optional(t: Optional[Tensor], fallback: Tensor, ndim: int):
    """(tensor, strides) for an optional kernel argument: a placeholder and zero strides if None."""
    if t is None:
        return fallback, (0,) * ndim
    return t, tuple(t.stride())


def as_bytes(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Bool masks as uint8 (Triton loads bools as int1 pointers awkwardly)."""
    return mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask


def n_bucket(n: int) -> int:
    """Autotuning key for a length: the next power of two, so that a tuned config serves a range."""
    return 1 << max(int(n) - 1, 0).bit_length()


def dropout_args(dropout_p: float, seed: int, offset: int) -> Tuple[int, int, int, float]:
    """(seed, offset, threshold, 1 / (1 - p)): the kernels' dropout arguments (any values when
    dropout_p == 0: the DROPOUT constexpr is off and they are never read)."""
    if dropout_p <= 0.0:
        return 0, 0, 0, 1.0
    return seed, offset, _dropout.threshold(dropout_p), _dropout.keep_scale(dropout_p)
