"""The backward kernels and their launcher.

    Delta = rowsum(dO * O) - dlse                     _bwd_preprocess_kernel (or fused, see below)
    dQ                                                _bwd_dq_kernel: a program per query block
    dK, dV of the sequence (+ dQ by atomics)          _bwd_dkdv_kernel: a program per key block
    dprefix (+ dQ by atomics)                         _bwd_dprefix_kernel: a program per prefix block
                                                      and chunk of (row, query block) pairs

Each tile recomputes S = Q K^T and P = exp(S - lse) once. With every gradient wanted and
deterministic=False, the key-major kernels also add dS K into a float32 dQ with atomics: five
matmuls per tile (S, dP, dV, dK, dQ) instead of seven with a separate dQ pass, as in
FlashAttention 2. deterministic=True keeps the fixed-order path: a dQ kernel that owns its rows,
and prefix-gradient chunk partials summed in a fixed order.

Only the prefix trainable (the first layer of a frozen model): one kernel. It computes Delta and
the base-2 lse itself from O, dO and lse, walks all B x Nq queries of a KV head as one long
sequence against the prefix block it owns, and adds its partial into a float32 gradient with
atomics (or writes it to a chunk slot, deterministically).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .._inputs import check_prefix_index_range
from . import configs
from .scores import as_bytes, dot_args, dropout_args, mask_kind, n_bucket, optional, score_units
from .tiles import (LOG2E, PREFIX, PREFIX_TAIL, SEQ, SEQ_EDGE, block_scores, dropout_keep, kept_keys, load_key_block,
                    load_tile, prefix_entry, query_block, query_range, seq_key_range, seq_scores, walk_values,
                    zero_padded_keys)
from .tuning import launch

_EVEN = {
    "EVEN_M": lambda a: a["Nq"] % a["BLOCK_M"] == 0,
}


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
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * (LOG2E / EXP_MUL))
    tl.store(Delta + pid_bh * Nq + offs_m, delta, mask=offs_m < Nq)
    tl.store(Lse2 + pid_bh * Nq + offs_m, lse2, mask=offs_m < Nq)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K, V, start, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_n,
             offs_d, D, qk_scale, Nq, Nk, KPM, stride_kpm_n, MASK, stride_mask_m, stride_mask_n, seed, drop_offset,
             drop_threshold, drop_scale, bh, STAGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
             MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
             EXP_MUL: tl.constexpr, DROPOUT: tl.constexpr):
    """dq's share from keys [start, start + BLOCK_N) of the walk's STAGE."""
    j = start + offs_n
    s, kT = block_scores(q, K, j, n_keys, stride_kn, stride_kd, offs_m, offs_d, D, qk_scale, Nq, Nk, KPM,
                         stride_kpm_n, MASK, stride_mask_m, stride_mask_n, STAGE=STAGE, CAUSAL=CAUSAL,
                         HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND, EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION)
    vT = walk_values(V, j, n_keys, stride_vn, stride_vd, offs_d, D, Nk, KPM, stride_kpm_n, STAGE=STAGE,
                     HAS_KPM=HAS_KPM, EVEN_D=EVEN_D, TRANSPOSED=True)
    if DOT_F32:
        vT = vT.to(tl.float32)
    p = tl.exp2((s - lse2[:, None]) * EXP_MUL)
    dp = tl.dot(do, vT, input_precision=PRECISION)
    if DROPOUT:  # dP of the dropped, rescaled probabilities that multiplied V
        keep = dropout_keep(seed, drop_offset, drop_threshold, bh, offs_m, start, STAGE < SEQ, p.shape[1])
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)


@triton.jit(do_not_specialize=["N_BUCKET", "seed", "drop_offset", "drop_threshold"])  # never specialised on
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
                   Hq, Nq, Nk, P, D, group, qk_scale, dq_scale, N_BUCKET, seed, drop_offset, drop_threshold,
                   drop_scale, DROPOUT: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_INDEX: tl.constexpr, PER_ROW: tl.constexpr,
                   HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, DO_SEQ: tl.constexpr,
                   ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr,
                   PRECISION: tl.constexpr, EXP_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of a query block over the prefix keys and (DO_SEQ) the sequence keys. Stores dq * dq_scale,
    or with ATOMIC adds it into a float32 DQ that other kernels add into too."""
    pid_bh, b, h, g, i0, offs_m, offs_n, offs_d = query_block(Hq, group, CAUSAL, BLOCK_M, BLOCK_N, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m[:, None], Nq, offs_d[None, :], D, True, not EVEN_D)
    do = load_tile(DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                   + offs_d[None, :] * stride_dod, offs_m[:, None], Nq, offs_d[None, :], D, True, not EVEN_D)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse2 + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
    delta = tl.load(Delta + pid_bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The row's masks, offset once: the tiles index them by query and key only.
    kpm = KPM + b * stride_kpm_b
    mask = MASK + b * stride_mask_b + h * stride_mask_h
    if HAS_PREFIX:
        e = prefix_entry(IDX, b, HAS_INDEX, PER_ROW)
        pk = PK + e * stride_pkt + g * stride_pkh
        pv = PV + e * stride_pvt + g * stride_pvh
        p_full = P // BLOCK_N * BLOCK_N
        for start in range(0, p_full, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, pk, pv, start, P, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                          offs_m, offs_n, offs_d, D, qk_scale, Nq, Nk, kpm, stride_kpm_n, mask, stride_mask_m,
                          stride_mask_n, seed, drop_offset, drop_threshold, drop_scale, pid_bh, STAGE=PREFIX, CAUSAL=CAUSAL,
                          HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND, EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION,
                          EXP_MUL=EXP_MUL, DROPOUT=DROPOUT)
        if p_full < P:
            dq = _dq_tile(dq, q, do, lse2, delta, pk, pv, p_full, P, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
                          offs_m, offs_n, offs_d, D, qk_scale, Nq, Nk, kpm, stride_kpm_n, mask, stride_mask_m,
                          stride_mask_n, seed, drop_offset, drop_threshold, drop_scale, pid_bh, STAGE=PREFIX_TAIL, CAUSAL=CAUSAL,
                          HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND, EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION,
                          EXP_MUL=EXP_MUL, DROPOUT=DROPOUT)

    if DO_SEQ:
        kb = K + b * stride_kb + g * stride_kh
        vb = V + b * stride_vb + g * stride_vh
        full, hi = seq_key_range(i0, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
        for start in range(0, full, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, kb, vb, start, Nk, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                          offs_n, offs_d, D, qk_scale, Nq, Nk, kpm, stride_kpm_n, mask, stride_mask_m, stride_mask_n,
                          seed, drop_offset, drop_threshold, drop_scale, pid_bh, STAGE=SEQ, CAUSAL=CAUSAL,
                          HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND, EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION,
                          EXP_MUL=EXP_MUL, DROPOUT=DROPOUT)
        for start in range(full, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse2, delta, kb, vb, start, Nk, stride_kn, stride_kd, stride_vn, stride_vd, offs_m,
                          offs_n, offs_d, D, qk_scale, Nq, Nk, kpm, stride_kpm_n, mask, stride_mask_m, stride_mask_n,
                          seed, drop_offset, drop_threshold, drop_scale, pid_bh, STAGE=SEQ_EDGE, CAUSAL=CAUSAL,
                          HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND, EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION,
                          EXP_MUL=EXP_MUL, DROPOUT=DROPOUT)
    ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    row_mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    if ATOMIC:
        tl.atomic_add(ptrs, dq * dq_scale, mask=row_mask, sem="relaxed")
    else:
        tl.store(ptrs, (dq * dq_scale).to(DQ.dtype.element_ty), mask=row_mask)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, O, Lse2, Delta, Lse, DLse, DQ, stride_dqm, stride_dqd, row_base, m0,
               offs_m, offs_n, offs_d, j, n_keys, D, qk_scale, stride_qm, stride_qd, stride_dom, stride_dod,
               stride_om, stride_od, Nq, Nk, KPM, stride_kpm_n, MASK, stride_mask_m, stride_mask_n,
               IS_SEQ: tl.constexpr, CHECK_KEYS: tl.constexpr,
               CHECK_ROWS: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
               FUSE_DELTA: tl.constexpr, HAS_DLSE: tl.constexpr, FUSE_DQ: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EXP_MUL: tl.constexpr, seed, drop_offset,
               drop_threshold, drop_scale, bh, j0, DROPOUT: tl.constexpr):
    """Adds one query block's share to the key block's dk (unscaled) and dv, in transposed form
    (sT is [keys, queries]); with FUSE_DQ also adds the block's dS K (unscaled) into DQ (float32,
    atomics). IS_SEQ: sequence keys (KPM / MASK point at the row's masks); otherwise prefix keys.
    CHECK_KEYS / CHECK_ROWS: the key / query block may run past its end; CAUSAL: the query block
    crosses the diagonal.
    FUSE_DELTA: Delta and the base-2 lse come from O, dO and lse here, not from the preprocess."""
    i = m0 + offs_m
    qT = load_tile(Q + i[None, :] * stride_qm + offs_d[:, None] * stride_qd, i[None, :], Nq, offs_d[:, None], D,
                   CHECK_ROWS, not EVEN_D)
    do = load_tile(DO + i[:, None] * stride_dom + offs_d[None, :] * stride_dod, i[:, None], Nq, offs_d[None, :], D,
                   CHECK_ROWS, not EVEN_D)
    if FUSE_DELTA:
        o = load_tile(O + i[:, None] * stride_om + offs_d[None, :] * stride_od, i[:, None], Nq, offs_d[None, :], D,
                      CHECK_ROWS, not EVEN_D)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DLSE:
            delta -= tl.load(DLse + row_base + i, mask=i < Nq, other=0.0)
        lse = tl.load(Lse + row_base + i, mask=i < Nq, other=float("-inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * (LOG2E / EXP_MUL))
    else:
        lse2 = tl.load(Lse2 + row_base + i, mask=i < Nq, other=float("inf"))
        delta = tl.load(Delta + row_base + i, mask=i < Nq, other=0.0)
    if DOT_F32:
        qT = qT.to(tl.float32)
        do = do.to(tl.float32)
    sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
    if IS_SEQ:
        sT = seq_scores(sT, i[None, :], j[:, None], Nq, Nk, KPM, stride_kpm_n, MASK, stride_mask_m, stride_mask_n,
                        CHECK_BOUNDS=CHECK_KEYS, APPLY_CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND)
    elif CHECK_KEYS:
        sT = tl.where(j[:, None] < n_keys, sT, float("-inf"))
    pT = tl.exp2((sT - lse2[None, :]) * EXP_MUL)
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if DROPOUT:  # V was multiplied by the dropped, rescaled probabilities: dV and dP see those
        keepT = tl.trans(dropout_keep(seed, drop_offset, drop_threshold, bh, i, j0, not IS_SEQ, pT.shape[0]))
        dv += tl.dot(tl.where(keepT, pT * drop_scale, 0.0).to(do.dtype), do, input_precision=PRECISION)
        dpT = tl.where(keepT, dpT * drop_scale, 0.0)
    else:
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)
    dsT = (pT * (dpT - delta[None, :])).to(qT.dtype)
    dk += tl.dot(dsT, tl.trans(qT), input_precision=PRECISION)
    if FUSE_DQ:
        dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION)
        tl.atomic_add(DQ + i[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq,
                      mask=(i[:, None] < Nq) & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


@triton.heuristics(dict(_EVEN, EVEN_N=lambda a: a["Nk"] % a["BLOCK_N"] == 0))
@triton.jit(do_not_specialize=["N_BUCKET", "seed", "drop_offset", "drop_threshold"])  # never specialised on
def _bwd_dkdv_kernel(Q, K, V, KPM, MASK, DOut, Lse2, Delta, DK, DV, DQ,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_kpm_b, stride_kpm_n,
                     stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                     stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                     Hq, Hkv, Nq, Nk, D, group, qk_scale, scale, N_BUCKET, seed, drop_offset, drop_threshold,
                     drop_scale, DROPOUT: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, FUSE_DQ: tl.constexpr,
                     BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
                     EXP_MUL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr,
                     EVEN_N: tl.constexpr):
    """dK, dV of a block of sequence keys, over the query heads of its KV group (no atomics for
    them); with FUSE_DQ the dQ of every query block it meets, by atomics."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    j0 = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    j = j0 + offs_n
    k, v = load_key_block(K + b * stride_kb + g * stride_kh, V + b * stride_vb + g * stride_vh, j, Nk, stride_kn,
                          stride_kd, stride_vn, stride_vd, offs_d, D, not EVEN_N, EVEN_D, DOT_F32)
    if HAS_KPM:  # then a padded key's dk and dv come out exactly 0, as its probabilities are
        kept = kept_keys(j, Nk, KPM + b * stride_kpm_b, stride_kpm_n)[:, None]
        k = zero_padded_keys(k, kept)
        v = zero_padded_keys(v, kept)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full = query_range(j0, Nq, Nk, BLOCK_M, BLOCK_N, CAUSAL)
    kpm = KPM + b * stride_kpm_b
    for h in range(g * group, (g + 1) * group):
        qh = Q + b * stride_qb + h * stride_qh
        doh = DOut + b * stride_dob + h * stride_doh
        dqh = DQ + b * stride_dqb + h * stride_dqh
        mask = MASK + b * stride_mask_b + h * stride_mask_h
        row_base = (b * Hq + h) * Nq
        for m0 in range(lo, full, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, qh, doh, doh, Lse2, Delta, Lse2, Lse2, dqh, stride_dqm, stride_dqd,
                                row_base, m0, offs_m, offs_n, offs_d, j, Nk, D, qk_scale, stride_qm, stride_qd,
                                stride_dom, stride_dod, 0, 0, Nq, Nk, kpm, stride_kpm_n, mask, stride_mask_m,
                                stride_mask_n, IS_SEQ=True, CHECK_KEYS=not EVEN_N, CHECK_ROWS=not EVEN_M,
                                CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND, FUSE_DELTA=False, HAS_DLSE=False,
                                FUSE_DQ=FUSE_DQ, EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION, EXP_MUL=EXP_MUL,
                                seed=seed, drop_offset=drop_offset, drop_threshold=drop_threshold,
                                drop_scale=drop_scale, bh=b * Hq + h, j0=j0, DROPOUT=DROPOUT)
        for m0 in range(full, Nq, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, qh, doh, doh, Lse2, Delta, Lse2, Lse2, dqh, stride_dqm, stride_dqd,
                                row_base, m0, offs_m, offs_n, offs_d, j, Nk, D, qk_scale, stride_qm, stride_qd,
                                stride_dom, stride_dod, 0, 0, Nq, Nk, kpm, stride_kpm_n, mask, stride_mask_m,
                                stride_mask_n, IS_SEQ=True, CHECK_KEYS=not EVEN_N, CHECK_ROWS=not EVEN_M,
                                CAUSAL=False, HAS_KPM=HAS_KPM, MASK_KIND=MASK_KIND, FUSE_DELTA=False, HAS_DLSE=False,
                                FUSE_DQ=FUSE_DQ, EVEN_D=EVEN_D, DOT_F32=DOT_F32, PRECISION=PRECISION, EXP_MUL=EXP_MUL,
                                seed=seed, drop_offset=drop_offset, drop_threshold=drop_threshold,
                                drop_scale=drop_scale, bh=b * Hq + h, j0=j0, DROPOUT=DROPOUT)
    key_mask = (j[:, None] < Nk) & (offs_d[None, :] < D)
    tl.store(DK + b * stride_dkb + g * stride_dkh + j[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=key_mask)
    tl.store(DV + b * stride_dvb + g * stride_dvh + j[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_mask)


@triton.heuristics(dict(_EVEN, EVEN_N=lambda a: a["P"] % a["BLOCK_N"] == 0))
@triton.jit(do_not_specialize=["N_BUCKET", "seed", "drop_offset", "drop_threshold"])  # never specialised on
def _bwd_dprefix_kernel(Q, PK, PV, Rows, RowStart, DOut, Out, Lse, DLse, Lse2, Delta, DPK, DPV, DQ,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_pkt, stride_pkh, stride_pkn, stride_pkd,
                        stride_pvt, stride_pvh, stride_pvn, stride_pvd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_ob, stride_oh, stride_om, stride_od,
                        stride_dpc, stride_dpt, stride_dph, stride_dpn, stride_dpd,
                        stride_dpvc, stride_dpvt, stride_dpvh, stride_dpvn, stride_dpvd,
                        stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                        B, Hq, Hkv, Nq, P, D, group, qk_scale, scale, N_BUCKET, seed, drop_offset, drop_threshold,
                        drop_scale, DROPOUT: tl.constexpr, ROWS: tl.constexpr, FUSE_DELTA: tl.constexpr, HAS_DLSE: tl.constexpr,
                        FUSE_DQ: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                        DOT_F32: tl.constexpr, PRECISION: tl.constexpr, EXP_MUL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr):
    """dprefix for keys [j0, j0 + BLOCK_N) of entry t, KV head g, from chunk c (of the grid's
    third axis) of the (row using t, query block) pairs: the B x Nq queries that read the entry
    are one long sequence, split so that a GPU fills up even when few rows share the prefix.
    Rows that use entry t: ROWS 0 every row (one shared prefix), 1 row t (one prefix per row),
    2 Rows[RowStart[t]:RowStart[t + 1]] (a bank). ATOMIC adds the scaled partial into float32
    DPK / DPV [T, Hkv, P, D]; otherwise it is written to slot c of DPK / DPV [chunks, T, ...],
    which the host sums in a fixed order (deterministic)."""
    pid_n = tl.program_id(0)
    pid_tg = tl.program_id(1)
    c = tl.program_id(2)
    chunks = tl.num_programs(2)
    t = pid_tg // Hkv
    g = pid_tg % Hkv
    j0 = pid_n * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    j = j0 + offs_n
    k, v = load_key_block(PK + t * stride_pkt + g * stride_pkh, PV + t * stride_pvt + g * stride_pvh, j, P,
                          stride_pkn, stride_pkd, stride_pvn, stride_pvd, offs_d, D, not EVEN_N, EVEN_D, DOT_F32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if ROWS == 0:
        first = 0
        n_rows = B
    elif ROWS == 1:
        first = t
        n_rows = 1
    else:
        first = tl.load(RowStart + t)
        n_rows = tl.load(RowStart + t + 1) - first
    n_qblocks = tl.cdiv(Nq, BLOCK_M)
    n_items = n_rows * n_qblocks
    for item in range(c * n_items // chunks, (c + 1) * n_items // chunks):
        if ROWS == 2:
            b = tl.load(Rows + first + item // n_qblocks)
        else:
            b = first + item // n_qblocks
        m0 = (item % n_qblocks) * BLOCK_M
        for h in range(g * group, (g + 1) * group):
            row_base = (b * Hq + h) * Nq
            # Prefix keys: no mask applies (KPM / MASK are unused placeholders).
            dk, dv = _dkdv_tile(dk, dv, k, v, Q + b * stride_qb + h * stride_qh, DOut + b * stride_dob + h * stride_doh,
                                Out + b * stride_ob + h * stride_oh, Lse2, Delta, Lse, DLse,
                                DQ + b * stride_dqb + h * stride_dqh, stride_dqm, stride_dqd, row_base, m0,
                                offs_m, offs_n, offs_d, j, P, D, qk_scale, stride_qm, stride_qd, stride_dom,
                                stride_dod, stride_om, stride_od, Nq, P, Rows, 0, Rows, 0, 0, IS_SEQ=False,
                                CHECK_KEYS=not EVEN_N, CHECK_ROWS=not EVEN_M, CAUSAL=False, HAS_KPM=False,
                                MASK_KIND=0, FUSE_DELTA=FUSE_DELTA, HAS_DLSE=HAS_DLSE, FUSE_DQ=FUSE_DQ, EVEN_D=EVEN_D,
                                DOT_F32=DOT_F32, PRECISION=PRECISION, EXP_MUL=EXP_MUL, seed=seed,
                                drop_offset=drop_offset, drop_threshold=drop_threshold, drop_scale=drop_scale,
                                bh=b * Hq + h, j0=j0, DROPOUT=DROPOUT)
    key_mask = (j[:, None] < P) & (offs_d[None, :] < D)
    # DPK and DPV have layouts of their own (each gradient takes its input's, and prefix_k and
    # prefix_v may be different views).
    k_at = t * stride_dpt + g * stride_dph + j[:, None] * stride_dpn + offs_d[None, :] * stride_dpd
    v_at = t * stride_dpvt + g * stride_dpvh + j[:, None] * stride_dpvn + offs_d[None, :] * stride_dpvd
    if ATOMIC:
        tl.atomic_add(DPK + k_at, dk * scale, mask=key_mask, sem="relaxed")
        tl.atomic_add(DPV + v_at, dv, mask=key_mask, sem="relaxed")
    else:
        tl.store(DPK + c * stride_dpc + k_at, (dk * scale).to(DPK.dtype.element_ty), mask=key_mask)
        tl.store(DPV + c * stride_dpvc + v_at, dv.to(DPV.dtype.element_ty), mask=key_mask)


# ----------------------------------------------------------------------------------------------
# Launcher


def _rows_by_entry(prefix_index, T: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """A bank's rows grouped by the entry they use (stable: a fixed order), and each entry's
    start. Sort + searchsorted, not bincount: on CUDA bincount reads the index back to size its
    output (a host sync)."""
    entries, rows = torch.sort(prefix_index.to(torch.int64), stable=True)
    start = torch.searchsorted(entries, torch.arange(T + 1, device=device, dtype=torch.int64))
    return rows, start


def _num_chunks(rows_per_entry: int, Nq: int, T: int, Hkv: int, P: int, meta: dict, target: int) -> int:
    """Chunks of (row, query block) pairs: enough programs to fill the device twice, one pair per
    chunk at most."""
    items = rows_per_entry * triton.cdiv(Nq, meta["BLOCK_M"])
    programs = T * Hkv * triton.cdiv(P, meta["BLOCK_N"])
    return max(1, min(items, -(-target // max(1, programs))))


def triton_backward(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse, dlse,
                    scale, causal, deterministic, need_dq, need_dkv, need_dprefix, dropout_p=0.0, dropout_seed=0,
                    dropout_offset=0):
    """(dq, dk, dv, dprefix_k, dprefix_v); gradients not asked for are empty tensors."""
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
        prefix_index = prefix_index.contiguous()  # the kernels read IDX + b
    if dlse is not None:
        dlse = dlse.contiguous()  # autograd hands lse.sum()'s gradient as a stride-0 view
    # A row whose scores are all near finfo.min (a Hugging Face float mask hiding every key):
    # float32 lse = max + log(l) lost log(l), and the probabilities rebuilt from it would be
    # wrong. The CPU backend recomputes such rows; this one refuses. Only possible with P == 0:
    # every row sees the prefix keys, whose scores no mask touches. The test reads its answer
    # back (a host sync), so a call with a prefix does not make it.
    if mask_kind(attn_mask) == 2 and P == 0 and bool(((lse.abs() > 2.0**20) & lse.isfinite()).any()):
        raise NotImplementedError(
            "prefix_attn: the triton backward cannot rebuild rows whose every visible key has an additive "
            "mask near finfo.min (|lse| > 2^20); use a bool mask or key_padding_mask for padding")

    qk_scale, exp_mul = score_units(attn_mask, scale)
    dot = dict(EXP_MUL=exp_mul, **dot_args(q.dtype, D))
    drop = dropout_args(dropout_p, dropout_seed, dropout_offset)
    dot["DROPOUT"] = dropout_p > 0.0
    tune = not deterministic
    pk, spk = optional(prefix_k, q, 4)
    pv, spv = optional(prefix_v, q, 4)
    kpm, skpm = optional(as_bytes(key_padding_mask), q, 2)
    mask, smask = optional(as_bytes(attn_mask), q, 4)
    per_row = prefix_k is not None and prefix_index is None and prefix_k.shape[0] > 1
    flags = dict(HAS_KPM=key_padding_mask is not None, MASK_KIND=mask_kind(attn_mask), CAUSAL=bool(causal))
    bucket = n_bucket(max(Nq, Nk))

    # dQ by atomics from the key-major kernels (5 matmuls per tile) unless deterministic
    fuse_dq = need_dq and need_dkv and Nk > 0 and not deterministic
    dq_acc = torch.zeros(B, Hq, Nq, D, device=q.device, dtype=torch.float32) if fuse_dq else None
    dq_arg = dq_acc if fuse_dq else q.new_empty(0, dtype=torch.float32)
    sdq = dq_acc.stride() if fuse_dq else (0, 0, 0, 0)

    prefix_only = not (need_dq or need_dkv)
    delta = lse2 = lse  # placeholders: the prefix-only kernel fuses Delta and lse2
    if not prefix_only:
        delta = torch.empty(B, Hq, Nq, device=q.device, dtype=torch.float32)
        lse2 = torch.empty_like(delta)
        pre_m = configs.PREPROCESS_BLOCK_M
        _bwd_preprocess_kernel[(triton.cdiv(Nq, pre_m), B * Hq)](
            out, dout, dlse if dlse is not None else lse, lse, delta, lse2, *out.stride(), *dout.stride(), Hq, Nq,
            D, HAS_DLSE=dlse is not None, BLOCK_M=pre_m, BLOCK_D=dot["BLOCK_D"], num_warps=4, EXP_MUL=exp_mul)

    def run_dq(target, atomic: bool, do_seq: bool, dq_scale: float):
        launch(_bwd_dq_kernel, "dq", lambda meta: (triton.cdiv(Nq, meta["BLOCK_M"]), B * Hq), D, q.dtype,
               q, k, v, pk, pv, prefix_index if prefix_index is not None else q, kpm, mask, dout, lse2, delta,
               target, *q.stride(), *k.stride(), *v.stride(), *spk, *spv, *skpm, *smask, *dout.stride(),
               *target.stride(), Hq, Nq, Nk, P, D, Hq // Hkv, qk_scale, dq_scale, bucket, *drop,
               HAS_PREFIX=P > 0, HAS_INDEX=prefix_index is not None, PER_ROW=per_row, DO_SEQ=do_seq,
               ATOMIC=atomic, tune=tune, **flags, **dot)

    if need_dq and not fuse_dq:
        run_dq(dq, False, True, scale)
    if need_dkv and Nk > 0:
        launch(_bwd_dkdv_kernel, "dkv", lambda meta: (triton.cdiv(Nk, meta["BLOCK_N"]), B * Hkv), D, q.dtype,
               q, k, v, kpm, mask, dout, lse2, delta, dk, dv, dq_arg,
               *q.stride(), *k.stride(), *v.stride(), *skpm, *smask, *dout.stride(), *dk.stride(), *dv.stride(),
               *sdq, Hq, Hkv, Nq, Nk, D, Hq // Hkv, qk_scale, scale, bucket, *drop, FUSE_DQ=fuse_dq, tune=tune,
               **flags,
               **dot)
    elif need_dkv:
        dk.zero_()
        dv.zero_()
    if need_dprefix and P > 0:
        _launch_dprefix(q, prefix_k, prefix_v, prefix_index, dout, out, lse, dlse, lse2, delta, dpk, dpv, dq_arg, sdq,
                        qk_scale, scale, per_row, fuse_dq, prefix_only, deterministic, dot, drop)
    elif need_dprefix:
        dpk.zero_()
        dpv.zero_()
    elif fuse_dq and P > 0:  # a frozen prefix still adds to dQ
        run_dq(dq_acc, True, False, 1.0)
    if fuse_dq:
        dq.copy_(dq_acc.mul_(scale))
    return dq, dk, dv, dpk, dpv


def _launch_dprefix(q, prefix_k, prefix_v, prefix_index, dout, out, lse, dlse, lse2, delta, dpk, dpv, dq_arg, sdq,
                    qk_scale, scale, per_row, fuse_dq, prefix_only, deterministic, dot, drop):
    B, Hq, Nq, D = q.shape
    T, Hkv, P = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
    if prefix_index is not None:
        rows, start, mode = *_rows_by_entry(prefix_index, T, q.device), 2
    else:
        rows = start = q  # unused placeholders
        mode = 1 if per_row else 0
    rows_per_entry = 1 if per_row else B  # a bank entry may be used by every row
    target = configs.dprefix_programs(q.device)
    atomic = not deterministic
    if atomic:  # float32 accumulators, zeroed; a float32 prefix accumulates in place
        in_place = prefix_k.dtype == torch.float32
        acc_k = dpk.zero_() if in_place else torch.zeros(prefix_k.shape, device=q.device, dtype=torch.float32)
        acc_v = dpv.zero_() if in_place else torch.zeros(prefix_v.shape, device=q.device, dtype=torch.float32)
        tk, tv = acc_k.unsqueeze(0), acc_v.unsqueeze(0)
        grid = lambda meta: (triton.cdiv(P, meta["BLOCK_N"]), T * Hkv,  # noqa: E731
                             _num_chunks(rows_per_entry, Nq, T, Hkv, P, meta, target))
    else:
        cfg = configs.default("dprefix", D, q.dtype)
        chunks = _num_chunks(rows_per_entry, Nq, T, Hkv, P, cfg.meta(), target)
        if chunks == 1:
            tk, tv = dpk.unsqueeze(0), dpv.unsqueeze(0)  # written in place, in the prefix dtype
        else:
            tk = torch.empty(chunks, *prefix_k.shape, device=q.device, dtype=torch.float32)
            tv = torch.empty_like(tk)
        grid = lambda meta: (triton.cdiv(P, meta["BLOCK_N"]), T * Hkv, chunks)  # noqa: E731
    launch(_bwd_dprefix_kernel, "dprefix", grid, D, q.dtype,
           q, prefix_k, prefix_v, rows, start, dout, out, lse, dlse if dlse is not None else lse, lse2, delta,
           tk, tv, dq_arg,
           *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *dout.stride(), *out.stride(), *tk.stride(),
           *tv.stride(), *sdq,
           B, Hq, Hkv, Nq, P, D, Hq // Hkv, qk_scale, scale, n_bucket(B * Nq), *drop,
           ROWS=mode, FUSE_DELTA=prefix_only, HAS_DLSE=dlse is not None, FUSE_DQ=fuse_dq, ATOMIC=atomic,
           tune=not deterministic, **dot)
    if atomic:
        if tk.data_ptr() != dpk.data_ptr():
            dpk.copy_(tk[0])
            dpv.copy_(tv[0])
    elif tk.shape[0] > 1:
        dpk.copy_(tk.sum(0))  # a fixed-order reduction: deterministic
        dpv.copy_(tv.sum(0))
