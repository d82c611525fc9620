"""What every kernel shares: which keys a query sees, which tiles need masks, and masked loads.

Visibility (SPEC): prefix keys are visible to every query; sequence key j is visible to query i
iff j <= i + (Nk - Nq) when causal (bottom-right aligned), the key padding mask keeps it, and a
bool attn_mask keeps it; an additive float mask is added to the score.

            prefix keys      sequence keys (causal, Nk - Nq = 2)
    query 0  P P P P          x x x . . . .
    query 1  P P P P          x x x x . . .
    query 2  P P P P          x x x x x . .

Tile ranges. A program that owns the query block [i0, i0 + BLOCK_M) walks the sequence keys in
two stages: [0, full) where no causal or bounds mask is needed, then [full, hi) where one is;
keys at or past hi are hidden from the whole block. A program that owns the key block
[j0, j0 + BLOCK_N) walks the queries the same way, the other way round. Both ranges come from
here and nowhere else.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# The stages of a query block's walk over the keys, each loop of a kernel one of them: it says
# which masks a tile needs, in one constexpr.
PREFIX = tl.constexpr(0)  # prefix tiles wholly inside P: no mask at all
PREFIX_TAIL = tl.constexpr(1)  # the prefix's last, partial tile: its bounds
SEQ = tl.constexpr(2)  # sequence tiles every query of the block sees: the padding / attn masks
SEQ_EDGE = tl.constexpr(3)  # sequence tiles across the causal diagonal or the end: bounds and causality too


@triton.jit
def seq_key_range(i0, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full, hi) for the query block [i0, i0 + BLOCK_M): sequence-key tiles starting below full
    are wholly visible to every query of the block (and in bounds), those in [full, hi) need the
    causal / bounds mask, keys >= hi are hidden. full is a multiple of BLOCK_N."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(i0 + BLOCK_M + Nk - Nq, 0), Nk)
        full = tl.minimum(tl.maximum((i0 + Nk - Nq + 1) // BLOCK_N * BLOCK_N, 0), hi // BLOCK_N * BLOCK_N)
    else:
        hi = Nk
        full = Nk // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def query_range(j0, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(lo, full) for the sequence-key block [j0, j0 + BLOCK_N): query blocks starting below lo
    see none of its keys; those in [lo, full) need the causal mask; those from full on see
    every key of the block (the bounds of the last query block are the loads' business).
    Both are multiples of BLOCK_M."""
    if CAUSAL:
        # the first query that sees key j0 is i = j0 - (Nk - Nq); a query block whose first row
        # is past the block's last key + (Nq - Nk) sees all of it
        lo = tl.maximum(j0 - (Nk - Nq), 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum(j0 + BLOCK_N - 1 - (Nk - Nq) + BLOCK_M - 1, 0) // BLOCK_M * BLOCK_M,
                          tl.cdiv(Nq, BLOCK_M) * BLOCK_M)
        full = tl.maximum(full, lo)
    else:
        lo = 0
        full = 0
    return lo, full


@triton.jit
def kept_keys(j, Nk, KPM, stride_kpm_n):
    """The batch row's key_padding_mask (KPM points at it) for sequence keys j, of any shape;
    False past Nk."""
    return tl.load(KPM + j * stride_kpm_n, mask=j < Nk, other=0) != 0


@triton.jit
def zero_padded_keys(x, kept):
    """A K or V tile with the rows (or columns) of padded keys zeroed: a padded key never affects
    any result, whatever it holds (SPEC). Masking its score is not enough: its zero probability
    would still multiply its value (0 * inf = NaN), and its zero score gradient its key."""
    return tl.where(kept, x, tl.zeros_like(x))


@triton.jit
def seq_scores(s, i, j, Nq, Nk, KPM, stride_kpm_n, MASK, stride_mask_m, stride_mask_n, CHECK_BOUNDS: tl.constexpr,
               APPLY_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr):
    """Masks scores s of sequence keys j for queries i (i, j broadcast to s's shape): hidden keys
    get -inf; an additive float mask is added (scores are in natural units then). KPM points at
    the batch row's padding mask, MASK at the (row, head)'s attn_mask. CHECK_BOUNDS: the tile may
    hold keys past Nk. On interior tiles with no mask tensors this is the identity. Rows past Nq
    are never masked here: no kernel stores them, and the backward's lse for them is +inf, which
    zeroes their probabilities."""
    if CHECK_BOUNDS or APPLY_CAUSAL or HAS_KPM or MASK_KIND == 1:
        visible = j < Nk
        if APPLY_CAUSAL:
            visible = visible & (j <= i + (Nk - Nq))
        if HAS_KPM:
            visible = visible & kept_keys(j, Nk, KPM, stride_kpm_n)
        if MASK_KIND == 1:
            keep = tl.load(MASK + i * stride_mask_m + j * stride_mask_n, mask=(i < Nq) & (j < Nk), other=0)
            visible = visible & (keep != 0)
        s = tl.where(visible, s, float("-inf"))
    if MASK_KIND == 2:
        bias = tl.load(MASK + i * stride_mask_m + j * stride_mask_n, mask=(i < Nq) & (j < Nk), other=float("-inf"))
        s = s + bias
    return s


@triton.jit
def dropout_keep(seed, offset, threshold, bh, i, j0, IS_PREFIX: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attention dropout's keep flags [len(i), BLOCK_N] for queries i of row-head bh (b * Hq + h)
    and the keys j0 .. j0 + BLOCK_N - 1 of one segment (j0 a multiple of 4): the stream of
    csrc/prefix_attn_dropout.h. One Philox call gives the four words of four consecutive keys,
    interleaved back into key order."""
    zero = tl.zeros((i.shape[0], BLOCK_N // 4), dtype=tl.uint32)
    col4 = (j0 // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    if IS_PREFIX:
        col4 = col4 | 0x80000000
    r0, r1, r2, r3 = tl.philox(seed, zero + col4[None, :], zero + i.to(tl.uint32)[:, None],
                               zero + bh.to(tl.uint32), zero + offset.to(tl.uint32))
    # join(join(r0, r2), join(r1, r3))[m, t, y, x] = r_{2y + x}: key 4t + w takes word w
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (i.shape[0], BLOCK_N))
    return words >= threshold.to(tl.uint32)


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """tl.load of a 2-D tile, masked only along the dimensions that may run past the tensor:
    interior tiles of an even-sized problem load with no mask at all. rows / cols broadcast to
    the tile's shape; what is outside reads as 0."""
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=(rows < n_rows) & (cols < n_cols), other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=rows < n_rows, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=cols < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def prefix_entry(IDX, b, HAS_INDEX: tl.constexpr, PER_ROW: tl.constexpr):
    """The prefix (bank entry) batch row b reads: prefix_index[b], b itself, or the shared 0."""
    if HAS_INDEX:
        return tl.load(IDX + b)
    elif PER_ROW:
        return b
    else:
        return 0


@triton.jit
def query_block(Hq, group, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """The query block of a query-major program (grid: query blocks x B*Hq): (row index b*Hq + h,
    b, h, KV head g, first query i0, query offsets, key offsets, head-dim offsets). Causal
    launches take the last query blocks, which see the most keys, first."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    h = pid_bh % Hq
    i0 = pid_m * BLOCK_M
    return (pid_bh, pid_bh // Hq, h, h // group, i0, i0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N),
            tl.arange(0, BLOCK_D))


@triton.jit
def load_key_block(K, V, j, n_keys, stride_kn, stride_kd, stride_vn, stride_vd, offs_d, D,
                   CHECK_KEYS: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr):
    """The [BLOCK_N, BLOCK_D] K and V tiles of keys j that a key-major program keeps for its
    whole walk over the queries."""
    k = load_tile(K + j[:, None] * stride_kn + offs_d[None, :] * stride_kd, j[:, None], n_keys, offs_d[None, :], D,
                  CHECK_KEYS, not EVEN_D)
    v = load_tile(V + j[:, None] * stride_vn + offs_d[None, :] * stride_vd, j[:, None], n_keys, offs_d[None, :], D,
                  CHECK_KEYS, not EVEN_D)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def block_scores(q, K, j, n_keys, stride_kn, stride_kd, offs_m, offs_d, D, qk_scale, Nq, Nk, KPM, stride_kpm_n,
                 MASK, stride_mask_m, stride_mask_n, STAGE: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, EVEN_D: tl.constexpr, DOT_F32: tl.constexpr,
                 PRECISION: tl.constexpr):
    """A query-major program's scores against keys j of the walk's STAGE: (s [BLOCK_M, BLOCK_N]
    in the kernel's units, masked as the stage needs; the K tile, transposed, that made them,
    with padded keys zeroed)."""
    check_keys: tl.constexpr = STAGE == PREFIX_TAIL or STAGE == SEQ_EDGE
    kT = load_tile(K + j[None, :] * stride_kn + offs_d[:, None] * stride_kd, j[None, :], n_keys, offs_d[:, None],
                   D, check_keys, not EVEN_D)
    if STAGE >= SEQ and HAS_KPM:
        kT = zero_padded_keys(kT, kept_keys(j, Nk, KPM, stride_kpm_n)[None, :])
    if DOT_F32:
        kT = kT.to(tl.float32)
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    if STAGE >= SEQ:
        s = seq_scores(s, offs_m[:, None], j[None, :], Nq, Nk, KPM, stride_kpm_n, MASK, stride_mask_m, stride_mask_n,
                       CHECK_BOUNDS=check_keys, APPLY_CAUSAL=STAGE == SEQ_EDGE and CAUSAL, HAS_KPM=HAS_KPM,
                       MASK_KIND=MASK_KIND)
    elif check_keys:
        s = tl.where(j[None, :] < n_keys, s, float("-inf"))
    return s, kT


@triton.jit
def walk_values(V, j, n_keys, stride_vn, stride_vd, offs_d, D, Nk, KPM, stride_kpm_n, STAGE: tl.constexpr,
                HAS_KPM: tl.constexpr, EVEN_D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """The V tile of keys j of the walk's STAGE ([BLOCK_N, BLOCK_D], or its transpose), padded
    keys zeroed."""
    check_keys: tl.constexpr = STAGE == PREFIX_TAIL or STAGE == SEQ_EDGE
    if TRANSPOSED:
        v = load_tile(V + j[None, :] * stride_vn + offs_d[:, None] * stride_vd, j[None, :], n_keys, offs_d[:, None],
                      D, check_keys, not EVEN_D)
        if STAGE >= SEQ and HAS_KPM:
            v = zero_padded_keys(v, kept_keys(j, Nk, KPM, stride_kpm_n)[None, :])
    else:
        v = load_tile(V + j[:, None] * stride_vn + offs_d[None, :] * stride_vd, j[:, None], n_keys, offs_d[None, :],
                      D, check_keys, not EVEN_D)
        if STAGE >= SEQ and HAS_KPM:
            v = zero_padded_keys(v, kept_keys(j, Nk, KPM, stride_kpm_n)[:, None])
    return v
