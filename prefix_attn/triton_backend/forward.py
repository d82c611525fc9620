"""The forward kernel and its launcher.

One program per (query block, batch row x query head). It walks the prefix first (no mask but
the tail's bounds), then the sequence in the two stages of tiles.seq_key_range: tiles wholly
visible to the block with no causal or bounds mask, then the tiles that cross the diagonal or the
end. Online softmax in base 2 with the scale folded into one constant (natural units when an
additive float mask is given; see scores.score_units). Writes out and the natural-log lse.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._inputs import check_prefix_index_range
from .scores import as_bytes, dot_args, dropout_args, mask_kind, n_bucket, optional, score_units
from .tiles import (LN2, PREFIX, PREFIX_TAIL, SEQ, SEQ_EDGE, block_scores, dropout_keep, load_tile, prefix_entry,
                    query_block, seq_key_range, walk_values)
from .tuning import launch


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, start, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n,
              offs_d, D, qk_scale, Nq, Nk, KPM, stride_kpm_n, MASK, stride_mask_m, stride_mask_n, seed, drop_offset,
              drop_threshold, bh, STAGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
              EXP_MUL: tl.constexpr, DROPOUT: tl.constexpr):
    """One online-softmax step over keys [start, start + BLOCK_N) of the walk's STAGE."""
    j = start + offs_n
    s, _ = block_scores(q, K, j, n_keys, stride_kn, stride_kd, offs_m, offs_d, D, qk_scale, Nq, Nk, KPM, stride_kpm_n,
                        MASK, stride_mask_m, stride_mask_n, STAGE=STAGE, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM,
                        MASK_KIND=MASK_KIND, EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION)
    v = walk_values(V, j, n_keys, stride_vn, stride_vd, offs_d, D, Nk, KPM, stride_kpm_n, STAGE=STAGE,
                    HAS_KPM=HAS_KPM, EVEN_D=EVEN_D, TRANSPOSED=False)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.exp2((s - m_safe[:, None]) * EXP_MUL)
    alpha = tl.exp2((m_i - m_safe) * EXP_MUL)
    l_i = l_i * alpha + tl.sum(p, 1)  # the undropped normaliser
    if DROPOUT:  # the kept ones' 1 / (1 - p) is applied with 1 / l at the end
        p = tl.where(dropout_keep(seed, drop_offset, drop_threshold, bh, offs_m, start, STAGE < SEQ, p.shape[1]),
                     p, 0.0)
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["N_BUCKET", "seed", "drop_offset", "drop_threshold"])  # never specialised on
def _fwd_kernel(Q, K, V, PK, PV, IDX, KPM, MASK, Out, Lse,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_pkt, stride_pkh, stride_pkn, stride_pkd,
                stride_pvt, stride_pvh, stride_pvn, stride_pvd,
                stride_kpm_b, stride_kpm_n,
                stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                stride_ob, stride_oh, stride_om, stride_od,
                Hq, Nq, Nk, P, D, group, qk_scale, N_BUCKET, seed, drop_offset, drop_threshold, drop_scale,
                DROPOUT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_INDEX: tl.constexpr, PER_ROW: tl.constexpr,
                HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                EXP_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, b, h, g, i0, offs_m, offs_n, offs_d = query_block(Hq, group, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m[:, None], Nq, offs_d[None, :], D, True, not EVEN_D)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The row's masks, offset once: the tiles index them by query and key only.
    kpm = KPM + b * stride_kpm_b
    mask = MASK + b * stride_mask_b + h * stride_mask_h
    if HAS_PREFIX:
        e = prefix_entry(IDX, b, HAS_INDEX, PER_ROW)
        pk = PK + e * stride_pkt + g * stride_pkh
        pv = PV + e * stride_pvt + g * stride_pvh
        p_full = P // BLOCK_N * BLOCK_N
        for start in range(0, p_full, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, pk, pv, start, P, stride_pkn, stride_pkd, stride_pvn,
                                      stride_pvd, offs_m, offs_n, offs_d, D, qk_scale, Nq, Nk, kpm, stride_kpm_n,
                                      mask, stride_mask_m, stride_mask_n, seed, drop_offset, drop_threshold, pid_bh,
                                      STAGE=PREFIX, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND,
                                      EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION, EXP_MUL=EXP_MUL,
                                      DROPOUT=DROPOUT)
        if p_full < P:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, pk, pv, p_full, P, stride_pkn, stride_pkd, stride_pvn,
                                      stride_pvd, offs_m, offs_n, offs_d, D, qk_scale, Nq, Nk, kpm, stride_kpm_n,
                                      mask, stride_mask_m, stride_mask_n, seed, drop_offset, drop_threshold, pid_bh,
                                      STAGE=PREFIX_TAIL, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND,
                                      EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION, EXP_MUL=EXP_MUL,
                                      DROPOUT=DROPOUT)

    kb = K + b * stride_kb + g * stride_kh
    vb = V + b * stride_vb + g * stride_vh
    full, hi = seq_key_range(i0, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    for start in range(0, full, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kb, vb, start, Nk, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_m, offs_n, offs_d, D, qk_scale, Nq, Nk, kpm, stride_kpm_n, mask,
                                  stride_mask_m, stride_mask_n, seed, drop_offset, drop_threshold, pid_bh,
                                  STAGE=SEQ, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND,
                                  EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION, EXP_MUL=EXP_MUL, DROPOUT=DROPOUT)
    for start in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kb, vb, start, Nk, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_m, offs_n, offs_d, D, qk_scale, Nq, Nk, kpm, stride_kpm_n, mask,
                                  stride_mask_m, stride_mask_n, seed, drop_offset, drop_threshold, pid_bh,
                                  STAGE=SEQ_EDGE, CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND,
                                  EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION, EXP_MUL=EXP_MUL, DROPOUT=DROPOUT)

    # l == 0 only when no key was visible (P == 0): out 0, lse -inf
    has_any = l_i > 0
    if DROPOUT:
        out = acc * (drop_scale / tl.where(has_any, l_i, 1.0))[:, None]
    else:
        out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i * (LN2 * EXP_MUL) + tl.log2(tl.where(has_any, l_i, 1.0)) * LN2,
                   float("-inf"))  # natural log
    row_ok = offs_m[:, None] < Nq
    if EVEN_D:
        o_mask = row_ok
    else:
        o_mask = row_ok & (offs_d[None, :] < D)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(Lse + pid_bh * Nq + offs_m, lse, mask=offs_m < Nq)


def triton_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale, causal,
                   deterministic=False, dropout_p=0.0, dropout_seed=0, dropout_offset=0):
    """out [B, Hq, Nq, D] and lse [B, Hq, Nq] (float32). Inputs are checked by the caller
    (_inputs.py); prefix_index's range is checked here, the only place that indexes with it."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Nq, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if prefix_index is not None:  # the kernel indexes the bank with it (on CUDA: no host sync)
        check_prefix_index_range(prefix_index, prefix_k)
    pk, spk = optional(prefix_k, q, 4)
    pv, spv = optional(prefix_v, q, 4)
    kpm, skpm = optional(as_bytes(key_padding_mask), q, 2)
    mask, smask = optional(as_bytes(attn_mask), q, 4)
    idx = prefix_index.contiguous() if prefix_index is not None else q  # the kernel reads IDX + b
    qk_scale, exp_mul = score_units(attn_mask, scale)
    launch(_fwd_kernel, "fwd", lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * Hq), D, q.dtype,
           q, k, v, pk, pv, idx, kpm, mask, out, lse,
           *q.stride(), *k.stride(), *v.stride(), *spk, *spv, *skpm, *smask, *out.stride(),
           Hq, Nq, Nk, P, D, Hq // Hkv, qk_scale, n_bucket(max(Nq, Nk)),
           *dropout_args(dropout_p, dropout_seed, dropout_offset), DROPOUT=dropout_p > 0.0, HAS_PREFIX=P > 0, HAS_INDEX=prefix_index is not None,
           PER_ROW=prefix_k is not None and prefix_index is None and prefix_k.shape[0] > 1,
           HAS_KPM=key_padding_mask is not None, MASK_KIND=mask_kind(attn_mask), CAUSAL=bool(causal),
           EXP_MUL=exp_mul, tune=not deterministic, **dot_args(q.dtype, D))
    return out, lse
