// CUDA fallback kernels for attention over [prefix KV ; sequence KV].
//
// Written to be right by construction rather than fast: plain SIMT code, float32 arithmetic,
// no tensor cores. One warp owns a few query rows (forward, dQ) or key rows (dK/dV, dprefix);
// its 32 lanes split the head dim (lane l holds elements l, l + 32, ...; D <= 256), and a dot
// product is a warp-wide sum. Tiles of keys or queries are staged in shared memory as float32
// so a block's warps share them. Scores stay in natural units (an additive finfo.min mask must
// stay finite). Every output element has exactly one writer: no atomics, so results are the
// same run to run.
//
// Includes only CUDA headers and our params header, so nvcc compiles it without torch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "prefix_attn_cuda.h"

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
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ int64_t prefix_entry(const FwdParams& p, int64_t b) {
  if (p.prefix_index != nullptr) return p.prefix_index[b];
  return p.T == 1 ? 0 : b;
}

// Score of sequence key j for query i of (b, h) after the masks: -inf when hidden.
__device__ __forceinline__ float mask_seq_score(const FwdParams& p, int64_t b, int64_t h, int64_t i,
                                                int64_t j, float s) {
  if (p.causal && j > i + (p.Nk - p.Nq)) return kNegInf;
  if (p.key_padding_mask != nullptr && !p.key_padding_mask[b * p.kpm_s[0] + j * p.kpm_s[1]])
    return kNegInf;
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t off = b * p.attn_mask.s[0] + h * p.attn_mask.s[1] + i * p.attn_mask.s[2] +
                        j * p.attn_mask.s[3];
    if (p.mask_kind == MaskKind::kBool) {
      if (!static_cast<const bool*>(p.attn_mask.ptr)[off]) return kNegInf;
    } else {
      s += static_cast<const float*>(p.attn_mask.ptr)[off];
    }
  }
  return s;
}

// Exclusive end of the sequence keys any query in [i0, i0 + n) can see.
__device__ __forceinline__ int64_t key_end(const FwdParams& p, int64_t i0, int64_t n) {
  if (!p.causal) return p.Nk;
  const int64_t e = i0 + n + (p.Nk - p.Nq);
  return e < 0 ? 0 : (e > p.Nk ? p.Nk : e);
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
// Forward: a block per (16 query rows, b * Hq); a warp per 4 rows.

template <typename T>
__global__ void __launch_bounds__(kThreads) fwd_kernel(FwdParams p) {
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = smem + kTile * p.D;
  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hkv);
  const int64_t i0 = int64_t(blockIdx.x) * kRowsPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* q = static_cast<const T*>(p.q.ptr);

  float qr[kRowsPerWarp][kMaxPerLane], acc[kRowsPerWarp][kMaxPerLane];
  float m[kRowsPerWarp], l[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    const int64_t ic = i < p.Nq ? i : 0;
    load_lane(qr[r], q + b * p.q.s[0] + h * p.q.s[1] + ic * p.q.s[2], p.q.s[3], p.D, lane, p.scale);
    m[r] = kNegInf;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) acc[r][e] = 0.f;
  }

  auto attend = [&](const T* kbase, const int64_t* ks, const T* vbase, const int64_t* vs,
                    int64_t n_keys, bool is_seq) {
    for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
      const int64_t bn = n_keys - j0 < kTile ? n_keys - j0 : kTile;
      __syncthreads();
      stage_rows(Ks, kbase, ks[2], ks[3], j0, bn, p.D);
      stage_rows(Vs, vbase, vs[2], vs[3], j0, bn, p.D);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t i = i0 + warp * kRowsPerWarp + r;
        if (i >= p.Nq) continue;
        for (int64_t jj = 0; jj < bn; ++jj) {
          float s = lane_dot(qr[r], Ks + jj * p.D, p.D, lane);
          if (is_seq) s = mask_seq_score(p, b, h, i, j0 + jj, s);
          if (s == kNegInf) continue;  // the same on every lane
          const float m_new = fmaxf(m[r], s);
          const float alpha = expf(m[r] - m_new);  // 0 when m was -inf
          const float pr = expf(s - m_new);
          l[r] = l[r] * alpha + pr;
          m[r] = m_new;
          const float* vrow = Vs + jj * p.D;
#pragma unroll
          for (int e = 0; e < kMaxPerLane; ++e) {
            const int64_t d = lane + 32 * e;
            acc[r][e] = acc[r][e] * alpha + (d < p.D ? pr * vrow[d] : 0.f);
          }
        }
      }
    }
  };

  if (p.P > 0) {
    const int64_t e = prefix_entry(p, b);
    attend(static_cast<const T*>(p.prefix_k.ptr) + e * p.prefix_k.s[0] + g * p.prefix_k.s[1],
           p.prefix_k.s,
           static_cast<const T*>(p.prefix_v.ptr) + e * p.prefix_v.s[0] + g * p.prefix_v.s[1],
           p.prefix_v.s, p.P, false);
  }
  attend(static_cast<const T*>(p.k.ptr) + b * p.k.s[0] + g * p.k.s[1], p.k.s,
         static_cast<const T*>(p.v.ptr) + b * p.v.s[0] + g * p.v.s[1], p.v.s,
         key_end(p, i0, kRowsPerBlock), true);

  T* out = static_cast<T*>(p.out.ptr);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= p.Nq) continue;
    // l == 0 only when no key was visible (P == 0): out 0, lse -inf
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
    T* orow = out + b * p.out.s[0] + h * p.out.s[1] + i * p.out.s[2];
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

// Delta = rowsum(dout * out) - dlse: a warp per query row.
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(BwdParams p, float* delta) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.Hq * p.Nq) return;
  const int64_t i = row % p.Nq, bh = row / p.Nq, b = bh / p.Hq, h = bh % p.Hq;
  const T* dor = static_cast<const T*>(p.dout.ptr) + b * p.dout.s[0] + h * p.dout.s[1] + i * p.dout.s[2];
  const T* orow =
      static_cast<const T*>(p.out_fwd.ptr) + b * p.out_fwd.s[0] + h * p.out_fwd.s[1] + i * p.out_fwd.s[2];
  float acc = 0.f;
  for (int64_t d = lane; d < p.D; d += 32)
    acc += to_float(dor[d * p.dout.s[3]]) * to_float(orow[d * p.out_fwd.s[3]]);
  acc = warp_sum(acc);
  if (lane == 0) delta[row] = acc - (p.dlse != nullptr ? p.dlse[row] : 0.f);
}

// dQ: a block per (16 query rows, b * Hq), like the forward.
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_kernel(BwdParams p, const float* delta) {
  extern __shared__ float smem[];
  float* Ks = smem;
  float* Vs = smem + kTile * p.D;
  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hkv);
  const int64_t i0 = int64_t(blockIdx.x) * kRowsPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float qr[kRowsPerWarp][kMaxPerLane], dor[kRowsPerWarp][kMaxPerLane], dq[kRowsPerWarp][kMaxPerLane];
  float lse[kRowsPerWarp], dl[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    const int64_t ic = i < p.Nq ? i : 0;
    load_lane(qr[r], static_cast<const T*>(p.q.ptr) + b * p.q.s[0] + h * p.q.s[1] + ic * p.q.s[2],
              p.q.s[3], p.D, lane, p.scale);
    load_lane(dor[r],
              static_cast<const T*>(p.dout.ptr) + b * p.dout.s[0] + h * p.dout.s[1] + ic * p.dout.s[2],
              p.dout.s[3], p.D, lane, 1.f);
    lse[r] = p.lse_fwd[bh * p.Nq + ic];
    dl[r] = delta[bh * p.Nq + ic];
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) dq[r][e] = 0.f;
  }

  auto visit = [&](const T* kbase, const int64_t* ks, const T* vbase, const int64_t* vs,
                   int64_t n_keys, bool is_seq) {
    for (int64_t j0 = 0; j0 < n_keys; j0 += kTile) {
      const int64_t bn = n_keys - j0 < kTile ? n_keys - j0 : kTile;
      __syncthreads();
      stage_rows(Ks, kbase, ks[2], ks[3], j0, bn, p.D);
      stage_rows(Vs, vbase, vs[2], vs[3], j0, bn, p.D);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const int64_t i = i0 + warp * kRowsPerWarp + r;
        if (i >= p.Nq || lse[r] == kNegInf) continue;
        for (int64_t jj = 0; jj < bn; ++jj) {
          float s = lane_dot(qr[r], Ks + jj * p.D, p.D, lane);
          if (is_seq) s = mask_seq_score(p, b, h, i, j0 + jj, s);
          if (s == kNegInf) continue;
          const float pr = expf(s - lse[r]);
          const float dp = lane_dot(dor[r], Vs + jj * p.D, p.D, lane);
          const float ds = pr * (dp - dl[r]);
          const float* krow = Ks + jj * p.D;
#pragma unroll
          for (int e = 0; e < kMaxPerLane; ++e) {
            const int64_t d = lane + 32 * e;
            if (d < p.D) dq[r][e] += ds * krow[d];
          }
        }
      }
    }
  };

  if (p.P > 0) {
    const int64_t e = prefix_entry(p, b);
    visit(static_cast<const T*>(p.prefix_k.ptr) + e * p.prefix_k.s[0] + g * p.prefix_k.s[1],
          p.prefix_k.s,
          static_cast<const T*>(p.prefix_v.ptr) + e * p.prefix_v.s[0] + g * p.prefix_v.s[1],
          p.prefix_v.s, p.P, false);
  }
  visit(static_cast<const T*>(p.k.ptr) + b * p.k.s[0] + g * p.k.s[1], p.k.s,
        static_cast<const T*>(p.v.ptr) + b * p.v.s[0] + g * p.v.s[1], p.v.s,
        key_end(p, i0, kRowsPerBlock), true);

  T* dqp = static_cast<T*>(p.dq.ptr);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = i0 + warp * kRowsPerWarp + r;
    if (i >= p.Nq) continue;
    T* row = dqp + b * p.dq.s[0] + h * p.dq.s[1] + i * p.dq.s[2];
#pragma unroll
    for (int e = 0; e < kMaxPerLane; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < p.D) row[d * p.dq.s[3]] = from_float<T>(dq[r][e] * p.scale);
    }
  }
}

// Adds to the warp's key rows' dK (unscaled) and dV the share of query rows [m0, m0 + bm) of
// (b, h), staged in shared memory (Qs unscaled, DOs, and per-row lse / Delta).
__device__ __forceinline__ void accumulate_key_grads(
    const FwdParams& p, int64_t b, int64_t h, int64_t j_first, bool is_seq, int lane,
    const float (&kr)[kKeysPerWarp][kMaxPerLane], const float (&vr)[kKeysPerWarp][kMaxPerLane],
    float (&dk)[kKeysPerWarp][kMaxPerLane], float (&dv)[kKeysPerWarp][kMaxPerLane], int64_t n_keys,
    const float* Qs, const float* DOs, const float* lse_s, const float* delta_s, int64_t m0, int64_t bm) {
  for (int64_t ii = 0; ii < bm; ++ii) {
    const float L = lse_s[ii];
    if (L == kNegInf) continue;
    const int64_t i = m0 + ii;
    const float* qrow = Qs + ii * p.D;
    const float* dorow = DOs + ii * p.D;
#pragma unroll
    for (int kk = 0; kk < kKeysPerWarp; ++kk) {
      const int64_t j = j_first + kk;
      if (j >= n_keys) continue;
      float s = lane_dot(kr[kk], qrow, p.D, lane) * p.scale;
      if (is_seq) s = mask_seq_score(p, b, h, i, j, s);
      if (s == kNegInf) continue;
      const float pr = expf(s - L);
      const float dp = lane_dot(vr[kk], dorow, p.D, lane);
      const float ds = pr * (dp - delta_s[ii]);
#pragma unroll
      for (int e = 0; e < kMaxPerLane; ++e) {
        const int64_t d = lane + 32 * e;
        if (d < p.D) {
          dv[kk][e] += pr * dorow[d];
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
  stage_rows(Qs, static_cast<const T*>(p.q.ptr) + b * p.q.s[0] + h * p.q.s[1], p.q.s[2], p.q.s[3], m0, bm,
             p.D);
  stage_rows(DOs, static_cast<const T*>(p.dout.ptr) + b * p.dout.s[0] + h * p.dout.s[1], p.dout.s[2],
             p.dout.s[3], m0, bm, p.D);
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

// dK / dV for the sequence: a block per (8 keys, b * Hkv), looping over the group's query heads.
template <typename T>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(BwdParams p, const float* delta) {
  extern __shared__ float smem[];
  float* Qs = smem;
  float* DOs = Qs + kTile * p.D;
  float* lse_s = DOs + kTile * p.D;
  float* delta_s = lse_s + kTile;
  const int64_t bg = blockIdx.y, b = bg / p.Hkv, g = bg % p.Hkv, group = p.Hq / p.Hkv;
  const int64_t j0 = int64_t(blockIdx.x) * kKeysPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j_first = j0 + warp * kKeysPerWarp;

  float kr[kKeysPerWarp][kMaxPerLane], vr[kKeysPerWarp][kMaxPerLane];
  float dk[kKeysPerWarp][kMaxPerLane] = {}, dv[kKeysPerWarp][kMaxPerLane] = {};
  load_key_rows(kr, static_cast<const T*>(p.k.ptr) + b * p.k.s[0] + g * p.k.s[1], p.k.s, j_first, p.Nk, p.D,
                lane);
  load_key_rows(vr, static_cast<const T*>(p.v.ptr) + b * p.v.s[0] + g * p.v.s[1], p.v.s, j_first, p.Nk, p.D,
                lane);

  // causal: the first query that sees key j0 is j0 - (Nk - Nq)
  int64_t m_lo = p.causal ? j0 - (p.Nk - p.Nq) : 0;
  if (m_lo < 0) m_lo = 0;
  for (int64_t h = g * group; h < (g + 1) * group; ++h) {
    for (int64_t m0 = m_lo; m0 < p.Nq; m0 += kTile) {
      const int64_t bm = p.Nq - m0 < kTile ? p.Nq - m0 : kTile;
      __syncthreads();
      stage_queries<T>(p, delta, b, h, m0, bm, Qs, DOs, lse_s, delta_s);
      __syncthreads();
      accumulate_key_grads(p, b, h, j_first, true, lane, kr, vr, dk, dv, p.Nk, Qs, DOs, lse_s, delta_s, m0, bm);
    }
  }
  store_key_rows(dk, static_cast<T*>(p.dk.ptr) + b * p.dk.s[0] + g * p.dk.s[1], p.dk.s, j_first, p.Nk, p.D, lane,
                 p.scale);
  store_key_rows(dv, static_cast<T*>(p.dv.ptr) + b * p.dv.s[0] + g * p.dv.s[1], p.dv.s, j_first, p.Nk, p.D, lane,
                 1.f);
}

__device__ __forceinline__ int64_t ceil_div_device(int64_t a, int64_t b) { return (a + b - 1) / b; }

// dprefix: a block per (8 prefix keys, entry t * Hkv, chunk c), where the chunks split the
// (row using t, query tile) pairs, so that few rows still fill the GPU; per pair it loops over
// the group's query heads. Writes float32 partials [c, t, g] when chunks > 1 (the host sums
// them in chunk order), else the gradient itself.
template <typename T>
__global__ void __launch_bounds__(kThreads) dprefix_kernel(BwdParams p, BwdWorkspace ws) {
  extern __shared__ float smem[];
  float* Qs = smem;
  float* DOs = Qs + kTile * p.D;
  float* lse_s = DOs + kTile * p.D;
  float* delta_s = lse_s + kTile;
  const int64_t tg = blockIdx.y, t = tg / p.Hkv, g = tg % p.Hkv, group = p.Hq / p.Hkv;
  const int64_t c = blockIdx.z;
  const int64_t j0 = int64_t(blockIdx.x) * kKeysPerBlock;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j_first = j0 + warp * kKeysPerWarp;

  float kr[kKeysPerWarp][kMaxPerLane], vr[kKeysPerWarp][kMaxPerLane];
  float dk[kKeysPerWarp][kMaxPerLane] = {}, dv[kKeysPerWarp][kMaxPerLane] = {};
  load_key_rows(kr, static_cast<const T*>(p.prefix_k.ptr) + t * p.prefix_k.s[0] + g * p.prefix_k.s[1],
                p.prefix_k.s, j_first, p.P, p.D, lane);
  load_key_rows(vr, static_cast<const T*>(p.prefix_v.ptr) + t * p.prefix_v.s[0] + g * p.prefix_v.s[1],
                p.prefix_v.s, j_first, p.P, p.D, lane);

  const int64_t first = ws.row_start[t], n_rows = ws.row_start[t + 1] - first;
  const int64_t n_tiles = ceil_div_device(p.Nq, kTile), n_items = n_rows * n_tiles;
  const int64_t item_end = (c + 1) * n_items / ws.chunks;
  for (int64_t item = c * n_items / ws.chunks; item < item_end; ++item) {
    const int64_t b = ws.rows[first + item / n_tiles];
    const int64_t m0 = (item % n_tiles) * kTile;
    const int64_t bm = p.Nq - m0 < kTile ? p.Nq - m0 : kTile;
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      __syncthreads();
      stage_queries<T>(p, ws.delta, b, h, m0, bm, Qs, DOs, lse_s, delta_s);
      __syncthreads();
      accumulate_key_grads(p, b, h, j_first, false, lane, kr, vr, dk, dv, p.P, Qs, DOs, lse_s, delta_s, m0, bm);
    }
  }
  if (ws.chunks == 1) {
    store_key_rows(dk, static_cast<T*>(p.dprefix_k.ptr) + t * p.dprefix_k.s[0] + g * p.dprefix_k.s[1],
                   p.dprefix_k.s, j_first, p.P, p.D, lane, p.scale);
    store_key_rows(dv, static_cast<T*>(p.dprefix_v.ptr) + t * p.dprefix_v.s[0] + g * p.dprefix_v.s[1],
                   p.dprefix_v.s, j_first, p.P, p.D, lane, 1.f);
  } else {
    const int64_t s[4] = {0, 0, p.D, 1};  // a contiguous [P, D] slab of the partials
    const int64_t slab = ((c * p.T + t) * p.Hkv + g) * p.P * p.D;
    store_key_rows(dk, ws.dprefix_k_partial + slab, s, j_first, p.P, p.D, lane, p.scale);
    store_key_rows(dv, ws.dprefix_v_partial + slab, s, j_first, p.P, p.D, lane, 1.f);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t tile_smem(int64_t D) { return (2 * kTile * D + 2 * kTile) * sizeof(float); }

template <typename T>
void set_smem(const void* kernel, size_t bytes) {
  if (bytes > 48 * 1024) cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

template <typename T>
void forward_impl(const FwdParams& p, cudaStream_t stream) {
  const dim3 grid(unsigned(ceil_div(p.Nq, kRowsPerBlock)), unsigned(p.B * p.Hq));
  const size_t smem = tile_smem(p.D);
  set_smem<T>(reinterpret_cast<const void*>(fwd_kernel<T>), smem);
  fwd_kernel<T><<<grid, kThreads, smem, stream>>>(p);
}

template <typename T>
void backward_impl(const BwdParams& p, const BwdWorkspace& ws, cudaStream_t stream) {
  const size_t smem = tile_smem(p.D);
  delta_kernel<T><<<unsigned(ceil_div(p.B * p.Hq * p.Nq, kWarps)), kThreads, 0, stream>>>(p, ws.delta);
  if (p.need_dq) {
    set_smem<T>(reinterpret_cast<const void*>(dq_kernel<T>), smem);
    dq_kernel<T><<<dim3(unsigned(ceil_div(p.Nq, kRowsPerBlock)), unsigned(p.B * p.Hq)), kThreads, smem, stream>>>(
        p, ws.delta);
  }
  if (p.need_dkv && p.Nk > 0) {
    set_smem<T>(reinterpret_cast<const void*>(dkdv_kernel<T>), smem);
    dkdv_kernel<T><<<dim3(unsigned(ceil_div(p.Nk, kKeysPerBlock)), unsigned(p.B * p.Hkv)), kThreads, smem,
                     stream>>>(p, ws.delta);
  }
  if (p.need_dprefix && p.P > 0) {
    set_smem<T>(reinterpret_cast<const void*>(dprefix_kernel<T>), smem);
    dprefix_kernel<T><<<dim3(unsigned(ceil_div(p.P, kKeysPerBlock)), unsigned(p.T * p.Hkv), unsigned(ws.chunks)),
                        kThreads, smem, stream>>>(p, ws);
  }
}

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(__half{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
  }
}

}  // namespace

int64_t dprefix_chunks(const FwdParams& p, int sm_count) {
  if (p.P == 0) return 1;
  const bool per_row = p.prefix_index == nullptr && p.T > 1;
  // (row, query tile) pairs of one entry, at most: a bank entry may be used by every row
  const int64_t max_items = (per_row ? 1 : p.B) * ceil_div(p.Nq, kTile);
  const int64_t blocks = ceil_div(p.P, kKeysPerBlock) * p.T * p.Hkv;
  int64_t chunks = ceil_div(2 * int64_t(sm_count > 0 ? sm_count : 1), blocks);
  if (chunks > max_items) chunks = max_items;
  return chunks < 1 ? 1 : chunks;
}

void forward(const FwdParams& params, void* stream) {
  if (params.B * params.Hq * params.Nq == 0) return;
  dispatch_dtype(params.dtype, [&](auto tag) {
    forward_impl<decltype(tag)>(params, static_cast<cudaStream_t>(stream));
  });
}

void backward(const BwdParams& params, const BwdWorkspace& ws, void* stream) {
  if (params.B * params.Hq * params.Nq == 0) return;
  dispatch_dtype(params.dtype, [&](auto tag) {
    backward_impl<decltype(tag)>(params, ws, static_cast<cudaStream_t>(stream));
  });
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
