"""The Triton backend: fused kernels for attention over [prefix ; sequence], forward and backward.

Name ladder, as in the rest of the package:
    _fwd_kernel                     forward.py    -> triton_forward   \\
    _bwd_*_kernel                   backward.py   -> triton_backward   > ops.py: torch.ops.prefix_attn.
                                                                      /  triton_fwd / triton_bwd
Shared pieces:
    tiles.py     visibility (prefix always, bottom-right causal, masks) and the tile ranges
    configs.py   the tile configs: defaults and autotuning candidates, read by the launchers,
                 the autotuner and tools/triton_compile_check.py
    tuning.py    launching with the default config or the autotuned one
    scores.py    score units (base 2 with the scale folded in), dot precision, optional tensors

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (tests only; there tl.dot works in
float32 because the interpreter's bf16 dot is wrong, and only the default configs run).
"""
from .backward import triton_backward
from .forward import triton_forward
from .ops import triton_bwd, triton_fwd

__all__ = ["triton_forward", "triton_backward", "triton_fwd", "triton_bwd"]
