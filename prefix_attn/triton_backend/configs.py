"""Tile configs of the Triton kernels: one table that the launchers, the autotuner and
tools/triton_compile_check.py all read.

Each kernel kind has, per (element bytes, BLOCK_D), a list of candidate configs. The first is the
default: what a single-config environment runs (the interpreter, PREFIX_ATTN_AUTOTUNE=0, a
deterministic backward). On CUDA, with autotuning on (the default), Triton times every candidate
that fits the device's shared memory on the first call of each (head dim, dtype, masks, causal,
length bucket) and keeps the fastest for the process.

Kinds and what BLOCK_M / BLOCK_N tile:
    fwd, dq   a program owns BLOCK_M queries and walks the keys BLOCK_N at a time
    dkv       a program owns BLOCK_N keys and walks the queries BLOCK_M at a time (the sequence's
              dK / dV, with dQ by atomics when the backward may be non-deterministic)
    dprefix   the same for the prefix keys, over the (row, query block) pairs that use them

Every candidate is compiled for sm_80 and sm_90 by `make triton-check`, which fails on one that
does not fit. The defaults are the configs that compiled with no or few spills on sm_90 (see
benchmarks/results/triton-compile/); the other candidates follow FlashAttention-2 / FlexAttention
practice for Hopper (e.g. FlexAttention's sm90 backward uses 64 x 128 tiles, 8 warps, 3 stages).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KINDS = ("fwd", "dq", "dkv", "dprefix")


@dataclass(frozen=True)
class TileConfig:
    """One launch config: BLOCK_M tiles queries, BLOCK_N keys (see the module docstring)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


def _c(*rows) -> List[TileConfig]:
    return [TileConfig(*r) for r in rows]


# (kind, element bytes, BLOCK_D) -> candidates, the default first. 16-bit multiplies on tensor cores
# with float32 accumulation; float32 multiplies in IEEE fp32 (no TF32), which needs many more
# registers: small tiles.
CANDIDATES: Dict[Tuple[str, int, int], List[TileConfig]] = {
    ("fwd", 2, 64): _c((128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 4)),
    ("fwd", 2, 128): _c((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 4)),
    ("fwd", 2, 256): _c((64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)),
    ("fwd", 4, 64): _c((32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2)),
    ("fwd", 4, 128): _c((32, 32, 4, 2), (64, 32, 8, 2)),
    ("fwd", 4, 256): _c((16, 32, 4, 1), (32, 16, 4, 1)),
    ("dq", 2, 64): _c((128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)),
    ("dq", 2, 128): _c((128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)),
    ("dq", 2, 256): _c((32, 32, 4, 2), (64, 32, 8, 2)),
    ("dq", 4, 64): _c((64, 32, 8, 2), (32, 32, 4, 2)),
    ("dq", 4, 128): _c((32, 32, 4, 2), (64, 32, 8, 2)),
    ("dq", 4, 256): _c((16, 32, 4, 1), (32, 16, 4, 1)),
    ("dkv", 2, 64): _c((32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3)),
    ("dkv", 2, 128): _c((32, 128, 8, 3), (16, 128, 8, 3), (64, 64, 8, 3)),
    ("dkv", 2, 256): _c((32, 32, 4, 1), (32, 64, 8, 1)),
    ("dkv", 4, 64): _c((32, 64, 8, 2), (32, 32, 4, 2)),
    ("dkv", 4, 128): _c((32, 32, 4, 2), (16, 64, 4, 2)),
    ("dkv", 4, 256): _c((16, 32, 4, 1), (16, 16, 4, 1)),
    # The prefix gradient walks many short (row, query block) items per program: dK / dV's tile
    # shapes, plus wide query tiles for short sequences (fewer, longer matmuls). Candidates that
    # spilled hundreds of bytes on sm_90 in the compile check (64 x 64 with 4 warps at D = 128,
    # 128 x 64 at D = 64) are left out: the autotuner would only waste the first call on them.
    ("dprefix", 2, 64): _c((32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)),
    ("dprefix", 2, 128): _c((32, 128, 8, 3), (16, 128, 8, 3), (128, 32, 8, 2)),
    ("dprefix", 2, 256): _c((32, 32, 4, 1), (32, 64, 8, 1)),
    ("dprefix", 4, 64): _c((32, 64, 8, 2), (32, 32, 4, 2)),
    ("dprefix", 4, 128): _c((32, 32, 4, 2), (16, 64, 4, 2)),
    ("dprefix", 4, 256): _c((16, 32, 4, 1), (16, 16, 4, 1)),
}

# Under the interpreter: small tiles (it is slow) and BLOCK_M != BLOCK_N, so the tests exercise
# the asymmetric tilings the GPU configs use, with several tiles per row and a ragged last one.
_INTERPRET: Dict[str, TileConfig] = {
    "fwd": TileConfig(32, 16, 4, 1), "dq": TileConfig(32, 16, 4, 1),
    "dkv": TileConfig(16, 32, 4, 1), "dprefix": TileConfig(16, 32, 4, 1),
}
# Head dims above 256: the smallest tiles tl.dot takes (rare; compiled by triton-check at 512).
_HUGE_D = TileConfig(16, 16, 4, 1)


# The backward's preprocess (Delta = rowsum(dO * O)): rows per program, 4 warps.
PREPROCESS_BLOCK_M = 16 if INTERPRET else 64

_SM_COUNT: Dict[int, int] = {}


def dprefix_programs(device: torch.device) -> int:
    """Programs wanted for the prefix gradient, which splits the (row, query block) pairs that use
    a prefix block into chunks to get them: twice the SMs (asked once per device). Elsewhere (the
    interpreter) an odd count, so that tests split rows across uneven chunks."""
    if device.type != "cuda":
        return 7
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def block_d(D: int) -> int:
    """The padded head dim the kernels tile with: a power of two, at least 16."""
    return max(16, 1 << (max(D, 1) - 1).bit_length())


def _key(kind: str, D: int, dtype: torch.dtype) -> Tuple[str, int, int]:
    size = 4 if dtype == torch.float32 else 2
    return kind, size, min(max(block_d(D), 64), 256)


def candidates(kind: str, D: int, dtype: torch.dtype) -> List[TileConfig]:
    """Every config the autotuner may try for this kernel, the default first."""
    if INTERPRET:
        return [_INTERPRET[kind]]
    if block_d(D) > 256:
        return [_HUGE_D]
    return list(CANDIDATES[_key(kind, D, dtype)])


def default(kind: str, D: int, dtype: torch.dtype) -> TileConfig:
    return candidates(kind, D, dtype)[0]


def autotune_enabled() -> bool:
    """Autotuning is on by default on CUDA; PREFIX_ATTN_AUTOTUNE=0 turns it off (every kernel then
    runs its default config), and the interpreter never tunes."""
    return not INTERPRET and os.environ.get("PREFIX_ATTN_AUTOTUNE", "1") != "0"


def shared_bytes_estimate(kind: str, cfg: TileConfig, block_d_: int, elem: int) -> int:
    """Shared memory a config needs, roughly: the pipelined K/V (or Q/dO) tiles times the stages,
    plus the tile the program keeps. Used only to skip candidates that cannot fit a device
    before the autotuner compiles them; triton-check reports the real figure."""
    m, n, s = cfg.block_m, cfg.block_n, max(cfg.num_stages, 1)
    if kind in ("fwd", "dq"):
        streamed, resident = 2 * n * block_d_, (2 if kind == "dq" else 1) * m * block_d_
    else:
        streamed, resident = 2 * m * block_d_, 2 * n * block_d_
    return elem * (s * streamed + resident)
