"""The compiled ops, torch.ops.prefix_attn.fwd / bwd: their fake kernels and their autograd.

Schemas and the CPU / CUDA kernels are registered in C++ (csrc/prefix_attn_api.cpp) when
prefix_attn._C loads. Here they gain what torch.compile and autograd need:
  - fake kernels, which give output shapes and strides without running anything;
  - an autograd formula that asks bwd only for the gradients autograd needs;
  - a bwd autograd formula that refuses double backward.

Op forms (the normalised arguments of `_inputs.AttnInputs`):
  fwd(q, k, v, prefix_k?, prefix_v?, prefix_index?, key_padding_mask?, attn_mask?,
      scale, causal, deterministic, dropout_p=0, dropout_seed=0, dropout_offset=0) -> (out, lse)
  bwd(dout, q, k, v, prefix_k?, prefix_v?, prefix_index?, key_padding_mask?, attn_mask?,
      out, lse, dlse?, scale, causal, deterministic, need_dq, need_dkv, need_dprefix,
      dropout_p=0, dropout_seed=0, dropout_offset=0)
      -> (dq, dk, dv, dprefix_k, dprefix_v)   gradients not asked for are empty tensors
The dropout arguments are the call's stream (_dropout.py); the backward gets the forward's, so
it regenerates the same mask.
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers the ops)
    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as exc:  # a source checkout that was never built
    _C = None
    HAS_EXTENSION = False
    EXTENSION_ERROR = exc


def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale, causal,
              deterministic, dropout_p=0.0, dropout_seed=0, dropout_offset=0):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse, dlse,
              scale, causal, deterministic, need_dq, need_dkv, need_dprefix, dropout_p=0.0, dropout_seed=0,
              dropout_offset=0):
    def like(t, needed):
        return torch.empty_like(t) if needed else q.new_empty(0)

    need_dprefix = need_dprefix and prefix_k is not None
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv),
            like(prefix_k, need_dprefix), like(prefix_v, need_dprefix))


def register_attention_op(fwd, bwd) -> None:
    """Gives a (fwd, bwd) op pair with the schemas above its fake kernels and autograd. Used for
    the compiled ops here and for the Triton ops in triton_backend/ops.py."""

    def setup_context(ctx, inputs, output):
        (q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale, causal, deterministic,
         *dropout) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse)
        ctx.scale, ctx.causal, ctx.deterministic = scale, causal, deterministic
        ctx.dropout = tuple(dropout)  # (dropout_p, seed, offset), or () when the defaults were used
        ctx.n_inputs = len(inputs)

    def backward(ctx, dout, dlse):
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_dq, need_dkv, need_dprefix = needs[0], needs[1] or needs[2], needs[3] or needs[4]
        if not (need_dq or need_dkv or need_dprefix):
            return (None,) * ctx.n_inputs
        dq, dk, dv, dpk, dpv = bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask,
                                   out, lse, dlse, ctx.scale, ctx.causal, ctx.deterministic, need_dq, need_dkv,
                                   need_dprefix, *ctx.dropout)
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dpk if needs[3] else None, dpv if needs[4] else None) + (None,) * (ctx.n_inputs - 5)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError("prefix_attn: double backward (gradients of gradients) is not supported")

    torch.library.register_fake(fwd)(_fwd_fake)
    torch.library.register_fake(bwd)(_bwd_fake)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
    torch.library.register_autograd(bwd, no_double_backward, setup_context=lambda ctx, inputs, output: None)


if HAS_EXTENSION:
    register_attention_op(torch.ops.prefix_attn.fwd.default, torch.ops.prefix_attn.bwd.default)


def set_poison_outputs(on: bool) -> None:
    """Make the compiled kernels fill their outputs with NaN before computing (a test aid)."""
    if HAS_EXTENSION:
        _C._set_poison_outputs(bool(on))
