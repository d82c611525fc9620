// The tensor-core forward: a block per (b * Hq, 64 queries), a warp per 16 queries, looping over
// the key tiles of KeyTileWalk (prefix, then the visible sequence) with the online softmax in
// registers. Scores stay in natural units (an additive finfo.min mask must stay finite).
//
// Shared memory, [rows][kD + 8] 16-bit tiles:  Q [64] | K [2][kBc] | V [2][kBc]
// K and V are double-buffered: tile t + 1 is copied (cp.async) while tile t is multiplied.
#include "prefix_attn_tc.cuh"
#include "prefix_attn_tiles.cuh"

namespace prefix_attn::cuda::tc {
namespace {

template <typename T, int kD, bool kDropout>
__global__ void __launch_bounds__(kThreads, 1) fwd_kernel(FwdParams p) {
  constexpr int kBr = Tiles<kD>::kFwdQueries, kBc = Tiles<kD>::kFwdKeys, kPitch = mma::pitch<kD>();
  constexpr int kNS = kBc / 8;  // n-blocks of a score row
  constexpr int kNO = kD / 8;   // n-blocks of an output row
  static_assert(kBr == kWarps * kWarpRows, "a warp per 16 queries");
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + kBr * kPitch;
  T* Vs = Ks + 2 * kBc * kPitch;

  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq, g = h / (p.Hq / p.Hkv);
  // Last query tiles first: under causal masking they visit the most key tiles, and starting
  // them first keeps them out of the last wave.
  const int64_t i0 = int64_t(gridDim.y - 1 - blockIdx.y) * kBr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, grp = lane / 4, tig = lane % 4;
  const int64_t row_i[2] = {i0 + warp * kWarpRows + grp, i0 + warp * kWarpRows + grp + 8};

  const KeyTileWalk walk(p, i0, kBr, kBc);
  auto load_kv = [&](int64_t t, int stage) {
    const KeyTile kt = walk[t];
    const KVSource<T> src = kv_source<T>(p, kt.is_prefix, b, g);
    mma::load_tile<T, kBc, kD, kThreads>(Ks + stage * kBc * kPitch, src.k, src.k_rs, src.k_cs, kt.j0, kt.n, p.D);
    mma::load_tile<T, kBc, kD, kThreads>(Vs + stage * kBc * kPitch, src.v, src.v_rs, src.v_cs, kt.j0, kt.n, p.D);
  };
  mma::load_tile<T, kBr, kD, kThreads>(Qs, slab<T>(p.q, b, h), p.q.s[2], p.q.s[3], i0, p.Nq - i0, p.D);
  if (walk.size() > 0) load_kv(0, 0);
  mma::cp_async_commit();

  float o[kNO][4];
  mma::zero(o);
  float m[2] = {kNegInf, kNegInf};  // running max of rows grp, grp + 8
  float l[2] = {0.f, 0.f};          // this lane's share of their running sums (un-dropped)

  static_assert(kBc <= kThreads, "a thread per key of a tile");
  for (int64_t t = 0; t < walk.size(); ++t) {
    const KeyTile kt = walk[t];
    // Read before tile t + 1's copies are issued, so that the load's latency hides behind them.
    const bool padded = tile_row_padded(p, kt, b);
    // Tile t + 1 goes to the stage tile t - 1 used: every warp left it at the barrier that ended
    // iteration t - 1. The group is committed even when empty, so wait<1> always means "all but
    // tile t + 1".
    if (t + 1 < walk.size()) load_kv(t + 1, (t + 1) % 2);
    mma::cp_async_commit();
    mma::cp_async_wait<1>();
    // Tile t (and Q) written by every thread's copies, visible to every warp. A tile with padded
    // keys gets their V rows zeroed (P = 0 times an inf in V is NaN) and a second barrier; K
    // needs nothing: a padded key's scores are -inf whatever they were.
    if (__syncthreads_or(padded)) {
      if (padded) mma::zero_tile_row<T, kD>(Vs + (t % 2) * kBc * kPitch, threadIdx.x);
      __syncthreads();
    }

    const T* Kt = Ks + (t % 2) * kBc * kPitch;
    const T* Vt = Vs + (t % 2) * kBc * kPitch;
    float s[kNS][4];
    mma::zero(s);
    mma::gemm_abt<T, kNS, kD, kPitch>(s, Qs + warp * kWarpRows * kPitch, Kt);

    const bool edge = kt.masked || kt.n < kBc;
#pragma unroll
    for (int n = 0; n < kNS; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = query_row_score(p, kt, edge, n, e, tig, row_i, b, h, s[n][e]);
    }

    // Online softmax, per row: the 4 lanes of a quad hold the row's columns.
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      float mx = m[rh];
#pragma unroll
      for (int n = 0; n < kNS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * rh], s[n][2 * rh + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // Nothing visible to this row yet: subtract 0, every exp below is exp(-inf) = 0.
      const float m_use = mx == kNegInf ? 0.f : mx;
      const float alpha = __expf(m[rh] - m_use);  // m == -inf: 0, and o, l are 0 anyway
      m[rh] = mx;
      l[rh] *= alpha;
#pragma unroll
      for (int n = 0; n < kNO; ++n) {
        o[n][2 * rh] *= alpha;
        o[n][2 * rh + 1] *= alpha;
      }
#pragma unroll
      for (int n = 0; n < kNS; ++n) {
#pragma unroll
        for (int e = 2 * rh; e < 2 * rh + 2; ++e) {
          s[n][e] = __expf(s[n][e] - m_use);
          l[rh] += s[n][e];
        }
      }
    }
    if constexpr (kDropout) {  // the sums keep the un-dropped probabilities; dropout.scale comes last
      apply_dropout(s, dropout_bits_query_rows<kNS>(p.dropout, kt.is_prefix, bh, row_i, kt.j0), 1.f);
    }

    uint32_t pf[kNS / 2][4];
    mma::to_a_fragments<T, kNS>(pf, s);
    mma::gemm_pb<T, kNO, kNS / 2, kPitch>(o, pf, Vt);
    __syncthreads();  // every warp is done with this stage before iteration t + 1 refills it
  }
  mma::cp_async_wait<0>();  // with no key tile, Q's copy is still outstanding

#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 1);
    l[rh] += __shfl_xor_sync(0xffffffffu, l[rh], 2);
    // l == 0 only when no key was visible (P == 0): out 0, lse -inf
    const float inv = l[rh] > 0.f ? (kDropout ? p.dropout.scale : 1.f) / l[rh] : 0.f;
#pragma unroll
    for (int n = 0; n < kNO; ++n) {
      o[n][2 * rh] *= inv;
      o[n][2 * rh + 1] *= inv;
    }
    if (tig == 0 && row_i[rh] < p.Nq) p.lse[bh * p.Nq + row_i[rh]] = l[rh] > 0.f ? m[rh] + logf(l[rh]) : kNegInf;
  }
  const int64_t r0 = i0 + warp * kWarpRows;
  mma::store_acc<T, kNO>(o, slab<T>(p.out, b, h) + r0 * p.out.s[2], p.out.s[2], p.out.s[3], p.Nq - r0, 0, p.D, 1.f);
}

template <typename T, int kD, bool kDropout>
void launch_fwd(const FwdParams& p, cudaStream_t stream) {
  const auto kernel = fwd_kernel<T, kD, kDropout>;
  constexpr size_t smem = fwd_smem_bytes<kD>();
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  const dim3 grid(unsigned(p.B * p.Hq), unsigned(ceil_div(p.Nq, Tiles<kD>::kFwdQueries)));
  kernel<<<grid, kThreads, smem, stream>>>(p);
}

}  // namespace

size_t fwd_smem(const FwdParams& p) {
  size_t bytes = 0;
  dispatch_head_dim(p.D, [&](auto d) { bytes = fwd_smem_bytes<decltype(d)::value>(); });
  return bytes;
}

void forward(const FwdParams& p, cudaStream_t stream) {
  dispatch_head_dim(p.D, [&](auto d) {
    constexpr int kD = decltype(d)::value;
    if (p.dtype == DType::kFloat16) {
      p.dropout.enabled ? launch_fwd<__half, kD, true>(p, stream) : launch_fwd<__half, kD, false>(p, stream);
    } else {
      p.dropout.enabled ? launch_fwd<__nv_bfloat16, kD, true>(p, stream)
                        : launch_fwd<__nv_bfloat16, kD, false>(p, stream);
    }
  });
}

}  // namespace prefix_attn::cuda::tc
