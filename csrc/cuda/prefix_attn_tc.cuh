// The tensor-core kernels (16-bit inputs, head dims that are multiples of 16 up to 256): tile
// configurations, the dropout mask of an accumulator fragment, and the entry points the
// dispatcher in prefix_attn_kernels.cu calls. Kernels live in prefix_attn_tc_fwd.cu (forward)
// and prefix_attn_tc_bwd.cu (dQ, dK/dV, dprefix); fp32 inputs and other head dims take the SIMT
// kernels.
//
// Every kernel runs 4 warps, each owning 16 rows of the tile it iterates against (queries in the
// forward and dQ, keys in dK/dV and dprefix). Flash-attention 2's split: the forward keeps the
// online softmax in registers; the backward recomputes P from the forward's lse, with dQ in a
// kernel of its own (one writer per dQ element, no atomics), so every gradient is deterministic.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../prefix_attn_dropout.h"
#include "../prefix_attn_params.h"
#include "prefix_attn_cuda.h"
#include "prefix_attn_mma.cuh"
#include "prefix_attn_tiles.cuh"

namespace prefix_attn::cuda::tc {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = 16;  // an MMA's M

// The head dims are bucketed: a head dim D runs the kernel of the smallest bucket kD >= D, whose
// tiles hold zeros in columns D..kD (load_tile fills them), adding nothing to any product.
constexpr int kHeadDimBuckets[] = {32, 64, 96, 128, 256};

// Tile sizes per head-dim bucket, chosen so that no kernel spills on sm_80 / sm_90 (make
// cuda-check): the accumulators of a warp's 16 rows take kD / 2 registers per thread for one
// [16 x kD] float tile, and the score tiles 8 * (columns / 16).
template <int kD>
struct Tiles {
  // forward: 64 queries per block; keys per tile
  static constexpr int kFwdQueries = 64;
  static constexpr int kFwdKeys = kD <= 128 ? 64 : 32;
  // dQ: 64 queries per block; keys per tile
  static constexpr int kDqQueries = 64;
  static constexpr int kDqKeys = kD <= 64 ? 64 : 32;
  // dK/dV and dprefix: the four warps split the block's keys 16 rows each, and for kD = 256 also
  // the head dim in two halves (dK and dV of 16 x 256 would not fit in registers); queries per tile
  static constexpr int kKvSplit = kD <= 128 ? 1 : 2;
  static constexpr int kKvKeys = kWarps / kKvSplit * kWarpRows;
  static constexpr int kKvQueries = kD <= 64 ? 64 : kD <= 128 ? 32 : 16;
};

// Shared memory of each kernel, in bytes (the layouts are spelt out in the kernels).
template <int kD>
constexpr size_t fwd_smem_bytes() {
  return size_t(Tiles<kD>::kFwdQueries + 4 * Tiles<kD>::kFwdKeys) * mma::pitch<kD>() * 2;
}
template <int kD>
constexpr size_t dq_smem_bytes() {
  return size_t(2 * Tiles<kD>::kDqQueries + 4 * Tiles<kD>::kDqKeys) * mma::pitch<kD>() * 2;
}
template <int kD>
constexpr size_t kv_smem_bytes() {
  return size_t(2 * Tiles<kD>::kKvKeys + 4 * Tiles<kD>::kKvQueries) * mma::pitch<kD>() * 2 +
         4 * size_t(Tiles<kD>::kKvQueries) * sizeof(float);
}

// Whether the tensor-core kernels run this call.
inline bool supports(const FwdParams& p) {
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && p.D % 16 == 0 && p.D <= 256;
}

// Calls f(std::integral_constant<int, kD>{}) for D's bucket (D <= 256).
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  if (D <= 32) return f(std::integral_constant<int, 32>{});
  if (D <= 64) return f(std::integral_constant<int, 64>{});
  if (D <= 96) return f(std::integral_constant<int, 96>{});
  if (D <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

// Dynamic shared memory of the forward, dQ and dK/dV (= dprefix) kernels for this call's bucket.
// The dispatcher compares them with the device's opt-in limit: dQ at kD = 256 (135 KB) exceeds
// the 99 KB of sm_86 / sm_89 / sm_120 and runs the SIMT dQ kernel there.
size_t fwd_smem(const FwdParams& p);
size_t dq_smem(const FwdParams& p);
size_t kv_smem(const FwdParams& p);

// Queries per (row, query tile) item of the dprefix kernel, and prefix keys per block.
int64_t dprefix_query_tile(const FwdParams& p);
int64_t dprefix_key_tile(const FwdParams& p);

void forward(const FwdParams& p, cudaStream_t stream);
void dq(const BwdParams& p, const float* delta, cudaStream_t stream);
void dkdv(const BwdParams& p, const float* delta, cudaStream_t stream);
void dprefix(const BwdParams& p, const BwdWorkspace& ws, cudaStream_t stream);

// --------------------------------------------------------------------------- padded keys
//
// A key hidden by key_padding_mask gets probability 0, but its K and V may hold anything
// (SPEC.md, "Padded keys"), and 0 * inf or 0 * NaN in a product is NaN: the forward and dQ
// kernels zero a padded key's rows of a key tile once it has landed, before any product reads
// them. Thread r looks after key r of the tile (tiles have at most kThreads keys).

// Whether this thread's key of tile kt is padded.
__device__ __forceinline__ bool tile_row_padded(const FwdParams& p, const KeyTile& kt, int64_t b) {
  const int r = threadIdx.x;
  return !kt.is_prefix && r < kt.n && key_padded(p, b, kt.j0 + r);
}

// --------------------------------------------------------------------------- dropout
//
// The keep bits of a [16 x 8*kN] accumulator fragment, bit 4n + e for element acc[n][e]. The
// stream (prefix_attn_dropout.h) gives four key columns per Philox call; each call is made once
// per warp and its words handed to the lanes that hold those columns.

// The score of accumulator element (n, e) of a query-row tile (forward, dQ), scaled and masked:
// -inf past the tile's keys, and the sequence masks on tiles that need them. Rows past Nq are
// never stored, and read no mask (it would be out of bounds). `edge`: the tile is masked or
// partial; interior tiles only scale.
__device__ __forceinline__ float query_row_score(const FwdParams& p, const KeyTile& kt, bool edge, int n, int e,
                                                 int tig, const int64_t (&row_i)[2], int64_t b, int64_t h,
                                                 float acc) {
  const float x = acc * p.scale;
  if (!edge) return x;
  const int c = n * 8 + 2 * tig + e % 2;
  const int64_t i = row_i[e / 2];
  if (c >= kt.n) return kNegInf;
  if (!kt.masked) return x;
  return i < p.Nq ? mask_seq_score(p, b, h, i, kt.j0 + c, x) : kNegInf;
}

// Rows are queries, columns keys (forward, dQ): row 0 of the fragment is query row_i[0], row 8
// is row_i[1] (grp and grp + 8 of this lane), column c is key col0 + c of its segment (col0 a
// multiple of 4). Lanes tig and tig ^ 1 hold the two halves of the same four columns, for the
// same two rows: each computes one row's call (tig & 1 picks which) and passes the other half.
template <int kN>
__device__ __forceinline__ uint32_t dropout_bits_query_rows(const DropoutParams& d, bool is_prefix, int64_t bh,
                                                            const int64_t (&row_i)[2], int64_t col0) {
  const int tig = threadIdx.x % 4, own = tig & 1;
  uint32_t bits = 0;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    uint32_t w[4];
    dropout_words4(d, is_prefix, bh, own ? row_i[1] : row_i[0], (col0 >> 2) + 2 * n + tig / 2, w);
    // this lane's columns 2tig + e are words 2(tig & 1) + e; the others go to the partner
    // (selects on values, not a register index, keep w out of local memory)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const uint32_t lo = w[e], hi = w[2 + e];
      const uint32_t mine = own ? hi : lo;
      const uint32_t theirs = __shfl_xor_sync(0xffffffffu, own ? lo : hi, 1);
      bits |= uint32_t(mine >= d.threshold) << (4 * n + 2 * own + e);
      bits |= uint32_t(theirs >= d.threshold) << (4 * n + 2 * (1 - own) + e);
    }
  }
  return bits;
}

// Rows are keys, columns queries (dK/dV, dprefix): row 0 of the fragment is key key0 + grp,
// row 8 key key0 + grp + 8 (key0 a multiple of 4), column c is query q0 + c. The four keys of a
// Philox call sit in the four lanes r = grp % 4 (lane bits 2-3), which hold the same columns:
// lane r makes the call of its element r (row half r / 2, column r % 2), and the four lanes swap
// words as a 4x4 transpose (lane r needs word r of every call), with three shuffles.
template <int kN>
__device__ __forceinline__ uint32_t dropout_bits_key_rows(const DropoutParams& d, bool is_prefix, int64_t bh,
                                                          int64_t key0, int64_t q0) {
  const int lane = threadIdx.x % 32, grp = lane / 4, tig = lane % 4, r = grp % 4;
  const int64_t group4 = (key0 + (grp - r) + 8 * (r / 2)) >> 2;
  uint32_t bits = 0;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
    uint32_t w[4];
    dropout_words4(d, is_prefix, bh, q0 + 8 * n + 2 * tig + r % 2, group4, w);
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      // with lane r ^ x (x = 0: ourselves) swap words: it gets word r ^ x of our call, we get
      // word r of its call, the one of our element k = r ^ x
      const int k = r ^ x;
      const uint32_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
      const uint32_t send = k == 0 ? w0 : k == 1 ? w1 : k == 2 ? w2 : w3;
      const uint32_t got = x == 0 ? send : __shfl_xor_sync(0xffffffffu, send, x << 2);
      bits |= uint32_t(got >= d.threshold) << (4 * n + k);
    }
  }
  return bits;
}

// acc[n][e] *= scale where bit 4n + e is set, 0 elsewhere.
template <int kN>
__device__ __forceinline__ void apply_dropout(float (&acc)[kN][4], uint32_t bits, float scale) {
#pragma unroll
  for (int n = 0; n < kN; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] *= (bits >> (4 * n + e)) & 1u ? scale : 0.f;
}

// to_a_fragments of acc * M * scale (M: the keep bits), leaving acc as it is (the backward
// needs both the dropped and the un-dropped probabilities).
template <typename T, int kN>
__device__ __forceinline__ void dropped_a_fragments(uint32_t (&af)[kN / 2][4], const float (&acc)[kN][4],
                                                    uint32_t bits, float scale) {
  auto at = [&](int n, int e) { return (bits >> (4 * n + e)) & 1u ? acc[n][e] * scale : 0.f; };
#pragma unroll
  for (int j = 0; j < kN / 2; ++j) {
    af[j][0] = mma::pack2<T>(at(2 * j, 0), at(2 * j, 1));
    af[j][1] = mma::pack2<T>(at(2 * j, 2), at(2 * j, 3));
    af[j][2] = mma::pack2<T>(at(2 * j + 1, 0), at(2 * j + 1, 1));
    af[j][3] = mma::pack2<T>(at(2 * j + 1, 2), at(2 * j + 1, 3));
  }
}

}  // namespace prefix_attn::cuda::tc
