// Which keys a block of queries visits, and which queries a block of keys is visited by: the
// bottom-right causal bounds, the sequence masks, and the walk over [prefix tiles ; sequence
// tiles], written once for every CUDA kernel (the SIMT and the tensor-core ones alike).
//
//   key index      0 ........ P-1 | 0 ................................. Nk-1
//                  prefix tiles   | sequence tiles, up to the causal end of the query block
//   query i sees   every one      | key j iff j <= i + (Nk - Nq) (causal), key_padding_mask[b, j],
//                                 |   attn_mask[b, h, i, j] (bool, or added to the score)
//
// Torch-free: CUDA headers and our params header only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../prefix_attn_params.h"

namespace prefix_attn::cuda {

constexpr float kNegInf = -INFINITY;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Conversions by name: torch builds CUDA sources with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones (make cuda-check does too).
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
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Exclusive end of the sequence keys any query in [i0, i0 + n) can see.
__host__ __device__ __forceinline__ int64_t seq_key_end(const FwdParams& p, int64_t i0, int64_t n) {
  if (!p.causal) return p.Nk;
  const int64_t e = i0 + n + (p.Nk - p.Nq);
  return e < 0 ? 0 : (e > p.Nk ? p.Nk : e);
}

// The first query that sees sequence key j (causal), clamped to [0, Nq].
__host__ __device__ __forceinline__ int64_t first_query_seeing(const FwdParams& p, int64_t j) {
  if (!p.causal) return 0;
  const int64_t i = j - (p.Nk - p.Nq);
  return i < 0 ? 0 : (i > p.Nq ? p.Nq : i);
}

// Whether every (query, key) pair of queries [i0, i0 + ni) x sequence keys [j0, j0 + nj) passes
// every mask, so that a tile can skip the per-element test.
__host__ __device__ __forceinline__ bool seq_block_unmasked(const FwdParams& p, int64_t i0, int64_t j0,
                                                            int64_t nj) {
  if (p.key_padding_mask != nullptr || p.mask_kind != MaskKind::kNone) return false;
  return !p.causal || j0 + nj - 1 <= i0 + (p.Nk - p.Nq);
}

// Whether sequence key j of row b is hidden by key_padding_mask.
__host__ __device__ __forceinline__ bool key_padded(const FwdParams& p, int64_t b, int64_t j) {
  return p.key_padding_mask != nullptr && !p.key_padding_mask[b * p.kpm_s[0] + j * p.kpm_s[1]];
}

// Score of sequence key j for query i of (b, h) after the masks: -inf when hidden.
__device__ __forceinline__ float mask_seq_score(const FwdParams& p, int64_t b, int64_t h, int64_t i, int64_t j,
                                                float s) {
  if (p.causal && j > i + (p.Nk - p.Nq)) return kNegInf;
  if (key_padded(p, b, j)) return kNegInf;
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t off =
        b * p.attn_mask.s[0] + h * p.attn_mask.s[1] + i * p.attn_mask.s[2] + j * p.attn_mask.s[3];
    if (p.mask_kind == MaskKind::kBool) {
      if (!static_cast<const bool*>(p.attn_mask.ptr)[off]) return kNegInf;
    } else {
      s += static_cast<const float*>(p.attn_mask.ptr)[off];
    }
  }
  return s;
}

// One tile of keys: `n` keys from index j0 of the prefix or of the sequence. j0 is a multiple of
// the tile size within its segment (so of 4: the dropout stream's Philox calls cover four-aligned
// columns of one segment). `masked`: sequence keys some query of the block may not see, so the
// kernel must test each (query, key) pair; prefix tiles never are.
struct KeyTile {
  bool is_prefix;
  bool masked;
  int64_t j0;
  int n;
};

// The key tiles of size `tile` that queries [i0, i0 + rows) visit, prefix first:
//   for (int64_t t = 0; t < walk.size(); ++t) { const KeyTile kt = walk[t]; ... }
// Used by the forward and the dQ kernels, SIMT and tensor-core.
struct KeyTileWalk {
  const FwdParams& p;
  int64_t i0;
  int tile;
  int64_t prefix_tiles, seq_tiles;

  __device__ KeyTileWalk(const FwdParams& params, int64_t i0_, int rows, int tile_)
      : p(params), i0(i0_), tile(tile_), prefix_tiles(ceil_div(params.P, tile_)),
        seq_tiles(ceil_div(seq_key_end(params, i0_, rows), tile_)) {}

  __device__ int64_t size() const { return prefix_tiles + seq_tiles; }

  __device__ KeyTile operator[](int64_t t) const {
    KeyTile kt;
    kt.is_prefix = t < prefix_tiles;
    const int64_t len = kt.is_prefix ? p.P : p.Nk;
    kt.j0 = (kt.is_prefix ? t : t - prefix_tiles) * tile;
    kt.n = static_cast<int>(len - kt.j0 < tile ? len - kt.j0 : tile);
    kt.masked = !kt.is_prefix && !seq_block_unmasked(p, i0, kt.j0, tile);
    return kt;
  }
};

// Base pointer of row-head (b, h)'s [rows, D] slab of a strided 4-D tensor.
template <typename T>
__host__ __device__ __forceinline__ const T* slab(const View4& v, int64_t a, int64_t h) {
  return static_cast<const T*>(v.ptr) + a * v.s[0] + h * v.s[1];
}
template <typename T>
__host__ __device__ __forceinline__ T* slab(const MutView4& v, int64_t a, int64_t h) {
  return static_cast<T*>(v.ptr) + a * v.s[0] + h * v.s[1];
}

// The K and V slabs a key tile reads: the prefix entry row b uses, or row b's sequence.
template <typename T>
struct KVSource {
  const T *k, *v;
  int64_t k_rs, k_cs, v_rs, v_cs;  // row and column strides
};

template <typename T>
__device__ __forceinline__ KVSource<T> kv_source(const FwdParams& p, bool is_prefix, int64_t b, int64_t g) {
  if (is_prefix) {
    const int64_t e = p.prefix_entry(b);
    return {slab<T>(p.prefix_k, e, g), slab<T>(p.prefix_v, e, g), p.prefix_k.s[2], p.prefix_k.s[3],
            p.prefix_v.s[2], p.prefix_v.s[3]};
  }
  return {slab<T>(p.k, b, g), slab<T>(p.v, b, g), p.k.s[2], p.k.s[3], p.v.s[2], p.v.s[3]};
}

}  // namespace prefix_attn::cuda
