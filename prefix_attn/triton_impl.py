"""The Triton backend: fused forward and backward kernels for attention over [prefix ; sequence].

Name ladder, as in the rest of the package:
    _fwd_kernel, _bwd_preprocess_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel, _bwd_dprefix_kernel
        -> triton_forward / triton_backward   (launchers: checks done, strides passed through)
        -> torch.ops.prefix_attn.triton_fwd / triton_bwd   (torch.library ops, same schema as
           the compiled fwd / bwd, with the same fake kernels and autograd from _ops.py)

Forward: one program per (query block, batch row x query head). Prefix tiles first, with no
mask at all; then the sequence, split into tiles wholly below the causal diagonal (no causal
mask) and tiles crossing it. Online softmax in base 2, scale folded into one constant (natural
units when an additive float mask is given; see _score_units).

Backward: Delta = rowsum(dO * O) - dlse; then dQ (one program per query block), dK / dV for the
sequence (one program per key block and KV head, looping over the group's query heads: no
atomics), and dprefix (one program per prefix block, bank entry x KV head and row chunk,
looping over the rows using the entry and the group's heads). Chunk partials are float32 and
summed in a fixed order, so gradients are bit-identical run to run.

Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (tests only; there tl.dot works in
float32 because the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from . import _ops
from ._inputs import check_prefix_index_range

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.4426950408889634


@triton.jit
def _seq_scores(s, i, j, b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK, stride_mask_b, stride_mask_h,
                stride_mask_m, stride_mask_n, APPLY_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                MASK_KIND: tl.constexpr):
    """Masks scores s of sequence keys j for queries i (i, j broadcast to s's shape). Hidden
    keys get -inf; an additive float mask is added (scores are in natural units then)."""
    visible = (j < Nk) & (i < Nq)
    if APPLY_CAUSAL:
        visible = visible & (j <= i + (Nk - Nq))
    if HAS_KPM:
        keep = tl.load(KPM + b * stride_kpm_b + j * stride_kpm_n, mask=j < Nk, other=0)
        visible = visible & (keep != 0)
    if MASK_KIND == 1:
        keep = tl.load(MASK + b * stride_mask_b + h * stride_mask_h + i * stride_mask_m + j * stride_mask_n,
                       mask=(i < Nq) & (j < Nk), other=0)
        visible = visible & (keep != 0)
    if MASK_KIND == 2:
        bias = tl.load(MASK + b * stride_mask_b + h * stride_mask_h + i * stride_mask_m + j * stride_mask_n,
                       mask=(i < Nq) & (j < Nk), other=0.0)
        s = s + bias
    return tl.where(visible, s, float("-inf"))


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, start, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n,
              offs_d, D, qk_scale, b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK, stride_mask_b,
              stride_mask_h, stride_mask_m, stride_mask_n, IS_SEQ: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
              HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr,
              PRECISION: tl.constexpr, EXP_MUL: tl.constexpr):
    j = start + offs_n
    kT = tl.load(K + j[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=(j[None, :] < n_keys) & (offs_d[:, None] < D), other=0.0)
    v = tl.load(V + j[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=(j[:, None] < n_keys) & (offs_d[None, :] < D), other=0.0)
    if DOT_F32:
        kT = kT.to(tl.float32)
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    if IS_SEQ:
        s = _seq_scores(s, offs_m[:, None], j[None, :], b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK,
                        stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, APPLY_CAUSAL, HAS_KPM,
                        MASK_KIND)
    else:
        s = tl.where(j[None, :] < n_keys, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
    p = tl.exp2((s - m_safe[:, None]) * EXP_MUL)
    alpha = tl.exp2((m_i - m_safe) * EXP_MUL)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_F32:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _prefix_entry(IDX, b, HAS_INDEX: tl.constexpr, PER_ROW: tl.constexpr):
    if HAS_INDEX:
        return tl.load(IDX + b)
    elif PER_ROW:
        return b
    else:
        return 0


@triton.jit
def _fwd_kernel(Q, K, V, PK, PV, IDX, KPM, MASK, Out, Lse,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_pkt, stride_pkh, stride_pkn, stride_pkd,
                stride_pvt, stride_pvh, stride_pvn, stride_pvd,
                stride_kpm_b, stride_kpm_n,
                stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                stride_ob, stride_oh, stride_om, stride_od,
                Hq, Nq, Nk, P, D, group, qk_scale,
                HAS_PREFIX: tl.constexpr, HAS_INDEX: tl.constexpr, PER_ROW: tl.constexpr,
                HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EXP_MUL: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    g = h // group
    i0 = pid_m * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_PREFIX:
        e = _prefix_entry(IDX, b, HAS_INDEX, PER_ROW)
        pk = PK + e * stride_pkt + g * stride_pkh
        pv = PV + e * stride_pvt + g * stride_pvh
        for start in range(0, P, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, pk, pv, start, P, stride_pkn, stride_pkd, stride_pvn,
                                      stride_pvd, offs_m, offs_n, offs_d, D, qk_scale, b, h, Nq, Nk, KPM,
                                      stride_kpm_b, stride_kpm_n, MASK, stride_mask_b, stride_mask_h,
                                      stride_mask_m, stride_mask_n, False, False, HAS_KPM, MASK_KIND, DOT_F32,
                                      PRECISION, EXP_MUL)

    kb = K + b * stride_kb + g * stride_kh
    vb = V + b * stride_vb + g * stride_vh
    if CAUSAL:
        # keys past `hi` are hidden from every query of the block; tiles before `full` are
        # wholly below the diagonal and need no causal mask
        hi = tl.minimum(tl.maximum(i0 + BLOCK_M + Nk - Nq, 0), Nk)
        full = tl.minimum(tl.maximum((i0 + Nk - Nq + 1) // BLOCK_N * BLOCK_N, 0), hi)
    else:
        hi = Nk
        full = Nk
    for start in range(0, full, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kb, vb, start, Nk, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_m, offs_n, offs_d, D, qk_scale, b, h, Nq, Nk, KPM, stride_kpm_b,
                                  stride_kpm_n, MASK, stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                                  True, False, HAS_KPM, MASK_KIND, DOT_F32, PRECISION, EXP_MUL)
    for start in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, kb, vb, start, Nk, stride_kn, stride_kd, stride_vn, stride_vd,
                                  offs_m, offs_n, offs_d, D, qk_scale, b, h, Nq, Nk, KPM, stride_kpm_b,
                                  stride_kpm_n, MASK, stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                                  True, True, HAS_KPM, MASK_KIND, DOT_F32, PRECISION, EXP_MUL)

    # l == 0 only when no key was visible (P == 0): out 0, lse -inf
    has_any = l_i > 0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i * (0.6931471805599453 * EXP_MUL) + tl.log2(tl.where(has_any, l_i, 1.0)) * 0.6931471805599453,
                   float("-inf"))
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < Nq) & (offs_d[None, :] < D))
    tl.store(Lse + pid_bh * Nq + offs_m, lse, mask=offs_m < Nq)


@triton.jit
def _bwd_preprocess_kernel(Out, DOut, DLse, Lse, Delta, Lse2,
                           stride_ob, stride_oh, stride_om, stride_od,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           Hq, Nq, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           EXP_MUL: tl.constexpr):
    """Delta = rowsum(dO * O) - dlse, and lse in the scores' units (base 2, or natural with a
    float mask) with -inf rows turned to +inf, so that their probabilities come out 0."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    lse = tl.load(Lse + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * (1.4426950408889634 / EXP_MUL))
    tl.store(Delta + pid_bh * Nq + offs_m, delta, mask=offs_m < Nq)
    tl.store(Lse2 + pid_bh * Nq + offs_m, lse2, mask=offs_m < Nq)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K, V, start, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
             offs_n, offs_d, D, qk_scale, b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK, stride_mask_b,
             stride_mask_h, stride_mask_m, stride_mask_n, IS_SEQ: tl.constexpr, APPLY_CAUSAL: tl.constexpr,
             HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
             EXP_MUL: tl.constexpr):
    j = start + offs_n
    kT = tl.load(K + j[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=(j[None, :] < n_keys) & (offs_d[:, None] < D), other=0.0)
    vT = tl.load(V + j[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                 mask=(j[None, :] < n_keys) & (offs_d[:, None] < D), other=0.0)
    if DOT_F32:
        kT = kT.to(tl.float32)
        vT = vT.to(tl.float32)
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    if IS_SEQ:
        s = _seq_scores(s, offs_m[:, None], j[None, :], b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK,
                        stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, APPLY_CAUSAL, HAS_KPM,
                        MASK_KIND)
    else:
        s = tl.where(j[None, :] < n_keys, s, float("-inf"))
    p = tl.exp2((s - lse2[:, None]) * EXP_MUL)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)


@triton.jit
def _bwd_dq_kernel(Q, K, V, PK, PV, IDX, KPM, MASK, DOut, Lse2, Delta, DQ,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_pkt, stride_pkh, stride_pkn, stride_pkd,
                   stride_pvt, stride_pvh, stride_pvn, stride_pvd,
                   stride_kpm_b, stride_kpm_n,
                   stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                   Hq, Nq, Nk, P, D, group, qk_scale, scale,
                   HAS_PREFIX: tl.constexpr, HAS_INDEX: tl.constexpr, PER_ROW: tl.constexpr,
                   HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EXP_MUL: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks see the most keys: launch them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    g = h // group
    i0 = pid_m * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_mask, other=0.0)
    do = tl.load(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=row_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse2 + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if HAS_PREFIX:
        e = _prefix_entry(IDX, b, HAS_INDEX, PER_ROW)
        pk = PK + e * stride_pkt + g * stride_pkh
        pv = PV + e * stride_pvt + g * stride_pvh
        for start in range(0, P, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, pk, pv, start, P, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                          offs_m, offs_n, offs_d, D, qk_scale, b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK,
                          stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, False, False, HAS_KPM,
                          MASK_KIND, DOT_F32, PRECISION, EXP_MUL)

    kb = K + b * stride_kb + g * stride_kh
    vb = V + b * stride_vb + g * stride_vh
    if CAUSAL:
        hi = tl.minimum(tl.maximum(i0 + BLOCK_M + Nk - Nq, 0), Nk)
        full = tl.minimum(tl.maximum((i0 + Nk - Nq + 1) // BLOCK_N * BLOCK_N, 0), hi)
    else:
        hi = Nk
        full = Nk
    for start in range(0, full, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, kb, vb, start, Nk, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                      offs_n, offs_d, D, qk_scale, b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK, stride_mask_b,
                      stride_mask_h, stride_mask_m, stride_mask_n, True, False, HAS_KPM, MASK_KIND, DOT_F32,
                      PRECISION, EXP_MUL)
    for start in range(full, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, kb, vb, start, Nk, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                      offs_n, offs_d, D, qk_scale, b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK, stride_mask_b,
                      stride_mask_h, stride_mask_m, stride_mask_n, True, True, HAS_KPM, MASK_KIND, DOT_F32,
                      PRECISION, EXP_MUL)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, Lse2, Delta, row_base, m0, offs_m, offs_n, offs_d, j, n_keys, D, qk_scale,
               stride_qm, stride_qd, stride_dom, stride_dod, b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK,
               stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, IS_SEQ: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr,
               PRECISION: tl.constexpr, EXP_MUL: tl.constexpr):
    """Adds one query block's share to the key block's dk (unscaled) and dv, in transposed form:
    sT [keys, queries]."""
    i = m0 + offs_m
    qT = tl.load(Q + i[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                 mask=(i[None, :] < Nq) & (offs_d[:, None] < D), other=0.0)
    do = tl.load(DO + i[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=(i[:, None] < Nq) & (offs_d[None, :] < D), other=0.0)
    if DOT_F32:
        qT = qT.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse2 + row_base + i, mask=i < Nq, other=float("inf"))
    delta = tl.load(Delta + row_base + i, mask=i < Nq, other=0.0)
    sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
    if IS_SEQ:
        sT = _seq_scores(sT, i[None, :], j[:, None], b, h, Nq, Nk, KPM, stride_kpm_b, stride_kpm_n, MASK,
                         stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n, CAUSAL, HAS_KPM, MASK_KIND)
    else:
        sT = tl.where(j[:, None] < n_keys, sT, float("-inf"))
    pT = tl.exp2((sT - lse2[None, :]) * EXP_MUL)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, KPM, MASK, DOut, Lse2, Delta, DK, DV,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_kpm_b, stride_kpm_n,
                     stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                     Hq, Hkv, Nq, Nk, D, group, qk_scale, scale,
                     HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EXP_MUL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    j0 = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    j = j0 + offs_n
    key_mask = (j[:, None] < Nk) & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + g * stride_kh + j[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=key_mask, other=0.0)
    v = tl.load(V + b * stride_vb + g * stride_vh + j[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=key_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # the first query that sees key j0 is i = j0 - (Nk - Nq); query blocks whose last row
        # is below the key block's last key + (Nq - Nk) see every key of it
        lo = tl.maximum(j0 - (Nk - Nq), 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum(j0 + BLOCK_N - 1 - (Nk - Nq) + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M, Nq)
        full = tl.maximum(full, lo)
    else:
        lo = 0
        full = Nq
    for h in range(g * group, (g + 1) * group):
        qh = Q + b * stride_qb + h * stride_qh
        doh = DOut + b * stride_dob + h * stride_doh
        row_base = (b * Hq + h) * Nq
        for m0 in range(lo, full, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, qh, doh, Lse2, Delta, row_base, m0, offs_m, offs_n, offs_d, j, Nk, D,
                                qk_scale, stride_qm, stride_qd, stride_dom, stride_dod, b, h, Nq, Nk, KPM,
                                stride_kpm_b, stride_kpm_n, MASK, stride_mask_b, stride_mask_h, stride_mask_m,
                                stride_mask_n, True, CAUSAL, HAS_KPM, MASK_KIND, DOT_F32, PRECISION, EXP_MUL)
        for m0 in range(full, Nq, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, qh, doh, Lse2, Delta, row_base, m0, offs_m, offs_n, offs_d, j, Nk, D,
                                qk_scale, stride_qm, stride_qd, stride_dom, stride_dod, b, h, Nq, Nk, KPM,
                                stride_kpm_b, stride_kpm_n, MASK, stride_mask_b, stride_mask_h, stride_mask_m,
                                stride_mask_n, True, False, HAS_KPM, MASK_KIND, DOT_F32, PRECISION, EXP_MUL)
    tl.store(DK + b * stride_dkb + g * stride_dkh + j[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=key_mask)
    tl.store(DV + b * stride_dvb + g * stride_dvh + j[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_mask)


@triton.jit
def _bwd_dprefix_kernel(Q, PK, PV, Rows, RowStart, DOut, Lse2, Delta, DPK, DPV,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_pkt, stride_pkh, stride_pkn, stride_pkd,
                        stride_pvt, stride_pvh, stride_pvn, stride_pvd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_dpc, stride_dpt, stride_dph, stride_dpn, stride_dpd,
                        Hq, Hkv, Nq, P, D, group, chunks, qk_scale, scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EXP_MUL: tl.constexpr):
    """dprefix for keys [j0, j0 + BLOCK_N) of entry t, KV head g, from chunk c of the
    (row using t, query block) pairs: a GPU fills up even when few rows share the prefix. Writes
    float32 partials DPK/DPV[c, t, g] (in a fixed order: pair, then head); the host sums the
    chunks in a fixed order too."""
    pid_n = tl.program_id(0)
    pid_tg = tl.program_id(1)
    c = tl.program_id(2)
    t = pid_tg // Hkv
    g = pid_tg % Hkv
    j0 = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    j = j0 + offs_n
    key_mask = (j[:, None] < P) & (offs_d[None, :] < D)
    k = tl.load(PK + t * stride_pkt + g * stride_pkh + j[:, None] * stride_pkn + offs_d[None, :] * stride_pkd,
                mask=key_mask, other=0.0)
    v = tl.load(PV + t * stride_pvt + g * stride_pvh + j[:, None] * stride_pvn + offs_d[None, :] * stride_pvd,
                mask=key_mask, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    first = tl.load(RowStart + t)
    n_rows = tl.load(RowStart + t + 1) - first
    n_qblocks = tl.cdiv(Nq, BLOCK_M)
    n_items = n_rows * n_qblocks
    for item in range(c * n_items // chunks, (c + 1) * n_items // chunks):
        b = tl.load(Rows + first + item // n_qblocks)
        m0 = (item % n_qblocks) * BLOCK_M
        for h in range(g * group, (g + 1) * group):
            qh = Q + b * stride_qb + h * stride_qh
            doh = DOut + b * stride_dob + h * stride_doh
            row_base = (b * Hq + h) * Nq
            dk, dv = _dkdv_tile(dk, dv, k, v, qh, doh, Lse2, Delta, row_base, m0, offs_m, offs_n, offs_d, j, P, D,
                                qk_scale, stride_qm, stride_qd, stride_dom, stride_dod, b, h, Nq, P, Rows, 0, 0,
                                Rows, 0, 0, 0, 0, False, False, False, 0, DOT_F32, PRECISION, EXP_MUL)
    base = c * stride_dpc + t * stride_dpt + g * stride_dph + j[:, None] * stride_dpn + offs_d[None, :] * stride_dpd
    tl.store(DPK + base, (dk * scale).to(DPK.dtype.element_ty), mask=key_mask)
    tl.store(DPV + base, dv.to(DPV.dtype.element_ty), mask=key_mask)


# ----------------------------------------------------------------------------------------------
# Launchers


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options of one kernel. BLOCK_M tiles queries, BLOCK_N keys: for
    "fwd" and "dq" a program owns BLOCK_M queries and loops over keys; for "dkv" (sequence dK/dV
    and the prefix gradient) a program owns BLOCK_N keys and loops over queries."""
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_D=self.block_d, num_warps=self.num_warps,
                    num_stages=self.num_stages)


# (kind, element bytes, BLOCK_D) -> (BLOCK_M, BLOCK_N, num_warps, num_stages), picked with
# tools/triton_compile_check.py (no GPU needed): every kernel fits the shared memory of sm_80
# (163 KB) and sm_90 (227 KB), and among the candidates compiled the largest tiles that spill no
# or few registers on sm_90 won. Not yet timed on a GPU: `make gpu-check` is where they get
# measured. 16-bit: the usual flash-attention shapes (dq: 128 queries x 32-key tiles; dK/dV:
# 128 keys x 32-query tiles). float32 multiplies in IEEE fp32 without tensor cores, which
# needs far more registers: small tiles.
_GPU_CONFIGS = {
    ("fwd", 2, 64): (128, 64, 4, 3),
    ("fwd", 2, 128): (128, 64, 8, 3),
    ("fwd", 2, 256): (64, 32, 8, 2),
    ("fwd", 4, 64): (32, 32, 4, 2),
    ("fwd", 4, 128): (32, 32, 4, 2),
    ("fwd", 4, 256): (16, 32, 4, 1),
    ("dq", 2, 64): (128, 32, 8, 3),
    ("dq", 2, 128): (128, 32, 8, 3),
    ("dq", 2, 256): (32, 32, 4, 2),
    ("dq", 4, 64): (64, 32, 8, 2),
    ("dq", 4, 128): (32, 32, 4, 2),
    ("dq", 4, 256): (16, 32, 4, 1),
    ("dkv", 2, 64): (32, 128, 8, 3),
    ("dkv", 2, 128): (32, 128, 8, 3),
    ("dkv", 2, 256): (32, 32, 4, 1),
    ("dkv", 4, 64): (32, 64, 8, 2),
    ("dkv", 4, 128): (32, 32, 4, 2),
    ("dkv", 4, 256): (16, 32, 4, 1),
}

# Under the interpreter: small tiles (it is slow) and BLOCK_M != BLOCK_N, so the tests exercise
# the asymmetric tilings the GPU configs use.
_INTERPRET_CONFIGS = {"fwd": (32, 16), "dq": (32, 16), "dkv": (16, 32)}


def _config(kind: str, D: int, dtype: torch.dtype) -> LaunchConfig:
    block_d = max(16, triton.next_power_of_2(D))
    if INTERPRET:
        bm, bn = _INTERPRET_CONFIGS[kind]
        return LaunchConfig(bm, bn, block_d, 4, 1)
    if block_d > 256:  # rare: the smallest tiles tl.dot takes
        return LaunchConfig(16, 16, block_d, 4, 1)
    size = 4 if dtype == torch.float32 else 2
    bm, bn, warps, stages = _GPU_CONFIGS[(kind, size, min(max(block_d, 64), 256))]
    return LaunchConfig(bm, bn, block_d, warps, stages)


def _dot_args(dtype: torch.dtype):
    # float32 inputs must not silently drop to TF32; the interpreter's bf16 dot is wrong, so it
    # multiplies in float32 too
    f32 = INTERPRET or dtype == torch.float32
    return dict(DOT_F32=f32, PRECISION="ieee" if f32 else "tf32")


def _optional(t: Optional[Tensor], fallback: Tensor, ndim: int):
    if t is None:
        return fallback, (0,) * ndim
    return t, tuple(t.stride())


def _as_bytes(mask: Optional[Tensor]) -> Optional[Tensor]:
    return mask.view(torch.uint8) if mask is not None and mask.dtype == torch.bool else mask


def _mask_kind(attn_mask: Optional[Tensor]) -> int:
    if attn_mask is None:
        return 0
    return 1 if attn_mask.dtype == torch.bool else 2


def _score_units(attn_mask: Optional[Tensor], scale: float) -> Tuple[float, float]:
    """(score multiplier, EXP_MUL). Scores are base 2 (the scale times log2 e folded into one
    constant, exp2 taken directly) unless an additive float mask is given: Hugging Face masks
    hold finfo.min, which times log2 e overflows to -inf, so scores stay natural then."""
    if _mask_kind(attn_mask) == 2:
        return scale, LOG2E
    return scale * LOG2E, 1.0


def triton_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale, causal):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, Nq, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    if prefix_index is not None:  # the kernel indexes the bank with it (on CUDA: no host sync)
        check_prefix_index_range(prefix_index, prefix_k)
    cfg = _config("fwd", D, q.dtype)
    pk, spk = _optional(prefix_k, q, 4)
    pv, spv = _optional(prefix_v, q, 4)
    kpm, skpm = _optional(_as_bytes(key_padding_mask), q, 2)
    mask, smask = _optional(_as_bytes(attn_mask), q, 4)
    idx = prefix_index if prefix_index is not None else q
    qk_scale, exp_mul = _score_units(attn_mask, scale)
    grid = (triton.cdiv(Nq, cfg.block_m), B * Hq)
    _fwd_kernel[grid](
        q, k, v, pk, pv, idx, kpm, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *spk, *spv, *skpm, *smask, *out.stride(),
        Hq, Nq, Nk, P, D, Hq // Hkv, qk_scale,
        HAS_PREFIX=P > 0, HAS_INDEX=prefix_index is not None,
        PER_ROW=prefix_k is not None and prefix_index is None and prefix_k.shape[0] > 1,
        HAS_KPM=key_padding_mask is not None, MASK_KIND=_mask_kind(attn_mask), CAUSAL=bool(causal),
        EXP_MUL=exp_mul, **cfg.kwargs(), **_dot_args(q.dtype))
    return out, lse


def _rows_by_entry(prefix_index: Optional[Tensor], T: int, B: int, device) -> Tuple[Tensor, Tensor]:
    """Rows grouped by the bank entry they use (stable: a fixed order), and each entry's start."""
    if prefix_index is None:
        rows = torch.arange(B, device=device, dtype=torch.int64)
        if T == 1:  # [0, B], made on the device: a host tensor copied there would synchronise
            return rows, torch.arange(2, device=device, dtype=torch.int64) * B
        return rows, torch.arange(B + 1, device=device, dtype=torch.int64)
    entries, rows = torch.sort(prefix_index, stable=True)
    # Not bincount: on CUDA it reads the index's min and max back to size its output.
    start = torch.searchsorted(entries, torch.arange(T + 1, device=device, dtype=torch.int64))
    return rows, start


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:  # asked once per device, not on every backward
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_chunks(max_items: int, T: int, Hkv: int, p_blocks: int, device) -> int:
    """Chunks of (row, query block) pairs for dprefix: enough programs to fill the device twice,
    one pair per chunk at most. max_items bounds the pairs of any one bank entry."""
    if device.type == "cuda":
        target = 2 * _sm_count(device)
    else:  # the interpreter: an odd count, so that tests split rows across uneven chunks
        target = 7
    return max(1, min(max_items, -(-target // max(1, T * Hkv * p_blocks))))


def triton_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse, dlse,
                    scale, causal, deterministic, need_dq, need_dkv, need_dprefix):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    P = 0 if prefix_k is None else prefix_k.shape[2]
    need_dprefix = need_dprefix and prefix_k is not None
    def like(t, needed):  # gradients not asked for are distinct empty tensors
        return torch.empty_like(t) if needed else q.new_empty(0)

    dq, dk, dv = like(q, need_dq), like(k, need_dkv), like(v, need_dkv)
    dpk, dpv = like(prefix_k, need_dprefix), like(prefix_v, need_dprefix)
    if B * Hq * Nq == 0:
        for t in (dq, dk, dv, dpk, dpv):
            t.zero_()
        return dq, dk, dv, dpk, dpv
    if prefix_index is not None:  # an op of its own, callable directly: the same check as the forward
        check_prefix_index_range(prefix_index, prefix_k)

    # A row whose scores are all near finfo.min (a Hugging Face float mask hiding every key):
    # float32 lse = max + log(l) lost log(l), and the probabilities rebuilt from it would be
    # wrong. The CPU backend recomputes such rows; this one refuses. Only possible with P == 0:
    # every row sees the prefix keys, whose scores no mask touches. The test reads its answer
    # back (a host sync), so a call with a prefix does not make it.
    if (_mask_kind(attn_mask) == 2 and P == 0
            and bool(((lse.abs() > 2.0**20) & lse.isfinite()).any())):
        raise NotImplementedError(
            "prefix_attn: the triton backward cannot rebuild rows whose every visible key has an additive "
            "mask near finfo.min (|lse| > 2^20); use a bool mask or key_padding_mask for padding")
    dq_cfg, dkv_cfg = _config("dq", D, q.dtype), _config("dkv", D, q.dtype)
    qk_scale, exp_mul = _score_units(attn_mask, scale)
    dot = dict(EXP_MUL=exp_mul, **_dot_args(q.dtype))
    delta = torch.empty(B, Hq, Nq, device=q.device, dtype=torch.float32)
    lse2 = torch.empty_like(delta)
    pre_m = 64 if not INTERPRET else 16
    _bwd_preprocess_kernel[(triton.cdiv(Nq, pre_m), B * Hq)](
        out, dout, dlse if dlse is not None else lse, lse, delta, lse2, *out.stride(), *dout.stride(), Hq, Nq, D,
        HAS_DLSE=dlse is not None, BLOCK_M=pre_m, BLOCK_D=dq_cfg.block_d, num_warps=4, EXP_MUL=exp_mul)

    pk, spk = _optional(prefix_k, q, 4)
    pv, spv = _optional(prefix_v, q, 4)
    kpm, skpm = _optional(_as_bytes(key_padding_mask), q, 2)
    mask, smask = _optional(_as_bytes(attn_mask), q, 4)
    flags = dict(HAS_KPM=key_padding_mask is not None, MASK_KIND=_mask_kind(attn_mask), CAUSAL=bool(causal), **dot)
    per_row = prefix_k is not None and prefix_index is None and prefix_k.shape[0] > 1
    if need_dq:
        _bwd_dq_kernel[(triton.cdiv(Nq, dq_cfg.block_m), B * Hq)](
            q, k, v, pk, pv, prefix_index if prefix_index is not None else q, kpm, mask, dout, lse2, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *spk, *spv, *skpm, *smask, *dout.stride(), *dq.stride(),
            Hq, Nq, Nk, P, D, Hq // Hkv, qk_scale, scale,
            HAS_PREFIX=P > 0, HAS_INDEX=prefix_index is not None, PER_ROW=per_row, **flags, **dq_cfg.kwargs())
    if need_dkv and Nk > 0:
        _bwd_dkdv_kernel[(triton.cdiv(Nk, dkv_cfg.block_n), B * Hkv)](
            q, k, v, kpm, mask, dout, lse2, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *skpm, *smask, *dout.stride(), *dk.stride(), *dv.stride(),
            Hq, Hkv, Nq, Nk, D, Hq // Hkv, qk_scale, scale, **flags, **dkv_cfg.kwargs())
    if need_dprefix and P > 0:
        T = prefix_k.shape[0]
        rows, start = _rows_by_entry(prefix_index, T, B, q.device)
        p_blocks = triton.cdiv(P, dkv_cfg.block_n)
        rows_per_entry = 1 if per_row else B  # a bank entry may be used by every row
        chunks = _num_chunks(rows_per_entry * triton.cdiv(Nq, dkv_cfg.block_m), T, Hkv, p_blocks, q.device)
        if chunks == 1:
            tk, tv = dpk.unsqueeze(0), dpv.unsqueeze(0)  # written in place, in the prefix dtype
        else:
            tk = torch.empty(chunks, *prefix_k.shape, device=q.device, dtype=torch.float32)
            tv = torch.empty_like(tk)
        _bwd_dprefix_kernel[(p_blocks, T * Hkv, chunks)](
            q, prefix_k, prefix_v, rows, start, dout, lse2, delta, tk, tv,
            *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(), *tk.stride(),
            Hq, Hkv, Nq, P, D, Hq // Hkv, chunks, qk_scale, scale,
            **dkv_cfg.kwargs(), **dot)
        if chunks > 1:
            dpk.copy_(tk.sum(0))  # a fixed-order reduction: deterministic
            dpv.copy_(tv.sum(0))
    return dq, dk, dv, dpk, dpv


# ----------------------------------------------------------------------------------------------
# torch.library ops: the same schema, fake kernels and autograd as the compiled fwd / bwd


@torch.library.custom_op("prefix_attn::triton_fwd", mutates_args=())
def triton_fwd(q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor], prefix_v: Optional[Tensor],
               prefix_index: Optional[Tensor], key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
               scale: float, causal: bool, deterministic: bool) -> Tuple[Tensor, Tensor]:
    return triton_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale, causal)


@torch.library.custom_op("prefix_attn::triton_bwd", mutates_args=())
def triton_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prefix_k: Optional[Tensor],
               prefix_v: Optional[Tensor], prefix_index: Optional[Tensor], key_padding_mask: Optional[Tensor],
               attn_mask: Optional[Tensor], out: Tensor, lse: Tensor, dlse: Optional[Tensor], scale: float,
               causal: bool, deterministic: bool, need_dq: bool, need_dkv: bool,
               need_dprefix: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return triton_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse,
                           dlse, scale, causal, deterministic, need_dq, need_dkv, need_dprefix)


_ops.register_attention_op(triton_fwd, triton_bwd)
