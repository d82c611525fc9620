"""Launching a kernel with its tile config: the default, or the fastest candidate on this GPU.

On CUDA with autotuning on (configs.autotune_enabled()), each kernel gets one triton.autotune
wrapper per candidate list. Triton times the candidates that fit the device's shared memory on
the first call for each key (head dim, dtype, masks, causal, a power-of-two length bucket) and
reuses the winner for the process. Accumulators that the kernels add into are zeroed before
every timed trial (reset_to_zero) and buffers that already hold other kernels' results are
restored after it (restore_value), so tuning never changes a result.

A deterministic call always uses the default configs: another config sums in another order,
and the winner may differ between processes.

The first call of a shape under autotuning runs each candidate a few times (~0.1-0.5 s per
kernel). Warm up before capturing a CUDA graph.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple

import torch
import triton

from . import configs
from .configs import TileConfig

# Arguments each kind's autotuning is keyed on, beyond the tensors' dtypes (which Triton adds).
_KEYS = {
    "fwd": ["D", "N_BUCKET", "HAS_PREFIX", "HAS_KPM", "MASK_KIND", "CAUSAL", "DROPOUT"],
    "dq": ["D", "N_BUCKET", "HAS_PREFIX", "HAS_KPM", "MASK_KIND", "CAUSAL", "DO_SEQ", "DROPOUT"],
    "dkv": ["D", "N_BUCKET", "HAS_KPM", "MASK_KIND", "CAUSAL", "FUSE_DQ", "DROPOUT"],
    "dprefix": ["D", "N_BUCKET", "ROWS", "FUSE_DQ", "FUSE_DELTA", "ATOMIC", "DROPOUT"],
}
_RESET = {"dkv": ["DQ"], "dprefix": ["DPK", "DPV"]}
_RESTORE = {"dq": ["DQ"], "dprefix": ["DQ"]}

#: kind -> config that every launch of that kind uses, bypassing tuning (the compile check
#: sets it to compile each candidate in turn).
FORCED: Dict[str, TileConfig] = {}


@functools.lru_cache(maxsize=None)
def _shared_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    for name in ("shared_memory_per_block_optin", "max_shared_memory_per_block_optin"):
        if hasattr(props, name):
            return int(getattr(props, name))
    return 101376  # the smallest opt-in limit of sm_86 / sm_89: safe everywhere


def _fits(kind: str, cfg: TileConfig, D: int, dtype: torch.dtype, device_index: int) -> bool:
    elem = 4 if dtype == torch.float32 else 2
    return configs.shared_bytes_estimate(kind, cfg, configs.block_d(D), elem) <= _shared_limit(device_index)


#: (kernel, kind, D, dtype, device index) -> its triton.autotune wrapper
_TUNED: Dict[tuple, object] = {}


def _tuned(kernel, kind: str, D: int, dtype: torch.dtype, device_index: int):
    key = (kernel, kind, D, dtype, device_index)
    if key not in _TUNED:
        cands = configs.candidates(kind, D, dtype)
        fitting = [c for c in cands if _fits(kind, c, D, dtype, device_index)] or cands[:1]
        _TUNED[key] = triton.autotune(
            configs=[triton.Config(dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n), num_warps=c.num_warps,
                                   num_stages=c.num_stages) for c in fitting],
            key=_KEYS[kind], reset_to_zero=_RESET.get(kind), restore_value=_RESTORE.get(kind),
        )(kernel)
    return _TUNED[key]


def launch(kernel, kind: str, grid: Callable[[dict], Tuple[int, ...]], D: int, dtype: torch.dtype, *args,
           tune: bool = True, **kwargs) -> Optional[TileConfig]:
    """Launches kernel (a @triton.heuristics / @triton.jit function) over grid(meta). Returns the
    config it ran with, or None when the autotuner chose (ask the wrapper's best_config)."""
    cfg = FORCED.get(kind)
    device = args[0].device
    if cfg is None and tune and configs.autotune_enabled() and device.type == "cuda":
        cands = configs.candidates(kind, D, dtype)
        if len(cands) > 1:
            _tuned(kernel, kind, D, dtype, device.index or 0)[grid](*args, **kwargs)
            return None
    cfg = cfg or configs.default(kind, D, dtype)
    meta = dict(kwargs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    kernel[grid(meta)](*args, **kwargs, **cfg.meta())
    return cfg


def tuned_configs() -> List[str]:
    """What the autotuner picked so far in this process, one line per (kernel, key): for
    `make gpu-check` to print, and to commit as the defaults."""
    lines = []
    for (_, kind, D, dtype, _), wrapper in _TUNED.items():
        for key, cfg in wrapper.cache.items():
            lines.append(f"{kind} D={D} {str(dtype).replace('torch.', '')} key={key}: {cfg}")
    return lines
