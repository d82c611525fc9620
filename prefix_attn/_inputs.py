"""Checking and normalising the arguments of prefix_attention.

Every backend receives the same normalised form, `AttnInputs`:
  - the prefix is always 4-D, [T, Hkv, P, D]: a shared [Hkv, P, D] prefix becomes a view
    [1, Hkv, P, D]; row b uses entry prefix_index[b], or entry 0 when T == 1, or entry b;
  - prefix_index is int64 [B] or None;
  - key_padding_mask is bool [B, Nk] or None;
  - attn_mask is bool or float in the computation's precision (float32; float64 for float64
    inputs), expanded (a view, no copy) to [B, Hq, Nq, Nk], or None;
  - scale is a float.
Errors name the argument and the shapes it got.

prefix_index's values are not read here: the backends' ops check them against the bank
(`check_prefix_index_range`), since they are what reads memory with them, they can be called
directly, and they run eagerly even inside a torch.compile graph. So the values are checked
once per op, and on CUDA without a host synchronisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class AttnInputs:
    q: Tensor
    k: Tensor
    v: Tensor
    prefix_k: Optional[Tensor]
    prefix_v: Optional[Tensor]
    prefix_index: Optional[Tensor]
    key_padding_mask: Optional[Tensor]
    attn_mask: Optional[Tensor]
    scale: float
    causal: bool
    # Attention dropout: probability and the call's stream (see _dropout.py); 0.0 = none.
    dropout_p: float = 0.0
    dropout_seed: int = 0
    dropout_offset: int = 0

    @property
    def num_prefix(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[2]


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _require_tensor(x, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"prefix_attn: {name} must be a torch.Tensor, got {type(x).__name__}")


def _same_device(t: Tensor, name: str, q: Tensor) -> None:
    if t.device != q.device:
        raise ValueError(f"prefix_attn: {name} is on {t.device} but q is on {q.device}")


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, dtypes) -> tuple:
    """Ranks, dtypes (q's among `dtypes`, k's and v's equal to it), devices and the B / D / head
    relations of q, k, v; returns (B, Hq, Nq, D, Hkv, Nk)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_tensor(t, name)
    if q.dim() != 4:
        raise ValueError(f"prefix_attn: q must be 4-D [B, Hq, Nq, D], got shape {_shape(q)}")
    if k.dim() != 4:
        raise ValueError(f"prefix_attn: k must be 4-D [B, Hkv, Nk, D], got shape {_shape(k)}")
    if v.shape != k.shape:
        raise ValueError(f"prefix_attn: v must have k's shape {_shape(k)}, got {_shape(v)}")
    if q.dtype not in dtypes:
        raise TypeError(f"prefix_attn: q must be one of {', '.join(str(d) for d in dtypes)}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"prefix_attn: {name} has dtype {t.dtype} but q has {q.dtype}; all inputs must match")
        _same_device(t, name, q)
    B, Hq, Nq, D = q.shape
    _, Hkv, Nk, _ = k.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"prefix_attn: k must be [B, Hkv, Nk, D] with q's B={B} and D={D}; q has shape {_shape(q)}, "
            f"k has shape {_shape(k)}")
    if D < 1:
        raise ValueError(f"prefix_attn: head dim must be at least 1, q has shape {_shape(q)}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"prefix_attn: q's head count must be a multiple of k's (MHA, GQA, MQA); q has shape {_shape(q)}, "
            f"k has shape {_shape(k)}")
    return B, Hq, Nq, D, Hkv, Nk


def check_inputs(q, k, v, prefix_k=None, prefix_v=None, *, causal=False, softmax_scale=None,
                 key_padding_mask=None, attn_mask=None, prefix_index=None) -> AttnInputs:
    B, Hq, Nq, D, Hkv, Nk = _check_qkv(q, k, v, FLOAT_DTYPES)

    if softmax_scale is None:
        scale = 1.0 / math.sqrt(D)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"prefix_attn: softmax_scale must be a number or None, got {type(softmax_scale).__name__}")
        scale = float(softmax_scale)
        if not math.isfinite(scale):
            raise ValueError(f"prefix_attn: softmax_scale must be finite, got {scale}")

    pk, pv, index = _check_prefix(prefix_k, prefix_v, prefix_index, q, B, Hkv, D)
    kpm = _check_key_padding_mask(key_padding_mask, q, B, Nk)
    mask = _check_attn_mask(attn_mask, q, B, Hq, Nq, Nk)
    return AttnInputs(q, k, v, pk, pv, index, kpm, mask, scale, bool(causal))


def _check_prefix(prefix_k, prefix_v, prefix_index, q, B, Hkv, D):
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_attn: give both prefix_k and prefix_v, or neither")
    if prefix_k is None:
        if prefix_index is not None:
            raise ValueError("prefix_attn: prefix_index was given without a prefix")
        return None, None, None
    _require_tensor(prefix_k, "prefix_k")
    _require_tensor(prefix_v, "prefix_v")
    if prefix_v.shape != prefix_k.shape:
        raise ValueError(f"prefix_attn: prefix_v must have prefix_k's shape {_shape(prefix_k)}, got {_shape(prefix_v)}")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            raise TypeError(f"prefix_attn: {name} has dtype {t.dtype} but q has {q.dtype}; all inputs must match")
        _same_device(t, name, q)
    if prefix_k.dim() not in (3, 4) or prefix_k.shape[-3] != Hkv or prefix_k.shape[-1] != D:
        raise ValueError(
            f"prefix_attn: prefix_k must be [Hkv, P, D] (shared), [B, Hkv, P, D] (one per row) or "
            f"[T, Hkv, P, D] (a bank, with prefix_index) with Hkv={Hkv}, D={D}; got shape {_shape(prefix_k)}")
    if prefix_k.dim() == 3:
        if prefix_index is not None:
            raise ValueError(
                f"prefix_attn: prefix_index needs a bank [T, Hkv, P, D]; prefix_k is shared, shape {_shape(prefix_k)}")
        return prefix_k.unsqueeze(0), prefix_v.unsqueeze(0), None

    T = prefix_k.shape[0]
    if prefix_index is None:
        if T != B:
            raise ValueError(
                f"prefix_attn: a 4-D prefix without prefix_index is one prefix per row and must have B={B} "
                f"entries; prefix_k has shape {_shape(prefix_k)} (pass prefix_index to use it as a bank)")
        return prefix_k, prefix_v, None
    _require_tensor(prefix_index, "prefix_index")
    if prefix_index.dtype.is_floating_point or prefix_index.dtype.is_complex or prefix_index.dtype == torch.bool:
        raise TypeError(f"prefix_attn: prefix_index must be an integer tensor, got {prefix_index.dtype}")
    if prefix_index.shape != (B,):
        raise ValueError(f"prefix_attn: prefix_index must have shape [B] = [{B}], got {_shape(prefix_index)}")
    _same_device(prefix_index, "prefix_index", q)
    return prefix_k, prefix_v, prefix_index.to(torch.int64)


def _host_reads_are_free(t: Tensor) -> bool:
    """Whether reading t's values on the host costs nothing: true on CPU; on CUDA it waits for
    the stream (and a captured CUDA graph cannot contain it). A function so tests can take the
    CUDA path on CPU and count the host reads it makes (none)."""
    return t.device.type == "cpu"


def check_prefix_index_range(prefix_index: Tensor, prefix_k: Tensor) -> None:
    """prefix_index's values must lie in [0, T) for the bank prefix_k [T, Hkv, P, D]. Called by
    each op that indexes the bank with them, before it reads (csrc/prefix_attn_api.cpp has the
    same check for the compiled ops).

    On CPU: the exact check, a ValueError naming the range and the values seen. On CUDA (and
    while torch.compile traces): a device-side assert, as torch's own index ops do. It reads
    nothing back, and is queued before the kernels on the same stream; a failed device assert
    stops all later work on the device, so no kernel reads out of bounds. The error surfaces at
    the next synchronisation as CUDA's "device-side assert triggered" (a RuntimeError; the
    message below is what the assert carries, which CUDA may not show)."""
    T = prefix_k.shape[0]
    if prefix_index.numel() == 0:
        return
    if _host_reads_are_free(prefix_index) and not torch.compiler.is_compiling():
        lo, hi = int(prefix_index.min()), int(prefix_index.max())
        if lo < 0 or hi >= T:
            raise ValueError(
                f"prefix_attn: prefix_index values must lie in [0, {T}) for a bank of shape {_shape(prefix_k)}, "
                f"got values in [{lo}, {hi}]")
        return
    torch._assert_async(((prefix_index >= 0) & (prefix_index < T)).all(),
                        f"prefix_attn: prefix_index values must lie in [0, {T}) for a bank of shape {_shape(prefix_k)}")


def _check_key_padding_mask(mask, q, B, Nk):
    if mask is None:
        return None
    _require_tensor(mask, "key_padding_mask")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(
            f"prefix_attn: key_padding_mask must be bool or an integer 0/1 tensor (True / 1 = attend), got "
            f"{mask.dtype}: a float mask is ambiguous (additive or multiplicative?)")
    if mask.shape != (B, Nk):
        raise ValueError(f"prefix_attn: key_padding_mask must be [B, Nk] = [{B}, {Nk}], got {_shape(mask)}")
    _same_device(mask, "key_padding_mask", q)
    return mask if mask.dtype == torch.bool else mask != 0


def _check_attn_mask(mask, q, B, Hq, Nq, Nk):
    if mask is None:
        return None
    _require_tensor(mask, "attn_mask")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"prefix_attn: attn_mask must be bool (True = attend) or floating (additive), got {mask.dtype}")
    target = (B, Hq, Nq, Nk)
    if mask.dim() > 4 or any(s not in (1, t) for s, t in zip(mask.shape[::-1], target[::-1])):
        raise ValueError(
            f"prefix_attn: attn_mask must broadcast to [B, Hq, Nq, Nk] = {list(target)} (sequence keys only; "
            f"the prefix is always visible), got shape {_shape(mask)}")
    _same_device(mask, "attn_mask", q)
    if mask.dtype != torch.bool:
        if mask.requires_grad:
            raise NotImplementedError("prefix_attn: gradients with respect to a float attn_mask are not supported")
        # The computation's precision, as the reference's scores: float32 for the kernels
        # (16-bit and float32 inputs), float64 for float64 inputs (only the reference runs them).
        mask = mask.to(torch.promote_types(q.dtype, torch.float32))
    return mask.expand(target)


def check_op_inputs(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
                    prefix_index: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    attn_mask: Optional[Tensor], scale: float) -> None:
    """The arguments of an attention op in their normalised form (`AttnInputs`; the op schemas of
    _ops.py), checked on the host from shapes, dtypes and devices only: no value is read, so
    nothing waits for a GPU. For the ops written in Python (triton_backend/ops.py), which can be
    called directly, past `check_inputs`: the same rules as check_inputs in
    csrc/prefix_attn_api.cpp, which guards the compiled ops."""
    def fail(msg: str):
        raise ValueError(f"prefix_attn: {msg}")

    B, Hq, Nq, D, Hkv, Nk = _check_qkv(q, k, v, (torch.float16, torch.bfloat16, torch.float32))
    if not math.isfinite(scale):
        fail(f"scale must be finite, got {scale}")
    if (prefix_k is None) != (prefix_v is None):
        fail("give both prefix_k and prefix_v, or neither")
    if prefix_k is not None:
        _require_tensor(prefix_k, "prefix_k")
        _require_tensor(prefix_v, "prefix_v")
        if prefix_k.dim() != 4 or prefix_k.shape[1] != Hkv or prefix_k.shape[3] != D:
            fail(f"prefix_k must be [T, Hkv, P, D] = [T, {Hkv}, P, {D}] here, got shape {_shape(prefix_k)}")
        if prefix_v.shape != prefix_k.shape:
            fail(f"prefix_v must have prefix_k's shape {_shape(prefix_k)}, got {_shape(prefix_v)}")
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != q.dtype:
                raise TypeError(f"prefix_attn: {name} has dtype {t.dtype} but q has {q.dtype}; all inputs must match")
            _same_device(t, name, q)
        T = prefix_k.shape[0]
        if T < 1 and B > 0:
            fail(f"prefix_k has no entries, shape {_shape(prefix_k)}")
        if prefix_index is not None:
            _require_tensor(prefix_index, "prefix_index")
            if prefix_index.dtype != torch.int64:
                raise TypeError(f"prefix_attn: prefix_index must be int64, got {prefix_index.dtype}")
            if prefix_index.shape != (B,):
                fail(f"prefix_index must have shape [B] = [{B}], got {_shape(prefix_index)}")
            _same_device(prefix_index, "prefix_index", q)
        elif T not in (1, B):
            fail(f"without prefix_index, prefix_k must have 1 entry (shared) or B = {B} entries (one per row), "
                 f"got shape {_shape(prefix_k)}")
    elif prefix_index is not None:
        fail("prefix_index was given without a prefix")
    if key_padding_mask is not None:
        _require_tensor(key_padding_mask, "key_padding_mask")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"prefix_attn: key_padding_mask must be bool, got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (B, Nk):
            fail(f"key_padding_mask must be [B, Nk] = [{B}, {Nk}], got shape {_shape(key_padding_mask)}")
        _same_device(key_padding_mask, "key_padding_mask", q)
    if attn_mask is not None:
        _require_tensor(attn_mask, "attn_mask")
        if attn_mask.dtype not in (torch.bool, torch.float32):
            raise TypeError(f"prefix_attn: attn_mask must be bool or float32 here, got {attn_mask.dtype}")
        if attn_mask.shape != (B, Hq, Nq, Nk):
            fail(f"attn_mask must be expanded to [B, Hq, Nq, Nk] = [{B}, {Hq}, {Nq}, {Nk}], got shape "
                 f"{_shape(attn_mask)}")
        _same_device(attn_mask, "attn_mask", q)


def check_op_grad_inputs(q: Tensor, dout: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor]) -> None:
    """The backward op's own arguments, past those of `check_op_inputs` (as bwd in
    csrc/prefix_attn_api.cpp): dout and out like q, lse (and dlse) float32 [B, Hq, Nq]."""
    for name, t in (("dout", dout), ("out", out)):
        _require_tensor(t, name)
        if t.shape != q.shape:
            raise ValueError(f"prefix_attn: {name} must have q's shape {_shape(q)}, got {_shape(t)}")
        if t.dtype != q.dtype:
            raise TypeError(f"prefix_attn: {name} must have dtype {q.dtype}, got {t.dtype}")
        _same_device(t, name, q)
    for name, t in (("lse", lse), ("dlse", dlse)):
        if t is None:
            continue
        _require_tensor(t, name)
        if t.shape != q.shape[:3] or t.dtype != torch.float32:
            raise ValueError(f"prefix_attn: {name} must be float32 [B, Hq, Nq] = {list(q.shape[:3])}, got "
                             f"{t.dtype} {_shape(t)}")
        _same_device(t, name, q)
