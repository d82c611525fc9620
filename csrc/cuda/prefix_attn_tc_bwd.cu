// The tensor-core backward. P is rebuilt from the forward's lse, and with Delta = rowsum(dO * O)
// - dlse (delta_kernel, prefix_attn_kernels.cu) and the dropout keep mask M:
//   dP = (dO Vᵀ) * M * dropout.scale     dS = P * (dP - Delta)
//   dQ = scale * dS K     dK = scale * dSᵀ Q     dV = (P * M * dropout.scale)ᵀ dO
// Two kernels, so that each gradient element has one writer and no atomics are needed:
//   dq_kernel   a block per (b * Hq, 64 queries), a warp per 16 queries, walking the key tiles
//               of KeyTileWalk like the forward;
//   kv_kernel   a block per key tile of (b, KV head g) (dK / dV) or of (bank entry t, g) (dprefix),
//               a warp per 16 keys, walking the query tiles of the KV group's heads (and, for the
//               prefix, of every row using the entry, split into chunks; see QueryTileCursor).
// A row with lse = -inf (no visible key) reads lse as +inf, so that its P is exp(-inf) = 0.
#include "prefix_attn_tc.cuh"
#include "prefix_attn_tiles.cuh"

namespace prefix_attn::cuda::tc {
namespace {

// lse as the backward reads it: a row that saw no key gets +inf, so every P of it is 0.
__device__ __forceinline__ float lse_for_p(float lse) { return lse == kNegInf ? INFINITY : lse; }

// ------------------------------------------------------------------------------------------ dQ
//
// Shared memory: Q [64] | dO [64] | K [2][kBc] | V [2][kBc], double-buffered as in the forward.
template <typename T, int kD, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1) dq_kernel(BwdParams p, const float* delta) {
  constexpr int kBr = Tiles<kD>::kDqQueries, kBc = Tiles<kD>::kDqKeys, kPitch = mma::pitch<kD>();
  constexpr int kNS = kBc / 8, kNO = kD / 8;
  static_assert(kBr == kWarps * kWarpRows, "a warp per 16 queries");
  static_assert(kNS * 4 <= 32, "a tile's dropout bits fit in a word");
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* DOs = Qs + kBr * kPitch;
  T* Ks = DOs + kBr * kPitch;
  T* Vs = Ks + 2 * kBc * kPitch;

  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hkv);
  // Last query tiles first: under causal masking they visit the most key tiles, and starting
  // them first keeps them out of the last wave.
  const int64_t i0 = int64_t(gridDim.y - 1 - blockIdx.y) * kBr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 4, tig = lane % 4;
  const int64_t row_i[2] = {i0 + warp * kWarpRows + grp, i0 + warp * kWarpRows + grp + 8};
  float lse[2], dlt[2];
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const bool in = row_i[rh] < p.Nq;
    lse[rh] = in ? lse_for_p(p.lse_fwd[bh * p.Nq + row_i[rh]]) : INFINITY;
    dlt[rh] = in ? delta[bh * p.Nq + row_i[rh]] : 0.f;
  }

  const KeyTileWalk walk(p, i0, kBr, kBc);
  auto load_kv = [&](int64_t t, int stage) {
    const KeyTile kt = walk[t];
    const KVSource<T> src = kv_source<T>(p, kt.is_prefix, b, g);
    mma::load_tile<T, kBc, kD, kThreads>(Ks + stage * kBc * kPitch, src.k, src.k_rs, src.k_cs, kt.j0, kt.n, p.D);
    mma::load_tile<T, kBc, kD, kThreads>(Vs + stage * kBc * kPitch, src.v, src.v_rs, src.v_cs, kt.j0, kt.n, p.D);
  };
  mma::load_tile<T, kBr, kD, kThreads>(Qs, slab<T>(p.q, b, h), p.q.s[2], p.q.s[3], i0, p.Nq - i0, p.D);
  mma::load_tile<T, kBr, kD, kThreads>(DOs, slab<T>(p.dout, b, h), p.dout.s[2], p.dout.s[3], i0, p.Nq - i0, p.D);
  if (walk.size() > 0) load_kv(0, 0);
  mma::cp_async_commit();

  float dq[kNO][4];
  mma::zero(dq);
  static_assert(kBc <= kThreads, "a thread per key of a tile");
  for (int64_t t = 0; t < walk.size(); ++t) {
    const KeyTile kt = walk[t];
    const bool padded = tile_row_padded(p, kt, b);  // before the copies: its latency hides behind them
    if (t + 1 < walk.size()) load_kv(t + 1, (t + 1) % 2);  // into the stage iteration t - 1 released
    mma::cp_async_commit();
    mma::cp_async_wait<1>();
    // Tile t, Q and dO visible to every warp. A padded key's V row is zeroed (dP = dO Vᵀ would
    // be NaN, and dS = P * (dP - Delta) = 0 * NaN), and its K row (dQ = dS K: 0 * inf).
    if (__syncthreads_or(padded)) {
      if (padded) {
        mma::zero_tile_row<T, kD>(Ks + (t % 2) * kBc * kPitch, threadIdx.x);
        mma::zero_tile_row<T, kD>(Vs + (t % 2) * kBc * kPitch, threadIdx.x);
      }
      __syncthreads();
    }

    const T* Kt = Ks + (t % 2) * kBc * kPitch;
    const T* Vt = Vs + (t % 2) * kBc * kPitch;
    float s[kNS][4];  // scores, then P, then dS
    mma::zero(s);
    mma::gemm_abt<T, kNS, kD, kPitch>(s, Qs + warp * kWarpRows * kPitch, Kt);
    const bool edge = kt.masked || kt.n < kBc;
#pragma unroll
    for (int n = 0; n < kNS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = __expf(query_row_score(p, kt, edge, n, e, tig, row_i, b, h, s[n][e]) - lse[e / 2]);
      }
    }
    float dp[kNS][4];
    mma::zero(dp);
    mma::gemm_abt<T, kNS, kD, kPitch>(dp, DOs + warp * kWarpRows * kPitch, Vt);
    if constexpr (kDropout) {
      apply_dropout(dp, dropout_bits_query_rows<kNS>(p.dropout, kt.is_prefix, bh, row_i, kt.j0), p.dropout.scale);
    }
#pragma unroll
    for (int n = 0; n < kNS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= dp[n][e] - dlt[e / 2];

    uint32_t dsf[kNS / 2][4];
    mma::to_a_fragments<T, kNS>(dsf, s);
    mma::gemm_pb<T, kNO, kNS / 2, kPitch>(dq, dsf, Kt);  // K as [keys][d]: the reduction runs over keys
    __syncthreads();  // every warp is done with this stage before iteration t + 1 refills it
  }
  mma::cp_async_wait<0>();

  const int64_t r0 = i0 + warp * kWarpRows;
  mma::store_acc<T, kNO>(dq, slab<T>(p.dq, b, h) + r0 * p.dq.s[2], p.dq.s[2], p.dq.s[3], p.Nq - r0, 0, p.D,
                         p.scale);
}

// ----------------------------------------------------------------------------- dK/dV, dprefix

// The query tiles a key block visits, in order, as a cursor (so that tile it + 1 can be
// prefetched while tile it is multiplied): row b, query head h, first query m0.
//   sequence keys from j0, of row b and KV head g: the group's heads, for each query tile from
//     the first query that sees j0;
//   prefix keys of entry t: the (row using t, query tile) items of chunk c, each for every head
//     of the group; rows[row_start[t] ..] are those rows. Items, not rows, are chunked, so that a
//     few rows still fill the GPU; the host sums the chunks' float32 partials in a fixed order.
// Stepping by counters, not by dividing a flat index, keeps 64-bit divisions (and their
// registers) out of the loop.
template <bool kPrefix, int kTile>
struct QueryTileCursor {
  int64_t count;  // tiles in all
  int64_t m0, m_start;
  int b, h, h_first, h_end;
  const int64_t* row;  // prefix: this item's row in rows

  __device__ QueryTileCursor(const BwdParams& p, const BwdWorkspace& ws, int64_t owner, int64_t g, int64_t j0) {
    const int group = static_cast<int>(p.Hq / p.Hkv);
    h = h_first = static_cast<int>(g) * group;
    h_end = h_first + group;
    if constexpr (kPrefix) {
      const int64_t first = ws.row_start[owner], n_m = ceil_div(p.Nq, kTile);
      const int64_t n_items = (ws.row_start[owner + 1] - first) * n_m, c = blockIdx.z;
      const int64_t begin = c * n_items / ws.chunks, end = (c + 1) * n_items / ws.chunks;
      count = (end - begin) * group;
      m_start = 0;
      m0 = (begin % n_m) * kTile;
      row = ws.rows + first + begin / n_m;
      b = count > 0 ? static_cast<int>(*row) : 0;
    } else {
      m_start = m0 = first_query_seeing(p, j0);
      count = ceil_div(p.Nq - m_start, kTile) * group;
      b = static_cast<int>(owner);
      row = nullptr;
    }
  }

  // To the next tile; only while one is left.
  __device__ void next(int64_t Nq) {
    if (++h < h_end) return;
    h = h_first;
    m0 += kTile;
    if (m0 < Nq) return;
    m0 = m_start;
    if constexpr (kPrefix) b = static_cast<int>(*++row);
  }
};

// mma::store_acc into T, or into float when `as_float` (a chunk's partial of the prefix gradient).
template <typename T, int kN>
__device__ __forceinline__ void store_grad(const float (&acc)[kN][4], void* base, bool as_float, int64_t row_stride,
                                           int64_t col_stride, int64_t n_rows, int d0, int64_t D, float mul) {
  if (as_float) {
    mma::store_acc<float, kN>(acc, static_cast<float*>(base), row_stride, col_stride, n_rows, d0, D, mul);
  } else {
    mma::store_acc<T, kN>(acc, static_cast<T*>(base), row_stride, col_stride, n_rows, d0, D, mul);
  }
}

// Shared memory: K [kBk] | V [kBk] | Q [2][kBq] | dO [2][kBq] | lse [2][kBq] | Delta [2][kBq]
// K and V stay for the whole block; the query side is double-buffered.
// The block's kBk keys are split over the warps 16 rows at a time, and with kKvSplit = 2 also by
// head-dim halves: warp w holds keys 16 (w / kKvSplit) and columns kDW (w % kKvSplit) of dK, dV.
// Both halves compute the same 16 x kBq scores (the price of dK, dV fitting in registers).
template <typename T, int kD, bool kDropout, bool kPrefix>
__global__ void __launch_bounds__(kThreads, 1) kv_kernel(BwdParams p, BwdWorkspace ws) {
  constexpr int kSplit = Tiles<kD>::kKvSplit, kBk = Tiles<kD>::kKvKeys, kBq = Tiles<kD>::kKvQueries;
  constexpr int kPitch = mma::pitch<kD>(), kDW = kD / kSplit;
  constexpr int kNS = kBq / 8, kNO = kDW / 8;
  static_assert(kNS * 4 <= 32, "a tile's dropout bits fit in a word");
  extern __shared__ __align__(16) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + kBk * kPitch;
  T* Qs = Vs + kBk * kPitch;
  T* DOs = Qs + 2 * kBq * kPitch;
  float* lse_s = reinterpret_cast<float*>(DOs + 2 * kBq * kPitch);
  float* delta_s = lse_s + 2 * kBq;

  // blockIdx.x: b * Hkv + g (sequence) or t * Hkv + g (prefix); y: key tile; z: chunk (prefix)
  const int64_t owner = blockIdx.x / p.Hkv, g = blockIdx.x % p.Hkv;
  const int64_t j0 = int64_t(blockIdx.y) * kBk;
  const int64_t n_keys = kPrefix ? p.P : p.Nk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 4, tig = lane % 4;
  const int kr0 = (warp / kSplit) * kWarpRows, d0 = (warp % kSplit) * kDW;
  const int64_t key0 = j0 + kr0;  // this warp's first key

  const View4& kview = kPrefix ? p.prefix_k : p.k;
  const View4& vview = kPrefix ? p.prefix_v : p.v;
  mma::load_tile<T, kBk, kD, kThreads>(Ks, slab<T>(kview, owner, g), kview.s[2], kview.s[3], j0, n_keys - j0, p.D);
  mma::load_tile<T, kBk, kD, kThreads>(Vs, slab<T>(vview, owner, g), vview.s[2], vview.s[3], j0, n_keys - j0, p.D);

  QueryTileCursor<kPrefix, kBq> next(p, ws, owner, g, j0);  // the tile to load next
  auto load_q = [&](int stage) {
    const int64_t n = p.Nq - next.m0;
    mma::load_tile<T, kBq, kD, kThreads>(Qs + stage * kBq * kPitch, slab<T>(p.q, next.b, next.h), p.q.s[2],
                                         p.q.s[3], next.m0, n, p.D);
    mma::load_tile<T, kBq, kD, kThreads>(DOs + stage * kBq * kPitch, slab<T>(p.dout, next.b, next.h),
                                         p.dout.s[2], p.dout.s[3], next.m0, n, p.D);
    const int64_t row0 = (next.b * p.Hq + next.h) * p.Nq + next.m0;
    for (int ii = threadIdx.x; ii < kBq; ii += kThreads) {
      lse_s[stage * kBq + ii] = ii < n ? lse_for_p(p.lse_fwd[row0 + ii]) : INFINITY;
      delta_s[stage * kBq + ii] = ii < n ? ws.delta[row0 + ii] : 0.f;
    }
  };
  const int64_t count = next.count;
  if (count > 0) load_q(0);
  mma::cp_async_commit();

  float dk[kNO][4], dv[kNO][4];
  mma::zero(dk);
  mma::zero(dv);
  for (int64_t it = 0; it < count; ++it) {
    const int b = next.b, h = next.h;  // tile it, loaded last iteration
    const int64_t m0 = next.m0;
    if (it + 1 < count) {  // into the stage iteration it - 1 released
      next.next(p.Nq);
      load_q((it + 1) % 2);
    }
    mma::cp_async_commit();
    mma::cp_async_wait<1>();
    __syncthreads();  // query tile it (and K, V) visible to every warp

    const int stage = it % 2;
    const T* Qt = Qs + stage * kBq * kPitch;
    const T* DOt = DOs + stage * kBq * kPitch;
    const float* lse_t = lse_s + stage * kBq;
    const float* delta_t = delta_s + stage * kBq;

    // Sᵀ: rows are this warp's keys, columns the tile's queries.
    float s[kNS][4];
    mma::zero(s);
    mma::gemm_abt<T, kNS, kD, kPitch>(s, Ks + kr0 * kPitch, Qt);
    // dPᵀ = V dOᵀ, right after Sᵀ: the scheduler then hoists its shared-memory loads no further
    // than the first product (hoisted across the softmax, they cost D=256 its registers).
    float dp[kNS][4];
    mma::zero(dp);
    mma::gemm_abt<T, kNS, kD, kPitch>(dp, Vs + kr0 * kPitch, DOt);
    const bool masked = !kPrefix && !seq_block_unmasked(p, m0, j0, kBk);
#pragma unroll
    for (int n = 0; n < kNS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = n * 8 + 2 * tig + e % 2;
        float x = s[n][e] * p.scale;
        if (masked) {  // keys past Nk and queries past Nq are never stored; their masks are out of bounds
          const int64_t j = key0 + grp + 8 * (e / 2), i = m0 + c;
          x = j < p.Nk && i < p.Nq ? mask_seq_score(p, b, h, i, j, x) : kNegInf;
        }
        s[n][e] = __expf(x - lse_t[c]);
      }
    }
    uint32_t keep = 0;
    if constexpr (kDropout) keep = dropout_bits_key_rows<kNS>(p.dropout, kPrefix, b * p.Hq + h, key0, m0);

    {  // dV += (P * M * dropout.scale)ᵀ dO, the reduction over the tile's queries
      uint32_t pf[kNS / 2][4];
      if constexpr (kDropout) {
        dropped_a_fragments<T, kNS>(pf, s, keep, p.dropout.scale);
      } else {
        mma::to_a_fragments<T, kNS>(pf, s);
      }
      mma::gemm_pb<T, kNO, kNS / 2, kPitch>(dv, pf, DOt + d0);
    }

    if constexpr (kDropout) apply_dropout(dp, keep, p.dropout.scale);
#pragma unroll
    for (int n = 0; n < kNS; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] *= dp[n][e] - delta_t[n * 8 + 2 * tig + e % 2];

    uint32_t dsf[kNS / 2][4];  // dK += dSᵀ Q
    mma::to_a_fragments<T, kNS>(dsf, s);
    mma::gemm_pb<T, kNO, kNS / 2, kPitch>(dk, dsf, Qt + d0);
    __syncthreads();  // every warp is done with this stage before iteration it + 1 refills it
  }
  mma::cp_async_wait<0>();

  if constexpr (!kPrefix) {
    // A padded key's dK and dV are 0 (SPEC.md), written as such: its P is 0, but with an inf or
    // NaN in its V, dS = 0 * (dP - Delta) is NaN. A key's row of every product here depends on
    // its own K and V alone, so the other keys' gradients never saw them.
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int64_t j = key0 + grp + 8 * rh;
      if (j < p.Nk && key_padded(p, owner, j)) {
#pragma unroll
        for (int n = 0; n < kNO; ++n) dk[n][2 * rh] = dk[n][2 * rh + 1] = dv[n][2 * rh] = dv[n][2 * rh + 1] = 0.f;
      }
    }
  }

  // dK, dV of this warp's keys: into dk / dv; for the prefix into dprefix_k / dprefix_v, or,
  // when the entry's items are split into chunks, into chunk c's float32 partial (a contiguous
  // [P, D] slab of [chunks, T, Hkv, P, D]). One store loop serves both, choosing per element:
  // two loops, each computing its addresses, cost the D = 256 kernel its last registers.
  const int64_t n_rows = n_keys - key0;
  const MutView4& dkview = kPrefix ? p.dprefix_k : p.dk;
  const MutView4& dvview = kPrefix ? p.dprefix_v : p.dv;
  const bool partial = kPrefix && ws.chunks > 1;
  void* dkp = slab<T>(dkview, owner, g) + key0 * dkview.s[2];
  void* dvp = slab<T>(dvview, owner, g) + key0 * dvview.s[2];
  int64_t dk_rs = dkview.s[2], dk_cs = dkview.s[3], dv_rs = dvview.s[2], dv_cs = dvview.s[3];
  if (partial) {
    const int64_t off = ((int64_t(blockIdx.z) * p.T + owner) * p.Hkv + g) * p.P * p.D + key0 * p.D;
    dkp = ws.dprefix_k_partial + off;
    dvp = ws.dprefix_v_partial + off;
    dk_rs = dv_rs = p.D;
    dk_cs = dv_cs = 1;
  }
  store_grad<T, kNO>(dk, dkp, partial, dk_rs, dk_cs, n_rows, d0, p.D, p.scale);
  store_grad<T, kNO>(dv, dvp, partial, dv_rs, dv_cs, n_rows, d0, p.D, 1.f);
}

// ------------------------------------------------------------------------------------ launchers

template <typename F>
void dispatch(const FwdParams& p, F&& f) {
  dispatch_head_dim(p.D, [&](auto d) {
    if (p.dtype == DType::kFloat16) {
      p.dropout.enabled ? f(__half{}, d, std::true_type{}) : f(__half{}, d, std::false_type{});
    } else {
      p.dropout.enabled ? f(__nv_bfloat16{}, d, std::true_type{}) : f(__nv_bfloat16{}, d, std::false_type{});
    }
  });
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

}  // namespace

size_t dq_smem(const FwdParams& p) {
  size_t bytes = 0;
  dispatch_head_dim(p.D, [&](auto d) { bytes = dq_smem_bytes<decltype(d)::value>(); });
  return bytes;
}

size_t kv_smem(const FwdParams& p) {
  size_t bytes = 0;
  dispatch_head_dim(p.D, [&](auto d) { bytes = kv_smem_bytes<decltype(d)::value>(); });
  return bytes;
}

int64_t dprefix_query_tile(const FwdParams& p) {
  int64_t tile = 0;
  dispatch_head_dim(p.D, [&](auto d) { tile = Tiles<decltype(d)::value>::kKvQueries; });
  return tile;
}

int64_t dprefix_key_tile(const FwdParams& p) {
  int64_t tile = 0;
  dispatch_head_dim(p.D, [&](auto d) { tile = Tiles<decltype(d)::value>::kKvKeys; });
  return tile;
}

void dq(const BwdParams& p, const float* delta, cudaStream_t stream) {
  dispatch(p, [&](auto tag, auto d, auto dropout) {
    using T = decltype(tag);
    constexpr int kD = decltype(d)::value;
    const auto kernel = dq_kernel<T, kD, decltype(dropout)::value>;
    set_smem(kernel, dq_smem_bytes<kD>());
    const dim3 grid(unsigned(p.B * p.Hq), unsigned(ceil_div(p.Nq, Tiles<kD>::kDqQueries)));
    kernel<<<grid, kThreads, dq_smem_bytes<kD>(), stream>>>(p, delta);
  });
}

void dkdv(const BwdParams& p, const float* delta, cudaStream_t stream) {
  dispatch(p, [&](auto tag, auto d, auto dropout) {
    using T = decltype(tag);
    constexpr int kD = decltype(d)::value;
    const auto kernel = kv_kernel<T, kD, decltype(dropout)::value, false>;
    set_smem(kernel, kv_smem_bytes<kD>());
    BwdWorkspace ws;
    ws.delta = const_cast<float*>(delta);
    const dim3 grid(unsigned(p.B * p.Hkv), unsigned(ceil_div(p.Nk, Tiles<kD>::kKvKeys)));
    kernel<<<grid, kThreads, kv_smem_bytes<kD>(), stream>>>(p, ws);
  });
}

void dprefix(const BwdParams& p, const BwdWorkspace& ws, cudaStream_t stream) {
  dispatch(p, [&](auto tag, auto d, auto dropout) {
    using T = decltype(tag);
    constexpr int kD = decltype(d)::value;
    const auto kernel = kv_kernel<T, kD, decltype(dropout)::value, true>;
    set_smem(kernel, kv_smem_bytes<kD>());
    const dim3 grid(unsigned(p.T * p.Hkv), unsigned(ceil_div(p.P, Tiles<kD>::kKvKeys)), unsigned(ws.chunks));
    kernel<<<grid, kThreads, kv_smem_bytes<kD>(), stream>>>(p, ws);
  });
}

}  // namespace prefix_attn::cuda::tc
