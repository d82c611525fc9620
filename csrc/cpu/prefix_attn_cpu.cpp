// CPU kernels for attention over [prefix KV ; sequence KV], flash style.
//
// Every tile is multiplied with BLAS sgemm (MKL in the PyTorch wheels) in float32, with the scale
// folded into the score GEMM. Scores stay in natural units: an additive mask of finfo.min (what
// Hugging Face uses) must stay finite, and s * log2(e) would overflow. Exponentials are taken
// as 2^((s - max) * log2 e) by a vectorised polynomial.
// Nothing of size [B, H, P + N, D] is ever built: prefix tiles are read straight from the
// prefix (or the bank entry a row uses), then sequence tiles from k / v.
//
// Forward:   one task per (batch row, query head, query block); prefix tiles, then sequence
//            tiles up to the causal diagonal. Tiles past the diagonal are skipped, and only
//            tiles that cross it (or any tile, when a padding or attention mask is given) are
//            masked.
// Backward:  pass 1, one task per (batch row, KV head): dq, dk, dv for the sequence keys, plus
//            the prefix keys' share of dq. It loops over the group's query heads itself, so
//            dk / dv need no atomics.
//            pass 2, one task per (bank entry, KV head, prefix block, row chunk): dprefix_k /
//            dprefix_v, summed over the rows that use the entry and the group's query heads.
//            Chunk partials are added in a fixed order, so the result is the same run to run.
// Dropout:   the forward zeroes dropped probabilities after the row sum has taken them (the
//            normaliser is the undropped one) and scales the output by 1 / (1 - p) with 1 / l;
//            the backward rebuilds the same keep flags per tile from the counter-based stream
//            (prefix_attn_dropout.h, 16 Philox counters per vector). Tiles start at multiples
//            of kBlockN, so a tile's columns group into whole Philox calls.
#include "prefix_attn_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// Compiled once per ISA level (csrc/cpu/isa/*.cpp), each into its own namespace; the dispatcher
// (prefix_attn_cpu_dispatch.cpp) picks one at the first call. A direct build is cpu_native.
#ifndef PREFIX_ATTN_CPU_NS
#define PREFIX_ATTN_CPU_NS cpu_native
#endif
namespace prefix_attn::PREFIX_ATTN_CPU_NS {
namespace {

constexpr int64_t kBlockM = 128;  // queries per tile
constexpr int64_t kBlockN = 256;  // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 16-float vectors through GCC/Clang vector extensions: the compiler maps them to AVX-512, to
// two AVX2 registers, or to NEON, whatever -march allows, with no intrinsics here (but for
// comparisons below AVX-512: PREFIX_ATTN_HALVES).
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
static_assert(kBlockN % kLanes == 0, "tiles must hold whole vectors");

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline vfloat vsplat(float x) { return x - vfloat{}; }
inline int64_t round_up_lanes(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// Comparisons and selects of 16-lane vectors: GCC 12 lowers them to scalar code, lane by lane,
// where the target has no 512-bit vectors (on AVX2 one select of two vfloats became 16 vmaxss
// and 32 loads and stores; one comparison ~100 instructions), while 8-lane ones are single AVX2
// instructions. Below AVX-512 on x86 they go through two 8-lane halves (measured on an AVX2-only
// EPYC: forward and training step 1.2-1.6x faster, benchmarks/results/cpu-amd-epyc-avx2); with
// AVX-512, and elsewhere, on whole vectors. (NEON, 4 lanes, may well need the same; not measured.)
#if defined(__x86_64__) && !defined(__AVX512F__)
#define PREFIX_ATTN_HALVES 1
#endif
typedef float vfloat8 __attribute__((vector_size(32)));
typedef int32_t vint8 __attribute__((vector_size(32)));
typedef uint32_t vu32x8 __attribute__((vector_size(32)));

template <typename V>
inline auto lo8(V v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
template <typename V>
inline auto hi8(V v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
template <typename H>
inline auto join8(H lo, H hi) {
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// 2^x for x < 128, with 2^x = 0 below -126 (so -inf gives exactly 0): reduce to [0, 1), a
// degree-6 polynomial (relative error 2e-9 before float rounding), then add the integer part
// into the exponent bits. VF / VI: a float vector and the int vector of as many lanes.
template <typename VF, typename VI>
inline VF vexp2_lanes(VF x) {
  const VF lo = VF{} - 127.f;
  x = x < lo ? lo : x;
  VI i = __builtin_convertvector(x, VI);               // truncates toward zero
  i += (__builtin_convertvector(i, VF) > x);           // -1 where that rounded up: floor
  const VF f = x - __builtin_convertvector(i, VF);
  VF p = VF{} + 2.161380834877491e-4f;
  p = p * f + 1.2467376654967666e-3f;
  p = p * f + 9.675532579421997e-3f;
  p = p * f + 5.548521876335144e-2f;
  p = p * f + 2.4022932350635529e-1f;
  p = p * f + 6.931470632553101e-1f;
  p = p * f + 1.f;
  const VF r = reinterpret_cast<VF>(reinterpret_cast<VI>(p) + i * (1 << 23));
  return x < -126.f ? VF{} : r;
}

inline vfloat vexp2(vfloat x) {
#ifdef PREFIX_ATTN_HALVES
  return join8(vexp2_lanes<vfloat8, vint8>(lo8(x)), vexp2_lanes<vfloat8, vint8>(hi8(x)));
#else
  return vexp2_lanes<vfloat, vint>(x);
#endif
}

// Lane-wise maximum (NaN-free inputs).
inline vfloat vmax(vfloat a, vfloat b) {
#ifdef PREFIX_ATTN_HALVES
  const vfloat8 a0 = lo8(a), a1 = hi8(a), b0 = lo8(b), b1 = hi8(b);
  return join8(a0 > b0 ? a0 : b0, a1 > b1 ? a1 : b1);
#else
  return a > b ? a : b;
#endif
}

inline float fast_exp2(float x) { return vexp2(vsplat(x))[0]; }

// ---- Dropout ----------------------------------------------------------------------------

typedef uint32_t vu32 __attribute__((vector_size(64)));   // 16 lanes, as vfloat
typedef uint64_t vu64 __attribute__((vector_size(128)));  // 16 lanes, widened for products

// Philox4x32-10 on 16 counters at once (the scalar definition is philox4x32_10 in
// prefix_attn_dropout.h; tests check the two agree through the kernels' outputs).
inline void vphilox4x32_10(vu32 c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const vu64 pa = __builtin_convertvector(c[0], vu64) * uint64_t{0xD2511F53u};
    const vu64 pb = __builtin_convertvector(c[2], vu64) * uint64_t{0xCD9E8D57u};
    const vu32 hi_a = __builtin_convertvector(pa >> 32, vu32), lo_a = __builtin_convertvector(pa, vu32);
    const vu32 hi_b = __builtin_convertvector(pb >> 32, vu32), lo_b = __builtin_convertvector(pb, vu32);
    c[0] = hi_b ^ c[1] ^ k0;
    c[2] = hi_a ^ c[3] ^ k1;
    c[1] = lo_b;
    c[3] = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// yes where c >= threshold, else 0 (lane-wise; see PREFIX_ATTN_HALVES).
inline vfloat keep_where_at_least(vu32 c, uint32_t threshold, vfloat yes) {
#ifdef PREFIX_ATTN_HALVES
  const vu32x8 c0 = lo8(c), c1 = hi8(c);
  return join8(c0 >= threshold ? lo8(yes) : vfloat8{}, c1 >= threshold ? hi8(yes) : vfloat8{});
#else
  return c >= threshold ? yes : vfloat{};
#endif
}

// The keep factors of one row of a tile: f[c] = kept ? value : 0 for columns j0 + c, c in [0, n),
// of query i of row-head bh, in the prefix or the sequence segment. j0 is a multiple of 4. One
// vector Philox call covers 64 columns: word w of counter t decides column 4t + w, so the four
// word vectors are interleaved back into column order with two rounds of shuffles.
void dropout_factors(const DropoutParams& d, bool is_prefix, int64_t bh, int64_t i, int64_t j0,
                     int64_t n, float value, float* f) {
  typedef double vpair __attribute__((vector_size(64)));  // 8 lanes of two floats each
  constexpr int64_t kCols = 4 * kLanes;                   // columns per vector Philox call
  const uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  const uint32_t segment = is_prefix ? 0x80000000u : 0u;
  const vu32 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vfloat keep = vsplat(value);
  for (int64_t c0 = 0; c0 < n; c0 += kCols) {
    vu32 c[4];
    c[0] = (static_cast<uint32_t>((j0 + c0) / 4) + lane) | segment;
    c[1] = static_cast<uint32_t>(i) - vu32{};
    c[2] = static_cast<uint32_t>(bh) - vu32{};
    c[3] = d.offset - vu32{};
    vphilox4x32_10(c, k0, k1);
    vfloat w[4];
    for (int k = 0; k < 4; ++k) w[k] = keep_where_at_least(c[k], d.threshold, keep);
    // [w0_t w1_t] pairs, then [w0_t w1_t w2_t w3_t] quads: columns 4t .. 4t + 3 in order
    const vfloat ab_lo = __builtin_shufflevector(w[0], w[1], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const vfloat ab_hi = __builtin_shufflevector(w[0], w[1], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                                 15, 31);
    const vfloat cd_lo = __builtin_shufflevector(w[2], w[3], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const vfloat cd_hi = __builtin_shufflevector(w[2], w[3], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                                                 15, 31);
    const vpair pl = reinterpret_cast<vpair>(ab_lo), ph = reinterpret_cast<vpair>(ab_hi);
    const vpair ql = reinterpret_cast<vpair>(cd_lo), qh = reinterpret_cast<vpair>(cd_hi);
    const vpair out[4] = {__builtin_shufflevector(pl, ql, 0, 8, 1, 9, 2, 10, 3, 11),
                          __builtin_shufflevector(pl, ql, 4, 12, 5, 13, 6, 14, 7, 15),
                          __builtin_shufflevector(ph, qh, 0, 8, 1, 9, 2, 10, 3, 11),
                          __builtin_shufflevector(ph, qh, 4, 12, 5, 13, 6, 14, 7, 15)};
    if (c0 + kCols <= n) {
      std::memcpy(f + c0, out, sizeof out);
    } else {
      float tail[kCols];
      std::memcpy(tail, out, sizeof out);
      std::copy(tail, tail + (n - c0), f + c0);
    }
  }
}

// Where a tile's rows and columns sit in the dropout stream.
struct DropoutTile {
  const DropoutParams* d;
  bool is_prefix;
  int64_t bh, i0, j0;
};

// Zeroes the dropped entries of a [bm, bn] tile of probabilities (kept ones are not rescaled:
// the forward folds 1 / (1 - p) into its final 1 / l).
void drop_probs(float* S, int64_t ld, int64_t bm, int64_t bn, const DropoutTile& t) {
  float f[kBlockN];
  for (int64_t r = 0; r < bm; ++r) {
    dropout_factors(*t.d, t.is_prefix, t.bh, t.i0 + r, t.j0, bn, 1.f, f);
    float* s = S + r * ld;
    for (int64_t c = 0; c < bn; ++c) s[c] *= f[c];
  }
}

// Columns [n, round_up_lanes(n)) of each row get `value`, so the vector loops below can run
// whole vectors past a ragged tile edge: -inf scores give 0 probabilities.
inline void pad_columns(float* S, int64_t ld, int64_t rows, int64_t n, float value) {
  const int64_t n_up = round_up_lanes(n);
  for (int64_t r = 0; r < rows; ++r) std::fill(S + r * ld + n, S + r * ld + n_up, value);
}

// BLAS sgemm, as exported by libtorch_cpu (MKL in the x86 wheels). cpublas's own float gemm
// is not exported from libtorch, so we bind the Fortran symbol it calls itself. The symbol is
// weak: a torch build without it still loads, and falls back to the plain loops below.
extern "C" __attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m,
                                             const int* n, const int* k, const float* alpha,
                                             const float* a, const int* lda, const float* b,
                                             const int* ldb, const float* beta, float* c,
                                             const int* ldc);

// MKL's thread count for the calling thread only. Our parallel loops already use every core;
// a BLAS call inside them that starts threads of its own oversubscribes the machine (measured:
// 2-10x slower on 2 cores), so each loop body runs BLAS single-threaded.
extern "C" __attribute__((weak)) int MKL_Set_Num_Threads_Local(int n);

struct SingleThreadedBlas {
  int saved = 0;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) saved = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(saved);
  }
};

// at::parallel_for over tasks [0, n), one task at a time per grain, BLAS single-threaded.
template <typename F>
void parallel_tasks(int64_t n, const F& body) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas blas_guard;
    body(begin, end);
  });
}

// Up to this many rows of A (a decode step: one query, or a KV group's few heads folded into
// it), register-blocked loops replace the BLAS call: for such thin products its fixed cost is
// the whole job, and a naive loop is bound by the latency of reloading C (measured on the
// 2-core EPYC, SmolLM2's decode shape: ~8 us per (row, KV head) task with either, ~3 us with
// these).
constexpr int64_t kSmallM = 4;

// Sum of the lanes, as a tree of half-width adds (a serial lane loop costs 16 dependent adds).
inline float hsum(vfloat x) {
  using v8 = float __attribute__((vector_size(32)));
  using v4 = float __attribute__((vector_size(16)));
  static_assert(sizeof(vfloat) == 2 * sizeof(v8), "hsum assumes 16 lanes");
  v8 lo8, hi8;
  std::memcpy(&lo8, &x, sizeof lo8);
  std::memcpy(&hi8, reinterpret_cast<const char*>(&x) + sizeof lo8, sizeof hi8);
  const v8 s8 = lo8 + hi8;
  v4 lo4, hi4;
  std::memcpy(&lo4, &s8, sizeof lo4);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof lo4, sizeof hi4);
  const v4 s4 = lo4 + hi4;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// C[MR, N] = alpha * A[MR, K] @ B[N, K]^T + beta * C: dot products of rows, four B rows at a
// time so that 4 * MR independent accumulators hide the FMA latency.
template <int MR>
void small_gemm_nt(int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int NR = 4;
  const int64_t K_vec = K / kLanes * kLanes;
  const bool keep_c = beta != 0.f;  // beta == 0: C's old contents are ignored, NaN included
  auto finish = [&](int r, int64_t j, float dot) {
    float* c = C + r * ldc + j;
    *c = keep_c ? alpha * dot + beta * *c : alpha * dot;
  };
  int64_t j = 0;
  for (; j + NR <= N; j += NR) {
    vfloat acc[MR][NR] = {};
    for (int64_t k = 0; k < K_vec; k += kLanes) {
      vfloat b[NR];
      for (int n = 0; n < NR; ++n) b[n] = vload(B + (j + n) * ldb + k);
      for (int r = 0; r < MR; ++r) {
        const vfloat a = vload(A + r * lda + k);
        for (int n = 0; n < NR; ++n) acc[r][n] += a * b[n];
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int n = 0; n < NR; ++n) {
        float dot = hsum(acc[r][n]);
        for (int64_t k = K_vec; k < K; ++k) dot += A[r * lda + k] * B[(j + n) * ldb + k];
        finish(r, j + n, dot);
      }
    }
  }
  for (; j < N; ++j) {
    vfloat acc[MR] = {};
    for (int64_t k = 0; k < K_vec; k += kLanes) {
      const vfloat b = vload(B + j * ldb + k);
      for (int r = 0; r < MR; ++r) acc[r] += vload(A + r * lda + k) * b;
    }
    for (int r = 0; r < MR; ++r) {
      float dot = hsum(acc[r]);
      for (int64_t k = K_vec; k < K; ++k) dot += A[r * lda + k] * B[j * ldb + k];
      finish(r, j, dot);
    }
  }
}

// C[MR, N] = alpha * A[MR, K] @ B[K, N] + beta * C, with C held in registers across the K loop,
// 4 vectors (64 columns) at a time, then one vector, then single columns.
template <int MR>
void small_gemm_nn(int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                   const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  auto columns = [&](int64_t j, auto width_tag) {
    constexpr int NV = decltype(width_tag)::value;  // vectors per row
    vfloat acc[MR][NV] = {};
    for (int64_t k = 0; k < K; ++k) {
      vfloat b[NV];
      for (int v = 0; v < NV; ++v) b[v] = vload(B + k * ldb + j + v * kLanes);
      for (int r = 0; r < MR; ++r) {
        const vfloat a = vsplat(alpha * A[r * lda + k]);
        for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) {
        float* c = C + r * ldc + j + v * kLanes;
        vstore(c, beta == 0.f ? acc[r][v] : acc[r][v] + vsplat(beta) * vload(c));
      }
    }
  };
  int64_t j = 0;
  for (; j + 4 * kLanes <= N; j += 4 * kLanes) columns(j, std::integral_constant<int, 4>{});
  for (; j + kLanes <= N; j += kLanes) columns(j, std::integral_constant<int, 1>{});
  for (; j < N; ++j) {
    float acc[MR] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float b = B[k * ldb + j];
      for (int r = 0; r < MR; ++r) acc[r] += A[r * lda + k] * b;
    }
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * ldc + j;
      *c = alpha * acc[r] + (beta == 0.f ? 0.f : beta * *c);
    }
  }
}

template <int MR>
void small_gemm(bool trans_b, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (trans_b) {
    small_gemm_nt<MR>(N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  } else {
    small_gemm_nn<MR>(N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
}

// Row-major C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C. BLAS is column-major, where
// the same memory holds the transposes, so we ask it for C^T = op(B)^T op(A)^T.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
          int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (!trans_a && M <= kSmallM) {
    switch (M) {
      case 1: return small_gemm<1>(trans_b, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      case 2: return small_gemm<2>(trans_b, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      case 3: return small_gemm<3>(trans_b, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      default: return small_gemm<4>(trans_b, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
  }
  if (sgemm_ != nullptr) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f) {
      std::fill(c, c + N, 0.f);
    } else if (beta != 1.f) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
    for (int64_t kk = 0; kk < K; ++kk) {
      const float a = alpha * (trans_a ? A[kk * lda + i] : A[i * lda + kk]);
      if (trans_b) {
        for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + kk];
      } else {
        const float* b = B + kk * ldb;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      }
    }
  }
}

// Whether rows_as_float must copy: GEMM reads float32 rows with unit column stride in place.
template <typename T>
bool rows_need_copy(int64_t row_stride, int64_t col_stride, int64_t n, int64_t D) {
  if constexpr (std::is_same_v<T, float>) {
    return !(col_stride == 1 && ((row_stride >= D && row_stride <= INT_MAX) || n <= 1));
  }
  return true;
}

// Rows [0, n) of a strided [n, D] slab as float32 with leading dimension *ld: the slab itself
// when GEMM can read it in place, else a converted copy in `scratch`.
template <typename T>
const float* rows_as_float(const T* src, int64_t row_stride, int64_t col_stride, int64_t n,
                           int64_t D, float* scratch, int64_t* ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (!rows_need_copy<T>(row_stride, col_stride, n, D)) {
      *ld = n <= 1 ? D : row_stride;
      return reinterpret_cast<const float*>(src);
    }
  }
  for (int64_t r = 0; r < n; ++r) {
    const T* row = src + r * row_stride;
    float* dst = scratch + r * D;
    if (col_stride == 1) {
      for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<float>(row[c]);
    } else {
      for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<float>(row[c * col_stride]);
    }
  }
  *ld = D;
  return scratch;
}

// rows_as_float for the sequence keys [j0, j0 + n), whose key_padding_mask entries start at
// `kept` (nullptr: no mask): the rows of padded keys come back as zeros. A padded key never
// affects any result, whatever it holds (SPEC): masking its score is not enough, since its zero
// probability would still multiply its value (0 * inf = NaN) and its zero score gradient its key.
// Tiles without a padded key take rows_as_float's path unchanged.
template <typename T>
const float* key_rows_as_float(const T* src, int64_t row_stride, int64_t col_stride, int64_t n,
                               int64_t D, float* scratch, int64_t* ld, const bool* kept,
                               int64_t kept_stride) {
  bool any_padded = false;
  for (int64_t r = 0; kept != nullptr && r < n && !any_padded; ++r) any_padded = !kept[r * kept_stride];
  if (!any_padded) return rows_as_float(src, row_stride, col_stride, n, D, scratch, ld);
  for (int64_t r = 0; r < n; ++r) {
    float* dst = scratch + r * D;
    if (!kept[r * kept_stride]) {
      std::fill(dst, dst + D, 0.f);
      continue;
    }
    const T* row = src + r * row_stride;
    for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<float>(row[c * col_stride]);
  }
  *ld = D;
  return scratch;
}

// dst rows (strided, type T) = mul * src rows (float32, leading dimension ld).
template <typename T>
void store_rows(const float* src, int64_t ld, int64_t n, int64_t D, float mul, T* dst,
                int64_t row_stride, int64_t col_stride) {
  for (int64_t r = 0; r < n; ++r) {
    const float* s = src + r * ld;
    T* row = dst + r * row_stride;
    for (int64_t c = 0; c < D; ++c) row[c * col_stride] = static_cast<T>(s[c] * mul);
  }
}

// Visibility of the sequence keys for one (batch row, query head). Prefix keys never see it.
struct SeqMask {
  bool causal = false;
  int64_t offset = 0;  // Nk - Nq: query i sees key j iff j <= i + offset (bottom-right causal)
  const bool* kpm = nullptr;
  int64_t kpm_stride = 0;
  MaskKind kind = MaskKind::kNone;
  const void* mask = nullptr;  // already offset to (b, h)
  int64_t mask_si = 0, mask_sj = 0;

  SeqMask(const FwdParams& p, int64_t b, int64_t h)
      : causal(p.causal), offset(p.Nk - p.Nq), kind(p.mask_kind) {
    if (p.key_padding_mask != nullptr) {
      kpm = p.key_padding_mask + b * p.kpm_s[0];
      kpm_stride = p.kpm_s[1];
    }
    if (kind != MaskKind::kNone) {
      const int64_t off = b * p.attn_mask.s[0] + h * p.attn_mask.s[1];
      mask = kind == MaskKind::kBool
                 ? static_cast<const void*>(static_cast<const bool*>(p.attn_mask.ptr) + off)
                 : static_cast<const void*>(static_cast<const float*>(p.attn_mask.ptr) + off);
      mask_si = p.attn_mask.s[2];
      mask_sj = p.attn_mask.s[3];
    }
  }

  // Exclusive end of the keys any of the queries [i0, i0 + bm) can see.
  int64_t key_end(int64_t i0, int64_t bm, int64_t Nk) const {
    if (!causal) return Nk;
    return std::clamp<int64_t>(i0 + bm + offset, 0, Nk);
  }

  bool tile_needs_mask(int64_t i0, int64_t j0, int64_t bn) const {
    return kpm != nullptr || kind != MaskKind::kNone || (causal && j0 + bn - 1 > i0 + offset);
  }

  void apply(float* S, int64_t ld, int64_t i0, int64_t bm, int64_t j0, int64_t bn) const {
    for (int64_t r = 0; r < bm; ++r) {
      const int64_t i = i0 + r;
      float* s = S + r * ld;
      if (causal) {
        const int64_t first_hidden = std::max<int64_t>(i + offset + 1 - j0, 0);
        for (int64_t c = first_hidden; c < bn; ++c) s[c] = kNegInf;
      }
      if (kpm != nullptr) {
        for (int64_t c = 0; c < bn; ++c)
          if (!kpm[(j0 + c) * kpm_stride]) s[c] = kNegInf;
      }
      if (kind == MaskKind::kBool) {
        const bool* m = static_cast<const bool*>(mask) + i * mask_si + j0 * mask_sj;
        for (int64_t c = 0; c < bn; ++c)
          if (!m[c * mask_sj]) s[c] = kNegInf;
      } else if (kind == MaskKind::kFloat) {
        const float* m = static_cast<const float*>(mask) + i * mask_si + j0 * mask_sj;
        for (int64_t c = 0; c < bn; ++c) s[c] += m[c * mask_sj];
      }
    }
  }
};

// One step of the online softmax over a [bm, bn] tile of scores (columns padded with -inf to
// whole vectors). Turns S into unnormalised probabilities and rescales the running row
// max m, sum l and output acc.
void online_softmax_step(float* S, int64_t ldS, int64_t bm, int64_t bn, float* m, float* l,
                         float* acc, int64_t D) {
  const int64_t n_up = round_up_lanes(bn);
  for (int64_t r = 0; r < bm; ++r) {
    float* s = S + r * ldS;
    vfloat row_max = vsplat(kNegInf);
    for (int64_t c = 0; c < n_up; c += kLanes) row_max = vmax(vload(s + c), row_max);
    float mx = m[r];
    for (int64_t c = 0; c < kLanes; ++c) mx = std::max(mx, row_max[c]);
    if (mx == kNegInf) {  // nothing visible in this row yet
      std::fill(s, s + n_up, 0.f);
      continue;
    }
    vfloat vsum{};
    for (int64_t c = 0; c < n_up; c += kLanes) {
      const vfloat e = vexp2((vload(s + c) - mx) * kLog2e);
      vstore(s + c, e);
      vsum += e;
    }
    float sum = 0.f;
    for (int64_t c = 0; c < kLanes; ++c) sum += vsum[c];
    const float alpha = fast_exp2((m[r] - mx) * kLog2e);
    l[r] = l[r] * alpha + sum;
    m[r] = mx;
    if (alpha != 1.f) {
      float* a = acc + r * D;
      for (int64_t c = 0; c < D; ++c) a[c] *= alpha;
    }
  }
}

template <typename T>
void forward_impl(const FwdParams& p) {
  const int64_t D = p.D, group = p.Hq / p.Hkv;
  const int64_t n_qblocks = ceil_div(p.Nq, kBlockM);
  const T* q = static_cast<const T*>(p.q.ptr);
  const T* k = static_cast<const T*>(p.k.ptr);
  const T* v = static_cast<const T*>(p.v.ptr);
  const T* pk = static_cast<const T*>(p.prefix_k.ptr);
  const T* pv = static_cast<const T*>(p.prefix_v.ptr);
  T* out = static_cast<T*>(p.out.ptr);

  // Scratch sized to the largest tile this call has, not the largest possible one: a decode
  // step (Nq = 1) needs a few KB, not the ~330 KB a full tile takes to allocate and zero.
  const int64_t rows_cap = std::min(kBlockM, p.Nq);
  const int64_t ldS = round_up_lanes(std::max<int64_t>(std::min(kBlockN, std::max(p.P, p.Nk)), 1));
  const bool copy_rows = !std::is_same_v<T, float> || p.key_padding_mask != nullptr ||
                         rows_need_copy<T>(p.k.s[2], p.k.s[3], p.Nk, D) ||
                         rows_need_copy<T>(p.v.s[2], p.v.s[3], p.Nk, D) ||
                         (p.P > 0 && (rows_need_copy<T>(p.prefix_k.s[2], p.prefix_k.s[3], p.P, D) ||
                                      rows_need_copy<T>(p.prefix_v.s[2], p.prefix_v.s[3], p.P, D)));
  parallel_tasks(p.B * p.Hq * n_qblocks, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(rows_cap * D), kbuf(copy_rows ? ldS * D : 0), vbuf(kbuf.size());
    std::vector<float> S(rows_cap * ldS), acc(rows_cap * D), m(rows_cap), l(rows_cap);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, bh = task / n_qblocks;
      const int64_t b = bh / p.Hq, h = bh % p.Hq, g = h / group;
      const int64_t i0 = qb * kBlockM, bm = std::min(kBlockM, p.Nq - i0);
      int64_t ldq, ldk, ldv;
      const float* Q = rows_as_float(q + b * p.q.s[0] + h * p.q.s[1] + i0 * p.q.s[2], p.q.s[2],
                                     p.q.s[3], bm, D, qbuf.data(), &ldq);
      std::fill(m.begin(), m.begin() + bm, kNegInf);
      std::fill(l.begin(), l.begin() + bm, 0.f);
      std::fill(acc.begin(), acc.begin() + bm * D, 0.f);
      bool in_prefix = true;  // which segment attend() is walking, for the dropout stream

      auto attend = [&](const float* K, const float* V, int64_t bn, const SeqMask* mask,
                        int64_t j0) {
        gemm(false, true, bm, bn, D, p.scale, Q, ldq, K, ldk, 0.f, S.data(), ldS);
        if (mask != nullptr) mask->apply(S.data(), ldS, i0, bm, j0, bn);
        pad_columns(S.data(), ldS, bm, bn, kNegInf);
        online_softmax_step(S.data(), ldS, bm, bn, m.data(), l.data(), acc.data(), D);
        if (p.dropout.enabled) {
          // prefix tiles are attended with mask == nullptr and sequence tiles with one unless
          // they need none: the segment is passed explicitly instead.
          drop_probs(S.data(), ldS, bm, bn, DropoutTile{&p.dropout, in_prefix, bh, i0, j0});
        }
        gemm(false, false, bm, D, bn, 1.f, S.data(), ldS, V, ldv, 1.f, acc.data(), D);
      };

      if (p.P > 0) {
        const int64_t e = p.prefix_entry(b);
        const T* pkb = pk + e * p.prefix_k.s[0] + g * p.prefix_k.s[1];
        const T* pvb = pv + e * p.prefix_v.s[0] + g * p.prefix_v.s[1];
        for (int64_t j0 = 0; j0 < p.P; j0 += kBlockN) {
          const int64_t bn = std::min(kBlockN, p.P - j0);
          const float* K = rows_as_float(pkb + j0 * p.prefix_k.s[2], p.prefix_k.s[2],
                                         p.prefix_k.s[3], bn, D, kbuf.data(), &ldk);
          const float* V = rows_as_float(pvb + j0 * p.prefix_v.s[2], p.prefix_v.s[2],
                                         p.prefix_v.s[3], bn, D, vbuf.data(), &ldv);
          attend(K, V, bn, nullptr, j0);
        }
      }

      in_prefix = false;
      const SeqMask mask(p, b, h);
      const T* kb = k + b * p.k.s[0] + g * p.k.s[1];
      const T* vb = v + b * p.v.s[0] + g * p.v.s[1];
      const int64_t j_end = mask.key_end(i0, bm, p.Nk);
      for (int64_t j0 = 0; j0 < j_end; j0 += kBlockN) {
        const int64_t bn = std::min(kBlockN, j_end - j0);
        const bool* kept = mask.kpm != nullptr ? mask.kpm + j0 * mask.kpm_stride : nullptr;
        const float* K = key_rows_as_float(kb + j0 * p.k.s[2], p.k.s[2], p.k.s[3], bn, D,
                                           kbuf.data(), &ldk, kept, mask.kpm_stride);
        const float* V = key_rows_as_float(vb + j0 * p.v.s[2], p.v.s[2], p.v.s[3], bn, D,
                                           vbuf.data(), &ldv, kept, mask.kpm_stride);
        attend(K, V, bn, mask.tile_needs_mask(i0, j0, bn) ? &mask : nullptr, j0);
      }

      T* o = out + b * p.out.s[0] + h * p.out.s[1] + i0 * p.out.s[2];
      float* lse = p.lse + (b * p.Hq + h) * p.Nq + i0;
      for (int64_t r = 0; r < bm; ++r) {
        // l == 0 only when no key was visible (possible only with P == 0): out 0, lse -inf.
        const float inv = l[r] > 0.f ? p.dropout.scale / l[r] : 0.f;
        store_rows(acc.data() + r * D, D, 1, D, inv, o + r * p.out.s[2], p.out.s[2], p.out.s[3]);
        lse[r] = l[r] > 0.f ? m[r] + std::log2(l[r]) * kLn2 : kNegInf;
      }
    }
  });
}

// Per query row, what the backward needs to rebuild probabilities: P = exp(S - shift - logl),
// and Delta = rowsum(dout * out) - dlse (the dlse term carries a gradient flowing into the
// returned lse: d lse / d s_j = p_j).
//
// Normally shift = lse and logl = 0. But when a row's scores are huge (an additive mask of
// finfo.min over every key it sees, as Hugging Face builds them), float32 cannot hold
// lse = max + log(l) to better than its max: log(l) is rounded away and every probability would
// come out l times too large. Such rows (rare) get their max and log(l) recomputed exactly.
struct RowStats {
  std::vector<float> delta, shift, logl;
};
constexpr float kHugeLse = 1048576.f;  // 2^20: float32 spacing there is 1/8, too coarse for log(l)

template <typename T>
void exact_row_stats(const FwdParams& p, int64_t b, int64_t h, int64_t i, float* shift,
                     float* logl) {
  const int64_t D = p.D, g = h / (p.Hq / p.Hkv);
  std::vector<float> qbuf(D), kbuf(kBlockN * D), S(kBlockN);
  int64_t ldq, ldk;
  const float* Q = rows_as_float(static_cast<const T*>(p.q.ptr) + b * p.q.s[0] + h * p.q.s[1] +
                                     i * p.q.s[2],
                                 p.q.s[2], p.q.s[3], 1, D, qbuf.data(), &ldq);
  float m = kNegInf, l = 0.f;
  auto visit = [&](const T* keys, const int64_t* ks, int64_t n, const SeqMask* mask) {
    for (int64_t j0 = 0; j0 < n; j0 += kBlockN) {
      const int64_t bn = std::min(kBlockN, n - j0);
      const float* K = rows_as_float(keys + j0 * ks[2], ks[2], ks[3], bn, D, kbuf.data(), &ldk);
      gemm(false, true, 1, bn, D, p.scale, Q, ldq, K, ldk, 0.f, S.data(), kBlockN);
      if (mask != nullptr) mask->apply(S.data(), kBlockN, i, 1, j0, bn);
      pad_columns(S.data(), kBlockN, 1, bn, kNegInf);
      online_softmax_step(S.data(), kBlockN, 1, bn, &m, &l, nullptr, 0);
    }
  };
  if (p.P > 0) {
    const int64_t e = p.prefix_entry(b);
    visit(static_cast<const T*>(p.prefix_k.ptr) + e * p.prefix_k.s[0] + g * p.prefix_k.s[1],
          p.prefix_k.s, p.P, nullptr);
  }
  const SeqMask mask(p, b, h);
  visit(static_cast<const T*>(p.k.ptr) + b * p.k.s[0] + g * p.k.s[1], p.k.s,
        mask.key_end(i, 1, p.Nk), &mask);
  *shift = m;
  *logl = l > 0.f ? std::log(l) : 0.f;
}

template <typename T>
RowStats backward_row_stats(const BwdParams& p) {
  const int64_t rows = p.B * p.Hq * p.Nq, D = p.D;
  RowStats st;
  st.delta.resize(rows);
  st.shift.assign(p.lse_fwd, p.lse_fwd + rows);
  st.logl.assign(rows, 0.f);
  const T* dout = static_cast<const T*>(p.dout.ptr);
  const T* out = static_cast<const T*>(p.out_fwd.ptr);
  parallel_tasks(p.B * p.Hq, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.Hq, h = bh % p.Hq;
      for (int64_t i = 0; i < p.Nq; ++i) {
        const int64_t row = bh * p.Nq + i;
        const T* dor = dout + b * p.dout.s[0] + h * p.dout.s[1] + i * p.dout.s[2];
        const T* orow = out + b * p.out_fwd.s[0] + h * p.out_fwd.s[1] + i * p.out_fwd.s[2];
        float acc = 0.f;
        for (int64_t c = 0; c < D; ++c)
          acc += static_cast<float>(dor[c * p.dout.s[3]]) * static_cast<float>(orow[c * p.out_fwd.s[3]]);
        st.delta[row] = acc - (p.dlse != nullptr ? p.dlse[row] : 0.f);
        const float lse = p.lse_fwd[row];
        if (std::isfinite(lse) && std::abs(lse) > kHugeLse)
          exact_row_stats<T>(p, b, h, i, &st.shift[row], &st.logl[row]);
      }
    }
  });
  return st;
}

// Probabilities and score gradients of one [bm, bn] tile, in place:
//   S  <- P  = exp(S - shift - logl)             (S: scores, masked entries -inf)
//   dP <- dS = P * (dP - Delta)                  (dP: dout @ V^T)
// Rows whose shift is -inf saw no key at all; their P is 0. Columns past bn are padded first.
// With dropout (drop != nullptr), Z = P * M / (1 - p) is what multiplied V, so
//   S  <- Z                                      (for dV = Z^T dO)
//   dP <- dS = P * (dP * M / (1 - p) - Delta)    (Delta = rowsum(dO * O) holds as before)
void probs_and_dscores(float* S, float* dP, int64_t ld, int64_t bm, int64_t bn,
                       const RowStats& st, int64_t row0, const DropoutTile* drop) {
  pad_columns(S, ld, bm, bn, kNegInf);
  pad_columns(dP, ld, bm, bn, 0.f);
  const int64_t n_up = round_up_lanes(bn);
  alignas(64) float f[kBlockN];
  if (drop != nullptr) std::fill(f + bn, f + n_up, 0.f);
  for (int64_t r = 0; r < bm; ++r) {
    float* s = S + r * ld;
    float* dp = dP + r * ld;
    const float L = st.shift[row0 + r], ll = st.logl[row0 + r], dl = st.delta[row0 + r];
    if (L == kNegInf) {
      std::fill(s, s + n_up, 0.f);
      std::fill(dp, dp + n_up, 0.f);
      continue;
    }
    if (drop == nullptr) {
      for (int64_t c = 0; c < n_up; c += kLanes) {
        const vfloat pr = vexp2(((vload(s + c) - L) - ll) * kLog2e);
        vstore(s + c, pr);
        vstore(dp + c, pr * (vload(dp + c) - dl));
      }
      continue;
    }
    dropout_factors(*drop->d, drop->is_prefix, drop->bh, drop->i0 + r, drop->j0, bn, drop->d->scale, f);
    for (int64_t c = 0; c < n_up; c += kLanes) {
      const vfloat pr = vexp2(((vload(s + c) - L) - ll) * kLog2e);
      const vfloat keep = vload(f + c);
      vstore(s + c, pr * keep);
      vstore(dp + c, pr * (vload(dp + c) * keep - dl));
    }
  }
}

// Pass 1: dq, dk, dv. One task per (b, kv head g).
template <typename T>
void backward_sequence(const BwdParams& p, const RowStats& st) {
  const int64_t D = p.D, group = p.Hq / p.Hkv, Nk = p.Nk;
  const T* q = static_cast<const T*>(p.q.ptr);
  const T* k = static_cast<const T*>(p.k.ptr);
  const T* v = static_cast<const T*>(p.v.ptr);
  const T* pk = static_cast<const T*>(p.prefix_k.ptr);
  const T* pv = static_cast<const T*>(p.prefix_v.ptr);
  const T* dout = static_cast<const T*>(p.dout.ptr);
  const bool prefix_dq = p.need_dq && p.P > 0;

  parallel_tasks(p.B * p.Hkv, [&](int64_t begin, int64_t end) {
    // Whole-sequence K / V copies only when GEMM cannot read them in place.
    std::vector<float> kall, vall, pkall, pvall, dkacc, dvacc;
    const bool padded = p.key_padding_mask != nullptr;  // padded keys are zeroed in a copy
    if (padded || rows_need_copy<T>(p.k.s[2], p.k.s[3], Nk, D)) kall.resize(Nk * D);
    if (padded || rows_need_copy<T>(p.v.s[2], p.v.s[3], Nk, D)) vall.resize(Nk * D);
    if (p.need_dkv) {
      dkacc.resize(Nk * D);
      dvacc.resize(Nk * D);
    }
    if (prefix_dq && rows_need_copy<T>(p.prefix_k.s[2], p.prefix_k.s[3], p.P, D))
      pkall.resize(p.P * D);
    if (prefix_dq && rows_need_copy<T>(p.prefix_v.s[2], p.prefix_v.s[3], p.P, D))
      pvall.resize(p.P * D);
    std::vector<float> qbuf(kBlockM * D), dobuf(kBlockM * D), dqacc(kBlockM * D);
    std::vector<float> S(kBlockM * kBlockN), dP(kBlockM * kBlockN);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.Hkv, g = task % p.Hkv;
      int64_t ldk, ldv, ldpk = D, ldpv = D, ldq, lddo;
      const bool* kept = padded ? p.key_padding_mask + b * p.kpm_s[0] : nullptr;
      const float* K = key_rows_as_float(k + b * p.k.s[0] + g * p.k.s[1], p.k.s[2], p.k.s[3], Nk,
                                         D, kall.data(), &ldk, kept, p.kpm_s[1]);
      const float* V = key_rows_as_float(v + b * p.v.s[0] + g * p.v.s[1], p.v.s[2], p.v.s[3], Nk,
                                         D, vall.data(), &ldv, kept, p.kpm_s[1]);
      const float *PK = nullptr, *PV = nullptr;
      if (prefix_dq) {
        const int64_t e = p.prefix_entry(b);
        PK = rows_as_float(pk + e * p.prefix_k.s[0] + g * p.prefix_k.s[1], p.prefix_k.s[2],
                           p.prefix_k.s[3], p.P, D, pkall.data(), &ldpk);
        PV = rows_as_float(pv + e * p.prefix_v.s[0] + g * p.prefix_v.s[1], p.prefix_v.s[2],
                           p.prefix_v.s[3], p.P, D, pvall.data(), &ldpv);
      }
      if (p.need_dkv) {
        std::fill(dkacc.begin(), dkacc.end(), 0.f);
        std::fill(dvacc.begin(), dvacc.end(), 0.f);
      }

      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const SeqMask mask(p, b, h);
        for (int64_t i0 = 0; i0 < p.Nq; i0 += kBlockM) {
          const int64_t bm = std::min(kBlockM, p.Nq - i0);
          const int64_t j_end = mask.key_end(i0, bm, Nk);
          if (!p.need_dq && j_end == 0) continue;  // no key: no dk / dv contribution
          const int64_t row0 = (b * p.Hq + h) * p.Nq + i0;
          const float* Q = rows_as_float(q + b * p.q.s[0] + h * p.q.s[1] + i0 * p.q.s[2],
                                         p.q.s[2], p.q.s[3], bm, D, qbuf.data(), &ldq);
          const float* dO =
              rows_as_float(dout + b * p.dout.s[0] + h * p.dout.s[1] + i0 * p.dout.s[2],
                            p.dout.s[2], p.dout.s[3], bm, D, dobuf.data(), &lddo);
          if (p.need_dq) std::fill(dqacc.begin(), dqacc.end(), 0.f);

          // The prefix keys' share of dq. Their own gradient is pass 2's job.
          if (prefix_dq) {
            for (int64_t j0 = 0; j0 < p.P; j0 += kBlockN) {
              const int64_t bn = std::min(kBlockN, p.P - j0);
              gemm(false, true, bm, bn, D, p.scale, Q, ldq, PK + j0 * ldpk, ldpk, 0.f,
                   S.data(), kBlockN);
              gemm(false, true, bm, bn, D, 1.f, dO, lddo, PV + j0 * ldpv, ldpv, 0.f, dP.data(),
                   kBlockN);
              const DropoutTile drop{&p.dropout, true, b * p.Hq + h, i0, j0};
              probs_and_dscores(S.data(), dP.data(), kBlockN, bm, bn, st, row0,
                                p.dropout.enabled ? &drop : nullptr);
              gemm(false, false, bm, D, bn, 1.f, dP.data(), kBlockN, PK + j0 * ldpk, ldpk, 1.f,
                   dqacc.data(), D);
            }
          }

          for (int64_t j0 = 0; j0 < j_end; j0 += kBlockN) {
            const int64_t bn = std::min(kBlockN, j_end - j0);
            gemm(false, true, bm, bn, D, p.scale, Q, ldq, K + j0 * ldk, ldk, 0.f, S.data(),
                 kBlockN);
            if (mask.tile_needs_mask(i0, j0, bn)) mask.apply(S.data(), kBlockN, i0, bm, j0, bn);
            gemm(false, true, bm, bn, D, 1.f, dO, lddo, V + j0 * ldv, ldv, 0.f, dP.data(),
                 kBlockN);
            const DropoutTile drop{&p.dropout, false, b * p.Hq + h, i0, j0};
            probs_and_dscores(S.data(), dP.data(), kBlockN, bm, bn, st, row0,
                              p.dropout.enabled ? &drop : nullptr);
            if (p.need_dkv) {
              gemm(true, false, bn, D, bm, 1.f, S.data(), kBlockN, dO, lddo, 1.f,
                   dvacc.data() + j0 * D, D);
              gemm(true, false, bn, D, bm, 1.f, dP.data(), kBlockN, Q, ldq, 1.f,
                   dkacc.data() + j0 * D, D);
            }
            if (p.need_dq) {
              gemm(false, false, bm, D, bn, 1.f, dP.data(), kBlockN, K + j0 * ldk, ldk, 1.f,
                   dqacc.data(), D);
            }
          }

          if (p.need_dq) {
            store_rows(dqacc.data(), D, bm, D, p.scale,
                       static_cast<T*>(p.dq.ptr) + b * p.dq.s[0] + h * p.dq.s[1] + i0 * p.dq.s[2],
                       p.dq.s[2], p.dq.s[3]);
          }
        }
      }

      if (p.need_dkv) {
        store_rows(dkacc.data(), D, Nk, D, p.scale,
                   static_cast<T*>(p.dk.ptr) + b * p.dk.s[0] + g * p.dk.s[1], p.dk.s[2], p.dk.s[3]);
        store_rows(dvacc.data(), D, Nk, D, 1.f,
                   static_cast<T*>(p.dv.ptr) + b * p.dv.s[0] + g * p.dv.s[1], p.dv.s[2], p.dv.s[3]);
      }
    }
  });
}

// Pass 2: dprefix_k, dprefix_v, summed over the rows using each bank entry and over the query
// heads of each KV group. One task per (entry t, kv head g, prefix block, row chunk).
template <typename T>
void backward_prefix(const BwdParams& p, const RowStats& st) {
  const int64_t D = p.D, group = p.Hq / p.Hkv, T_ = p.T, P = p.P;

  // Rows grouped by the entry they use (a stable counting sort: fixed order, run to run).
  std::vector<int64_t> start(T_ + 1, 0), rows(p.B);
  for (int64_t b = 0; b < p.B; ++b) ++start[p.prefix_entry(b) + 1];
  for (int64_t t = 0; t < T_; ++t) start[t + 1] += start[t];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t b = 0; b < p.B; ++b) rows[fill[p.prefix_entry(b)]++] = b;
  }
  int64_t max_rows = 0;
  for (int64_t t = 0; t < T_; ++t) max_rows = std::max(max_rows, start[t + 1] - start[t]);

  // A shared prefix has few (entry, head, block) tasks; split its rows into chunks so every
  // thread has work, and add the chunks' float32 partials afterwards in chunk order. The
  // partials are [chunks, T, Hkv, P, D], bounded by the thread count, never by B.
  const int64_t n_pblocks = ceil_div(P, kBlockN);
  const int64_t base_tasks = T_ * p.Hkv * n_pblocks;
  const int64_t want = ceil_div(2 * at::get_num_threads(), std::max<int64_t>(base_tasks, 1));
  int64_t chunks = std::clamp<int64_t>(want, 1, std::max<int64_t>(max_rows, 1));
  if (chunks * T_ * p.Hkv * P * D > (int64_t{1} << 26)) chunks = 1;
  std::vector<float> partial_k, partial_v;
  if (chunks > 1) {
    partial_k.resize(chunks * T_ * p.Hkv * P * D);
    partial_v.resize(partial_k.size());
  }

  const T* q = static_cast<const T*>(p.q.ptr);
  const T* dout = static_cast<const T*>(p.dout.ptr);
  const T* pk = static_cast<const T*>(p.prefix_k.ptr);
  const T* pv = static_cast<const T*>(p.prefix_v.ptr);
  T* dpk = static_cast<T*>(p.dprefix_k.ptr);
  T* dpv = static_cast<T*>(p.dprefix_v.ptr);

  parallel_tasks(base_tasks * chunks, [&](int64_t begin, int64_t end) {
    std::vector<float> kbuf(kBlockN * D), vbuf(kBlockN * D), qbuf(kBlockM * D), dobuf(kBlockM * D);
    std::vector<float> S(kBlockM * kBlockN), dP(kBlockM * kBlockN);
    std::vector<float> dk(kBlockN * D), dv(kBlockN * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % chunks;
      const int64_t pb = (task / chunks) % n_pblocks;
      const int64_t g = (task / chunks / n_pblocks) % p.Hkv;
      const int64_t t = task / chunks / n_pblocks / p.Hkv;
      const int64_t j0 = pb * kBlockN, bn = std::min(kBlockN, P - j0);
      const int64_t n_rows = start[t + 1] - start[t];
      const int64_t r_begin = start[t] + c * n_rows / chunks;
      const int64_t r_end = start[t] + (c + 1) * n_rows / chunks;

      int64_t ldk, ldv, ldq, lddo;
      const float* K = rows_as_float(pk + t * p.prefix_k.s[0] + g * p.prefix_k.s[1] + j0 * p.prefix_k.s[2],
                                     p.prefix_k.s[2], p.prefix_k.s[3], bn, D, kbuf.data(), &ldk);
      const float* V = rows_as_float(pv + t * p.prefix_v.s[0] + g * p.prefix_v.s[1] + j0 * p.prefix_v.s[2],
                                     p.prefix_v.s[2], p.prefix_v.s[3], bn, D, vbuf.data(), &ldv);
      std::fill(dk.begin(), dk.end(), 0.f);
      std::fill(dv.begin(), dv.end(), 0.f);

      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t b = rows[r];
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          for (int64_t i0 = 0; i0 < p.Nq; i0 += kBlockM) {
            const int64_t bm = std::min(kBlockM, p.Nq - i0);
            const int64_t row0 = (b * p.Hq + h) * p.Nq + i0;
            const float* Q = rows_as_float(q + b * p.q.s[0] + h * p.q.s[1] + i0 * p.q.s[2],
                                           p.q.s[2], p.q.s[3], bm, D, qbuf.data(), &ldq);
            const float* dO =
                rows_as_float(dout + b * p.dout.s[0] + h * p.dout.s[1] + i0 * p.dout.s[2],
                              p.dout.s[2], p.dout.s[3], bm, D, dobuf.data(), &lddo);
            gemm(false, true, bm, bn, D, p.scale, Q, ldq, K, ldk, 0.f, S.data(), kBlockN);
            gemm(false, true, bm, bn, D, 1.f, dO, lddo, V, ldv, 0.f, dP.data(), kBlockN);
            const DropoutTile drop{&p.dropout, true, b * p.Hq + h, i0, j0};
            probs_and_dscores(S.data(), dP.data(), kBlockN, bm, bn, st, row0,
                              p.dropout.enabled ? &drop : nullptr);
            gemm(true, false, bn, D, bm, 1.f, S.data(), kBlockN, dO, lddo, 1.f, dv.data(), D);
            gemm(true, false, bn, D, bm, 1.f, dP.data(), kBlockN, Q, ldq, 1.f, dk.data(), D);
          }
        }
      }

      if (chunks == 1) {
        store_rows(dk.data(), D, bn, D, p.scale,
                   dpk + t * p.dprefix_k.s[0] + g * p.dprefix_k.s[1] + j0 * p.dprefix_k.s[2],
                   p.dprefix_k.s[2], p.dprefix_k.s[3]);
        store_rows(dv.data(), D, bn, D, 1.f,
                   dpv + t * p.dprefix_v.s[0] + g * p.dprefix_v.s[1] + j0 * p.dprefix_v.s[2],
                   p.dprefix_v.s[2], p.dprefix_v.s[3]);
      } else {
        const int64_t off = (((c * T_ + t) * p.Hkv + g) * P + j0) * D;
        std::copy(dk.begin(), dk.begin() + bn * D, partial_k.begin() + off);
        std::copy(dv.begin(), dv.begin() + bn * D, partial_v.begin() + off);
      }
    }
  });

  if (chunks == 1) return;
  const int64_t slab = T_ * p.Hkv * P * D;
  parallel_tasks(T_ * p.Hkv * P, [&](int64_t begin, int64_t end) {
    std::vector<float> sk(D), sv(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t j = row % P, g = (row / P) % p.Hkv, t = row / P / p.Hkv;
      std::fill(sk.begin(), sk.end(), 0.f);
      std::fill(sv.begin(), sv.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* a = partial_k.data() + c * slab + row * D;
        const float* bb = partial_v.data() + c * slab + row * D;
        for (int64_t d = 0; d < D; ++d) {
          sk[d] += a[d];
          sv[d] += bb[d];
        }
      }
      store_rows(sk.data(), D, 1, D, p.scale,
                 dpk + t * p.dprefix_k.s[0] + g * p.dprefix_k.s[1] + j * p.dprefix_k.s[2],
                 p.dprefix_k.s[2], p.dprefix_k.s[3]);
      store_rows(sv.data(), D, 1, D, 1.f,
                 dpv + t * p.dprefix_v.s[0] + g * p.dprefix_v.s[1] + j * p.dprefix_v.s[2],
                 p.dprefix_v.s[2], p.dprefix_v.s[3]);
    }
  });
}

template <typename T>
void backward_impl(const BwdParams& p) {
  const RowStats st = backward_row_stats<T>(p);
  if (p.need_dq || p.need_dkv) backward_sequence<T>(p, st);
  if (p.need_dprefix && p.P > 0) backward_prefix<T>(p, st);
}

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat16: f(c10::Half{}); break;
    case DType::kBFloat16: f(c10::BFloat16{}); break;
  }
}

}  // namespace

void forward(const FwdParams& params) {
  if (params.B * params.Hq * params.Nq == 0) return;
  dispatch_dtype(params.dtype, [&](auto tag) { forward_impl<decltype(tag)>(params); });
}

void backward(const BwdParams& params) {
  if (params.B * params.Hq * params.Nq == 0) return;  // gradients were zero-filled by the caller
  dispatch_dtype(params.dtype, [&](auto tag) { backward_impl<decltype(tag)>(params); });
}

}  // namespace prefix_attn::PREFIX_ATTN_CPU_NS
