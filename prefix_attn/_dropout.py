"""Attention dropout: the random stream every backend shares, and a test hook to see its masks.

Which probabilities a call drops is a pure function of (seed, offset, batch row, query head,
query, key), so the backward regenerates the forward's mask instead of storing it, and every
backend (Triton, CPU, CUDA and this file's copy, which the reference backend uses) drops the
same ones. csrc/prefix_attn_dropout.h is the definition:

    key     (k0, k1)         = (seed & 0xffffffff, seed >> 32)
    counter (c0, c1, c2, c3) = ((col >> 2) | (is_prefix << 31), i, b * Hq + h, offset)
    r                        = Philox4x32-10(counter, key)[col & 3]
    keep                     iff r >= floor(dropout_p * 2^32); kept probabilities x 1 / (1 - p)

col counts keys within their segment (prefix key p, or sequence key n), so a four-aligned run of
columns takes its four words from one Philox call.

(seed, offset) come from torch's generator for the device, so torch.manual_seed makes a run
reproducible. On CUDA the seed is the generator's and the offset is the generator's Philox
offset, advanced by each call (no host synchronisation); on CPU each call draws a fresh 63-bit
seed from the CPU generator, with offset 0.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MUL_A, _MUL_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_PREFIX_BIT = 1 << 31


def threshold(dropout_p: float) -> int:
    """The 32-bit threshold below which a word drops: floor(p * 2^32), exact in double."""
    return min(int(math.floor(dropout_p * 2.0 ** 32)), _MASK32)


def keep_scale(dropout_p: float) -> float:
    return 1.0 / (1.0 - dropout_p)


def _mulhilo(a: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of a * m for uint32 values held in int64, in 16-bit limbs so no
    product leaves int64's range."""
    a0, a1 = a & 0xFFFF, a >> 16
    m0, m1 = m & 0xFFFF, m >> 16
    t = a0 * m0
    mid = a1 * m0 + a0 * m1 + (t >> 16)
    hi = a1 * m1 + (mid >> 16)
    lo = ((mid & 0xFFFF) << 16) | (t & 0xFFFF)
    return hi & _MASK32, lo


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of broadcastable int64 tensors holding uint32 counters, key from a 64-bit seed."""
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(c2, _MUL_B)
        hi_a, lo_a = _mulhilo(c0, _MUL_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _segment_words(seed: int, offset: int, B: int, Hq: int, Nq: int, n: int, is_prefix: bool,
                   device: torch.device) -> Tensor:
    """The random words of one segment's n columns: int64 [B, Hq, Nq, n]."""
    n4 = (n + 3) // 4
    col4 = torch.arange(n4, device=device, dtype=torch.int64) | (_PREFIX_BIT if is_prefix else 0)
    i = torch.arange(Nq, device=device, dtype=torch.int64)
    bh = torch.arange(B * Hq, device=device, dtype=torch.int64).reshape(B, Hq)
    words = philox4x32_10(col4.view(1, 1, 1, n4), i.view(1, 1, Nq, 1), bh.view(B, Hq, 1, 1),
                          torch.tensor(offset & _MASK32, device=device, dtype=torch.int64), seed)
    words = torch.stack([w.expand(B, Hq, Nq, n4) for w in words], dim=-1)  # [..., n4, 4]: col = 4 * col4 + w
    return words.reshape(B, Hq, Nq, 4 * n4)[..., :n]


def keep_mask(seed: int, offset: int, dropout_p: float, B: int, Hq: int, Nq: int, P: int, Nk: int,
              device: torch.device | str = "cpu") -> Tensor:
    """The keep mask a call with this (seed, offset, dropout_p) uses: bool [B, Hq, Nq, P + Nk],
    prefix keys first."""
    device = torch.device(device)
    thr = threshold(dropout_p)
    parts = [_segment_words(seed, offset, B, Hq, Nq, n, is_prefix, device) >= thr
             for n, is_prefix in ((P, True), (Nk, False))]
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------------------------
# Drawing (seed, offset) from torch's generators

# Eager even inside torch.compile: the draw reads the generator into Python ints, which a graph
# cannot hold, so a call with dropout makes one graph break here, and draws what eager would (a
# compiled model drops exactly as the eager one under the same seed).
@torch.compiler.disable
def next_stream(device: torch.device) -> Tuple[int, int]:
    """(seed, offset) for one call's dropout on `device`, advancing torch's generator for it."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            # the (seed, offset) drawn now would be baked into the graph: every replay would drop
            # the same entries
            raise NotImplementedError("prefix_attn: attention dropout inside CUDA graph capture is not supported "
                                      "(each replay would reuse one mask); capture with dropout_p=0")
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)  # torch counts 32-bit words per thread, four per Philox call
        return gen.initial_seed() & ((1 << 63) - 1), (offset // 4) & _MASK32
    return int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64)), 0


# ----------------------------------------------------------------------------------------------
# The test hook

@dataclass
class DropoutCall:
    """One call's dropout, as `record_masks` saw it: enough to rebuild its mask."""
    seed: int
    offset: int
    dropout_p: float
    shape: Tuple[int, int, int, int, int]  # (B, Hq, Nq, P, Nk)
    device: torch.device

    def mask(self) -> Tensor:
        """bool [B, Hq, Nq, P + Nk], True = kept, prefix keys first."""
        return keep_mask(self.seed, self.offset, self.dropout_p, *self.shape, device=self.device)


_recorders: List[List[DropoutCall]] = []


def note_call(seed: int, offset: int, dropout_p: float, shape: Tuple[int, int, int, int, int],
              device: torch.device) -> None:
    for calls in _recorders:
        calls.append(DropoutCall(seed, offset, dropout_p, shape, device))


@contextlib.contextmanager
def record_masks() -> Iterator[List[DropoutCall]]:
    """A test aid: collects a DropoutCall for each prefix_attention call with dropout inside the
    block, whatever the backend; `.mask()` gives the mask that call's kernels used."""
    calls: List[DropoutCall] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def check_dropout_p(dropout_p, name: str = "dropout_p") -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"prefix_attn: {name} must be a float in [0, 1), got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"prefix_attn: {name} must lie in [0, 1), got {dropout_p!r}")
    return p


def apply_reference(probs: Tensor, seed: int, offset: int, dropout_p: float, P: int,
                    mask: Optional[Tensor] = None) -> Tensor:
    """probs [B, Hq, Nq, P + Nk] with the stream's mask (or `mask`) applied and kept ones rescaled."""
    B, Hq, Nq, L = probs.shape
    if mask is None:
        mask = keep_mask(seed, offset, dropout_p, B, Hq, Nq, P, L - P, device=probs.device)
    return probs * mask.to(probs.dtype) * keep_scale(dropout_p)
