// CUDA fallback kernels for attention over [prefix KV ; sequence KV]: the entry points, which
// send 16-bit calls with a head dim that is a multiple of 16 to the tensor-core kernels
// (prefix_attn_tc_*.cu), and the SIMT kernels that run everything else (float32, other head dims).
//
// The SIMT kernels are written to be right by construction rather than fast: float32 arithmetic,
// no tensor cores. One warp owns a few query rows (forward, dQ) or key rows (dK/dV, dprefix);
// its 32 lanes split the head dim (lane l holds elements l, l + 32, ...; D <= 256), and a dot
// product is a warp-wide sum. Tiles of keys or queries are staged in shared memory as float32
// so a block's warps share them. Scores stay in natural units (an additive finfo.min mask must
// stay finite). Every output element has exactly one writer: no atomics, so results are the
// same run to run.
//
// Includes only CUDA headers and our own, so nvcc compiles it without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "prefix_attn_cuda.h"
#include "prefix_attn_tc.cuh"
#include "prefix_attn_tiles.cuh"

namespace prefix_attn::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;                       // query rows per warp (forward, dQ)
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;  // 16
constexpr int kKeysPerWarp = 2;                       // key rows per warp (dK/dV, dprefix)
constexpr int kKeysPerBlock = kWarps * kKeysPerWarp;  // 8
constexpr int kTile = 32;                             // rows per shared-memory tile
constexpr int kMaxPerLane = 8;                        // D <= 256

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Dropout of the SIMT kernels, which walk keys one at a time: the four words of key j's
// four-aligned group, fetched at the group's first key (tiles start at multiples of 4), and one
// word picked by value (a register array indexed at run time would live in local memory).
__device__ __forceinline__ uint32_t word_at(const uint32_t (&w)[4], int64_t j) {
  const int k = static_cast<int>(j & 3);
  return k == 0 ? w[0] : k == 1 ? w[1] : k == 2 ? w[2] : w[3];
}

// Stages rows [r0, r0 + n) of a strided [rows, D] slab into shared memory as float [n][D].
template <typename T>
__device__ void stage_rows(float* dst, const T* src, int64_t row_stride, int64_t col_stride,
                           int64_t r0, int64_t n, int64_t D) {
  for (int64_t idx = threadIdx.x; idx < n * D; idx += blockDim.x) {
    const int64_t r = idx / D, d = idx % D;
    dst[idx] = to_float(src[(r0 + r) * row_stride + d * col_stride]);
  }
}

// One lane's share of a row: elements lane, lane + 32, ... of a strided row, times `mul`.
template <typename T>
__device__ __forceinline__ void load_lane(float (&x)[kMaxPerLane], const T* row, int64_t col_stride,
                                          int64_t D, int lane, float mul) {
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    x[e] = d < D ? to_float(row[d * col_stride]) * mul : 0.f;
  }
}

__device__ __forceinline__ float lane_dot(const float (&x)[kMaxPerLane], const float* row, int64_t D,
                                          int lane) {
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < kMaxPerLane; ++e) {
    const int64_t d = lane + 32 * e;
    if (d < D) acc += x[e] * row[d];
  }
  return warp_sum(acc);
}

// ------------------------------------------------------------------------------------------
// Forward and dQ: a block per (b * Hq, 16 query rows); a warp per 4 rows. Both walk the key
// tiles of KeyTileWalk, staging each in shared memory, and hand every visible (row, key) pair to
// `visit(r, jj, s, keep)`: the warp's row r, the tile's key jj (staged at Ks / Vs + jj * D), the
// masked score, and the dropout multiplier (0 or dropout.scale; 1 without dropout).
template <typename T, bool kDropout, typename Visit>
__device__ __forceinline__ void walk_keys(const FwdParams& p, int64_t b, int64_t h, int64_t i0, float* Ks, float* Vs,
                                          const float (&qr)[kRowsPerWarp][kMaxPerLane], const bool (&active)[kRowsPerWarp],
                                          Visit&& visit) {
  const int64_t bh = b * p.Hq + h, g = h / (p.Hq / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const KeyTileWalk walk(p, i0, kRowsPerBlock, kTile);
  for (int64_t t = 0; t < walk.size(); ++t) {
    const KeyTile kt = walk[t];
    const KVSource<T> src = kv_source<T>(p, kt.is_prefix, b, g);
    __syncthreads();  // every warp is done with the previous tile
    stage_rows(Ks, src.k, src.k_rs, src.k_cs, kt.j0, kt.n, p.D);
    stage_rows(Vs, src.v, src.v_rs, src.v_cs, kt.j0, kt.n, p.D);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (!active[r]) continue;
      const int64_t i = i0 + warp * kRowsPerWarp + r;
      uint32_t words[4] = {0, 0, 0, 0};
      for (int jj = 0; jj < kt.n; ++jj) {
        const int64_t j = kt.j0 + jj;
        if (kDropout && jj % 4 == 0) dropout_words4(p.dropout, kt.is_prefix, bh, i, j >> 2, words);
        float s = lane_dot(qr[r], Ks + jj * p.D, p.D, lane);
        if (kt.masked) s = mask_seq_score(p, b, h, i, j, s);
        // the same on every lane; a hidden key's V and K are never read past its score, so a
        // padded key's garbage (inf, NaN: SPEC.md, "Padded keys") reaches no sum
        if (s == kNegInf) continue;
        const float keep = !kDropout ? 1.f : word_at(words, j) >= p.dropout.threshold ? p.dropout.scale : 0.f;
        visit(r, jj, s, keep);
      }
    }
  }
}

template <typename T, bool kDropout>
__global__ void __launch_bounds__(kThreads) fwd_kernel(FwdParams p) {
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = smem + kTile * p.D;
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq;
  const int64_t i0 = int64_t(blockIdx.y) * kRowsPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float qr[kRowsPerWarp][kMaxPerLane], acc[kRowsPerWarp][kMaxPerLane];
  float m[kRowsPerWarp], l[kRowsPerWarp];
  bool active[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    active[r] = i < p.Nq;
    load_lane(qr[r], slab<T>(p.q, b, h) + (active[r] ? i : 0) * p.q.s[2], p.q.s[3], p.D, lane, p.scale);
    m[r] = kNegInf;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) acc[r][e] = 0.f;
  }

  walk_keys<T, kDropout>(p, b, h, i0, Ks, Vs, qr, active, [&](int r, int jj, float s, float keep) {
    const float m_new = fmaxf(m[r], s);
    const float alpha = expf(m[r] - m_new);  // 0 when m was -inf
    const float pr = expf(s - m_new);
    l[r] = l[r] * alpha + pr;  // un-dropped: dropout changes out, not lse
    m[r] = m_new;
    const float* vrow = Vs + jj * p.D;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      acc[r][e] = acc[r][e] * alpha + (d < p.D ? keep * pr * vrow[d] : 0.f);
    }
  });

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (!active[r]) continue;
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    // l == 0 only when no key was visible (P == 0): out 0, lse -inf
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    T* orow = slab<T>(p.out, b, h) + i * p.out.s[2];
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < p.D) orow[d * p.out.s[3]] = from_float<T>(acc[r][e] * inv);
    }
    if (lane == 0) p.lse[bh * p.Nq + i] = l[r] > 0.f ? m[r] + logf(l[r]) : kNegInf;
  }
}

// ------------------------------------------------------------------------------------------
// Backward

// Delta = rowsum(dout * out) - dlse: a warp per query row. `out` is the forward's output, after
// dropout, which makes Delta the row's sum of P * dP with dP the dropped dO Vᵀ.
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(BwdParams p, float* delta) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.Hq * p.Nq) return;
  const int64_t i = row % p.Nq, bh = row / p.Nq, b = bh / p.Hq, h = bh % p.Hq;
  const T* dor = slab<T>(p.dout, b, h) + i * p.dout.s[2];
  const T* orow = slab<T>(p.out_fwd, b, h) + i * p.out_fwd.s[2];
  float acc = 0.f;
  for (int64_t d = lane; d < p.D; d += 32)
    acc += to_float(dor[d * p.dout.s[3]]) * to_float(orow[d * p.out_fwd.s[3]]);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc - (p.dlse != nullptr ? p.dlse[row] : 0.f);
}

template <typename T, bool kDropout>
__global__ void __launch_bounds__(kThreads) dq_kernel(BwdParams p, const float* delta) {
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = smem + kTile * p.D;
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq;
  const int64_t i0 = int64_t(blockIdx.y) * kRowsPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float qr[kRowsPerWarp][kMaxPerLane], dor[kRowsPerWarp][kMaxPerLane], dq[kRowsPerWarp][kMaxPerLane];
  float lse[kRowsPerWarp], dl[kRowsPerWarp];
  bool active[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    const int64_t ic = i < p.Nq ? i : 0;
    load_lane(qr[r], slab<T>(p.q, b, h) + ic * p.q.s[2], p.q.s[3], p.D, lane, p.scale);
    load_lane(dor[r], slab<T>(p.dout, b, h) + ic * p.dout.s[2], p.dout.s[3], p.D, lane, 1.f);
    lse[r] = p.lse_fwd[bh * p.Nq + ic];
    dl[r] = delta[bh * p.Nq + ic];
    active[r] = i < p.Nq && lse[r] != kNegInf;  // a row that saw no key has dq = 0
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) dq[r][e] = 0.f;
  }

  walk_keys<T, kDropout>(p, b, h, i0, Ks, Vs, qr, active, [&](int r, int jj, float s, float keep) {
    const float pr = expf(s - lse[r]);
    const float dp = keep * lane_dot(dor[r], Vs + jj * p.D, p.D, lane);
    const float ds = pr * (dp - dl[r]);
    const float* krow = Ks + jj * p.D;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < p.D) dq[r][e] += ds * krow[d];
    }
  });

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= p.Nq) continue;
    T* row = slab<T>(p.dq, b, h) + i * p.dq.s[2];
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < p.D) row[d * p.dq.s[3]] = from_float<T>(dq[r][e] * p.scale);
    }
  }
}

// Adds to the warp's key rows' dK (unscaled) and dV the share of query rows [m0, m0 + bm) of
// (b, h), staged in shared memory (Qs unscaled, DOs, and per-row lse / Delta). The warp's two
// keys j_first, j_first + 1 (j_first even) share one dropout call per query.
template <bool kDropout>
__device__ __forceinline__ void accumulate_key_grads(
    const FwdParams& p, int64_t b, int64_t h, int64_t j_first, bool is_seq, int lane,
    const float (&kr)[kKeysPerWarp][kMaxPerLane], const float (&vr)[kKeysPerWarp][kMaxPerLane],
    float (&dk)[kKeysPerWarp][kMaxPerLane], float (&dv)[kKeysPerWarp][kMaxPerLane], int64_t n_keys,
    const float* Qs, const float* DOs, const float* lse_s, const float* delta_s, int64_t m0, int64_t bm) {
  static_assert(kKeysPerWarp == 2, "a warp's keys lie in one four-aligned dropout group");
  for (int64_t ii = 0; ii < bm; ++ii) {
    const float L = lse_s[ii];
    if (L == kNegInf) continue;
    const int64_t i = m0 + ii;
    const float* qrow = Qs + ii * p.D;
    const float* dorow = DOs + ii * p.D;
    float keep[kKeysPerWarp] = {1.f, 1.f};
    if constexpr (kDropout) {
      uint32_t words[4];
      dropout_words4(p.dropout, !is_seq, b * p.Hq + h, i, j_first >> 2, words);
#pragma unroll
      for (int kk = 0; kk < kKeysPerWarp; ++kk)
        keep[kk] = word_at(words, j_first + kk) >= p.dropout.threshold ? p.dropout.scale : 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kKeysPerWarp; ++kk) {
      const int64_t j = j_first + kk;
      if (j >= n_keys) continue;
      float s = lane_dot(kr[kk], qrow, p.D, lane) * p.scale;
      if (is_seq) s = mask_seq_score(p, b, h, i, j, s);
      if (s == kNegInf) continue;  // so a padded key's dK, dV stay exactly 0, whatever its K, V
      const float pr = expf(s - L);
      const float dp = keep[kk] * lane_dot(vr[kk], dorow, p.D, lane);
      const float ds = pr * (dp - delta_s[ii]);
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int64_t d = lane + 32 * e;
        if (d < p.D) {
          dv[kk][e] += keep[kk] * pr * dorow[d];
          dk[kk][e] += ds * qrow[d];
        }
      }
    }
  }
}

// Stages query rows [m0, m0 + bm) of (b, h): Q, dout, lse and Delta.
template <typename T>
__device__ void stage_queries(const BwdParams& p, const float* delta, int64_t b, int64_t h, int64_t m0,
                              int64_t bm, float* Qs, float* DOs, float* lse_s, float* delta_s) {
  stage_rows(Qs, slab<T>(p.q, b, h), p.q.s[2], p.q.s[3], m0, bm, p.D);
  stage_rows(DOs, slab<T>(p.dout, b, h), p.dout.s[2], p.dout.s[3], m0, bm, p.D);
  const int64_t row0 = (b * p.Hq + h) * p.Nq + m0;
  for (int64_t ii = threadIdx.x; ii < bm; ii += blockDim.x) {
    lse_s[ii] = p.lse_fwd[row0 + ii];
    delta_s[ii] = delta[row0 + ii];
  }
}

template <typename T>
__device__ __forceinline__ void load_key_rows(float (&x)[kKeysPerWarp][kMaxPerLane], const T* base,
                                              const int64_t* s, int64_t j_first, int64_t n_keys, int64_t D,
                                              int lane) {
#pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
    const int64_t j = j_first + kk < n_keys ? j_first + kk : 0;
    load_lane(x[kk], base + j * s[2], s[3], D, lane, 1.f);
  }
}

template <typename T>
__device__ __forceinline__ void store_key_rows(const float (&x)[kKeysPerWarp][kMaxPerLane], T* base,
                                               const int64_t* s, int64_t j_first, int64_t n_keys, int64_t D,
                                               int lane, float mul) {
#pragma unroll
  for (int kk = 0; kk < kKeysPerWarp; ++kk) {
    const int64_t j = j_first + kk;
    if (j >= n_keys) continue;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < D) base[j * s[2] + d * s[3]] = from_float<T>(x[kk][e] * mul);
    }
  }
}

// dK / dV for the sequence: a block per (b * Hkv, 8 keys), looping over the group's query heads.
template <typename T, bool kDropout>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(BwdParams p, const float* delta) {
  extern __shared__ float smem[];
  float* Qs = smem;
  float* DOs = Qs + kTile * p.D;
  float* lse_s = DOs + kTile * p.D;
  float* delta_s = lse_s + kTile;
  const int64_t bg = blockIdx.x, b = bg / p.Hkv, g = bg % p.Hkv, group = p.Hq / p.Hkv;
  const int64_t j0 = int64_t(blockIdx.y) * kKeysPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j_first = j0 + warp * kKeysPerWarp;

  float kr[kKeysPerWarp][kMaxPerLane], vr[kKeysPerWarp][kMaxPerLane];
  float dk[kKeysPerWarp][kMaxPerLane] = {}, dv[kKeysPerWarp][kMaxPerLane] = {};
  load_key_rows(kr, slab<T>(p.k, b, g), p.k.s, j_first, p.Nk, p.D, lane);
  load_key_rows(vr, slab<T>(p.v, b, g), p.v.s, j_first, p.Nk, p.D, lane);

  const int64_t m_lo = first_query_seeing(p, j0);
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    for (int64_t m0 = m_lo; m0 < p.Nq; m0 += kTile) {
      const int64_t bm = p.Nq - m0 < kTile ? p.Nq - m0 : kTile;
      __syncthreads();
      stage_queries<T>(p, delta, b, h, m0, bm, Qs, DOs, lse_s, delta_s);
      __syncthreads();
      accumulate_key_grads<kDropout>(p, b, h, j_first, true, lane, kr, vr, dk, dv, p.Nk, Qs, DOs, lse_s, delta_s,
                                     m0, bm);
    }
  }
  store_key_rows(dk, slab<T>(p.dk, b, g), p.dk.s, j_first, p.Nk, p.D, lane, p.scale);
  store_key_rows(dv, slab<T>(p.dv, b, g), p.dv.s, j_first, p.Nk, p.D, lane, 1.f);
}

// dprefix: a block per (entry t * Hkv, 8 prefix keys, chunk c), where the chunks split the
// (row using t, query tile) pairs, so that few rows still fill the GPU; per pair it loops over
// the group's query heads. Writes float32 partials [c, t, g] when chunks > 1 (the host sums
// them in chunk order), else the gradient itself.
template <typename T, bool kDropout>
__global__ void __launch_bounds__(kThreads) dprefix_kernel(BwdParams p, BwdWorkspace ws) {
  extern __shared__ float smem[];
  float* Qs = smem;
  float* DOs = Qs + kTile * p.D;
  float* lse_s = DOs + kTile * p.D;
  float* delta_s = lse_s + kTile;
  const int64_t tg = blockIdx.x, t = tg / p.Hkv, g = tg % p.Hkv, group = p.Hq / p.Hkv;
  const int64_t c = blockIdx.z;
  const int64_t j0 = int64_t(blockIdx.y) * kKeysPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j_first = j0 + warp * kKeysPerWarp;

  float kr[kKeysPerWarp][kMaxPerLane], vr[kKeysPerWarp][kMaxPerLane];
  float dk[kKeysPerWarp][kMaxPerLane] = {}, dv[kKeysPerWarp][kMaxPerLane] = {};
  load_key_rows(kr, slab<T>(p.prefix_k, t, g), p.prefix_k.s, j_first, p.P, p.D, lane);
  load_key_rows(vr, slab<T>(p.prefix_v, t, g), p.prefix_v.s, j_first, p.P, p.D, lane);

  const int64_t first = ws.row_start[t], n_rows = ws.row_start[t + 1] - first;
  const int64_t n_tiles = ceil_div(p.Nq, kTile), n_items = n_rows * n_tiles;
  const int64_t item_end = (c + 1) * n_items / ws.chunks;
  for (int64_t item = c * n_items / ws.chunks; item < item_end; ++item) {
    const int64_t b = ws.rows[first + item / n_tiles];
    const int64_t m0 = (item % n_tiles) * kTile;
    const int64_t bm = p.Nq - m0 < kTile ? p.Nq - m0 : kTile;
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      __syncthreads();
      stage_queries<T>(p, ws.delta, b, h, m0, bm, Qs, DOs, lse_s, delta_s);
      __syncthreads();
      accumulate_key_grads<kDropout>(p, b, h, j_first, false, lane, kr, vr, dk, dv, p.P, Qs, DOs, lse_s, delta_s,
                                     m0, bm);
    }
  }
  if (ws.chunks == 1) {
    store_key_rows(dk, slab<T>(p.dprefix_k, t, g), p.dprefix_k.s, j_first, p.P, p.D, lane, p.scale);
    store_key_rows(dv, slab<T>(p.dprefix_v, t, g), p.dprefix_v.s, j_first, p.P, p.D, lane, 1.f);
  } else {
    const int64_t s[4] = {0, 0, p.D, 1};  // a contiguous [P, D] slab of the partials
    const int64_t slab = ((c * p.T + t) * p.Hkv + g) * p.P * p.D;
    store_key_rows(dk, ws.dprefix_k_partial + slab, s, j_first, p.P, p.D, lane, p.scale);
    store_key_rows(dv, ws.dprefix_v_partial + slab, s, j_first, p.P, p.D, lane, 1.f);
  }
}

size_t tile_smem(int64_t D) { return (2 * kTile * D + 2 * kTile) * sizeof(float); }

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// Calls f(T{}, std::bool_constant<dropout>{}) for the call's dtype and dropout flag.
template <typename F>
void dispatch(const FwdParams& p, F&& f) {
  auto with_dropout = [&](auto tag) {
    p.dropout.enabled ? f(tag, std::true_type{}) : f(tag, std::false_type{});
  };
  switch (p.dtype) {
    case DType::kFloat32: with_dropout(float{}); break;
    case DType::kFloat16: with_dropout(__half{}); break;
    case DType::kBFloat16: with_dropout(__nv_bfloat16{}); break;
  }
}

void simt_forward(const FwdParams& p, cudaStream_t stream) {
  dispatch(p, [&](auto tag, auto dropout) {
    const auto kernel = fwd_kernel<decltype(tag), decltype(dropout)::value>;
    set_smem(kernel, tile_smem(p.D));
    kernel<<<dim3(unsigned(p.B * p.Hq), unsigned(ceil_div(p.Nq, kRowsPerBlock))), kThreads, tile_smem(p.D),
             stream>>>(p);
  });
}

// dQ, dK/dV and dprefix (those of them asked for here and by p) of the calls the tensor-core
// kernels do not take; Delta is ready.
void simt_backward(const BwdParams& p, const BwdWorkspace& ws, cudaStream_t stream, bool dq, bool dkv,
                   bool dprefix) {
  const size_t smem = tile_smem(p.D);
  dispatch(p, [&](auto tag, auto dropout) {
    using T = decltype(tag);
    constexpr bool kDropout = decltype(dropout)::value;
    if (dq && p.need_dq) {
      const auto kernel = dq_kernel<T, kDropout>;
      set_smem(kernel, smem);
      kernel<<<dim3(unsigned(p.B * p.Hq), unsigned(ceil_div(p.Nq, kRowsPerBlock))), kThreads, smem, stream>>>(
          p, ws.delta);
    }
    if (dkv && p.need_dkv && p.Nk > 0) {
      const auto kernel = dkdv_kernel<T, kDropout>;
      set_smem(kernel, smem);
      kernel<<<dim3(unsigned(p.B * p.Hkv), unsigned(ceil_div(p.Nk, kKeysPerBlock))), kThreads, smem, stream>>>(
          p, ws.delta);
    }
    if (dprefix && p.need_dprefix && p.P > 0) {
      const auto kernel = dprefix_kernel<T, kDropout>;
      set_smem(kernel, smem);
      kernel<<<dim3(unsigned(p.T * p.Hkv), unsigned(ceil_div(p.P, kKeysPerBlock)), unsigned(ws.chunks)), kThreads,
               smem, stream>>>(p, ws);
    }
  });
}

// The most dynamic shared memory a block of the current device may opt into (99 KB on sm_86,
// sm_89 and sm_120, 163 KB on sm_80, 227 KB on sm_90), cached per device; 48 KB if the query fails.
size_t max_smem_optin() {
  static std::atomic<int> cache[64];  // 0: not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
    cudaGetLastError();
    return 48 * 1024;
  }
  int bytes = cache[dev].load(std::memory_order_relaxed);
  if (bytes == 0) {
    if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
      cudaGetLastError();
      bytes = 48 * 1024;
    }
    cache[dev].store(bytes, std::memory_order_relaxed);
  }
  return size_t(bytes);
}

// Which kernels run a call: the tensor-core ones where they take its dtype and head dim and their
// shared memory fits the device, the SIMT ones otherwise (a launch past the limit would fail).
bool tc_forward(const FwdParams& p) { return tc::supports(p) && tc::fwd_smem(p) <= max_smem_optin(); }
bool tc_dq(const FwdParams& p) { return tc::supports(p) && tc::dq_smem(p) <= max_smem_optin(); }
bool tc_kv(const FwdParams& p) { return tc::supports(p) && tc::kv_smem(p) <= max_smem_optin(); }

}  // namespace

int64_t dprefix_chunks(const FwdParams& p, int sm_count) {
  if (p.P == 0) return 1;
  const bool tc = tc_kv(p);  // the tiles of the kernel backward() will pick
  const int64_t query_tile = tc ? tc::dprefix_query_tile(p) : kTile;
  const int64_t key_tile = tc ? tc::dprefix_key_tile(p) : kKeysPerBlock;
  const bool per_row = p.prefix_index == nullptr && p.T > 1;
  // (row, query tile) pairs of one entry, at most: a bank entry may be used by every row
  const int64_t max_items = (per_row ? 1 : p.B) * ceil_div(p.Nq, query_tile);
  const int64_t blocks = ceil_div(p.P, key_tile) * p.T * p.Hkv;
  int64_t chunks = ceil_div(2 * int64_t(sm_count > 0 ? sm_count : 1), blocks);
  if (chunks > max_items) chunks = max_items;
  return chunks < 1 ? 1 : chunks;
}

void forward(const FwdParams& params, void* stream) {
  if (params.B * params.Hq * params.Nq == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  tc_forward(params) ? tc::forward(params, s) : simt_forward(params, s);
}

void backward(const BwdParams& params, const BwdWorkspace& ws, void* stream) {
  if (params.B * params.Hq * params.Nq == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch(params, [&](auto tag, auto) {
    delta_kernel<decltype(tag)><<<unsigned(ceil_div(params.B * params.Hq * params.Nq, kWarps)), kThreads, 0, s>>>(
        params, ws.delta);
  });
  const bool dq_tc = tc_dq(params), kv_tc = tc_kv(params);
  if (params.need_dq && dq_tc) tc::dq(params, ws.delta, s);
  if (kv_tc) {
    if (params.need_dkv && params.Nk > 0) tc::dkdv(params, ws.delta, s);
    if (params.need_dprefix && params.P > 0) tc::dprefix(params, ws, s);
  }
  if (!dq_tc || !kv_tc) simt_backward(params, ws, s, /*dq=*/!dq_tc, /*dkv=*/!kv_tc, /*dprefix=*/!kv_tc);
}

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace prefix_attn::cuda
