// Warp-level tensor-core building blocks for the 16-bit kernels (sm_80+): mma.sync m16n8k16 with
// float32 accumulation, ldmatrix, cp.async, and the shared-memory tile layout they read.
//
// Why inline PTX rather than nvcuda::wmma: wmma's fragment layout is opaque, and the attention
// kernels must know which (row, column) each accumulator register holds, to mask, to run the
// online softmax per row, and to turn the score accumulator into the next MMA's A operand
// without a round trip through shared memory. The PTX ISA documents these layouts; the ones used
// here (lane = 4 * grp + tig, grp = lane / 4, tig = lane % 4):
//
//   A, 16x16 row-major, 4 x b32 (2 halves each):  a0 (grp,   2tig..+1)   a1 (grp+8, 2tig..+1)
//                                                 a2 (grp, 8+2tig..+1)   a3 (grp+8, 8+2tig..+1)
//   B, 16x8 (k x n),    2 x b32:                  b0 (k = 2tig..+1, n = grp)  b1 (k = 8+2tig..+1, n = grp)
//   C, 16x8 float32,    4 x f32:                  c0, c1 (grp, 2tig..+1)  c2, c3 (grp+8, 2tig..+1)
//
// ldmatrix .x4 loads four 8x8 16-bit matrices; lanes 8m..8m+7 give the row addresses of matrix m,
// and register m of every lane receives matrix m's elements (row lane/4, columns 2(lane%4)..+1),
// or with .trans its transpose. Hence, for an operand stored row-major in shared memory:
//   - A (rows x k): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15);
//   - B of X·Yᵀ, Y stored [n][k]: a plain load of Y's rows gives b0 / b1 directly;
//   - B of P·Y,  Y stored [k][n]: a .trans load of Y's rows gives b0 / b1.
// And C of one MMA is A of the next: the C fragments of n-blocks 2j, 2j+1 of S = Q·Kᵀ, packed to
// 16 bits, are exactly the A fragment of k-block j of P·V (a0 = c[2j][0..1], a1 = c[2j][2..3],
// a2 = c[2j+1][0..1], a3 = c[2j+1][2..3]).
//
// Shared-memory tiles are [rows][kD + 8] 16-bit elements. The 16-byte pad puts consecutive rows
// 4 banks apart, so the eight row addresses of each ldmatrix matrix (and of cp.async's 16-byte
// stores) fall in eight distinct groups of 4 banks: conflict-free. We pad rather than XOR-swizzle
// because the padded layout serves every head dim that is a multiple of 16 (80, 96, 208 are not a
// whole number of 128-byte swizzle atoms), at a cost of 8 / kD of the tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "prefix_attn_tiles.cuh"

namespace prefix_attn::cuda::mma {

constexpr int kWarpThreads = 32;

template <int kD>
__host__ __device__ constexpr int pitch() {
  return kD + 8;
}

// --------------------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// `row_addr`: this lane's row address in the shared window (smem_addr), as 32 bits: the
// unrolled loops then add constant offsets to one register instead of keeping 64-bit pointers.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row_addr));
}

// d += a · b, 16x8x16, float32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one b32 of 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// 16 bytes global -> shared, asynchronously (sm_80). When !valid nothing is read (src-size 0)
// and the 16 bytes are zero-filled; `src` must still be a mapped address, the caller passes the
// tile's base.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// 16 zero bytes to shared memory (16-byte aligned). PTX rather than a C++ store so that the
// emulator can track it as a write for its race checks, like cp.async.
__device__ __forceinline__ void st_shared_zero_16(void* dst) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(smem_addr(dst)), "r"(0) : "memory");
}

// --------------------------------------------------------------------------- tiles

// Copies rows [row0, row0 + kRows) of a strided [rows, D] slab into a [kRows][pitch<kD>()] shared
// tile, by all kThreads threads of the block. Rows at or past `n_rows` and columns at or past D
// are zero-filled, so a tail tile or a head dim below kD adds zeros to every product. With
// contiguous, 16-byte aligned rows it issues cp.async (the caller commits and waits); otherwise
// (a transposed or sliced view) it loads element by element, synchronously.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(T* tile, const T* src, int64_t row_stride, int64_t col_stride, int64_t row0,
                                          int64_t n_rows, int64_t D) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  const bool vec = col_stride == 1 && row_stride % 8 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
#pragma unroll
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kThreads) {
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = r < n_rows && c * 8 < D;  // D % 8 == 0 on this path: a chunk is all in or all out
    T* dst = tile + r * pitch<kD>() + c * 8;
    const T* from = src + (row0 + r) * row_stride + int64_t(c) * 8 * col_stride;
    if (vec) {
      cp_async_16(dst, valid ? from : src, valid);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = valid ? from[e * col_stride] : from_float<T>(0.f);
    }
  }
}

// Zeroes row r of a [rows][pitch<kD>()] shared tile, by the calling thread alone.
template <typename T, int kD>
__device__ __forceinline__ void zero_tile_row(T* tile, int r) {
#pragma unroll
  for (int c = 0; c < kD / 8; ++c) st_shared_zero_16(tile + r * pitch<kD>() + c * 8);
}

// acc[16 x 8*kN] += A[16 x kK] · B[8*kN x kK]ᵀ: A's 16 rows start at `a` and B's 8*kN rows at `b`,
// both row-major shared tiles of pitch kPitch (the reduction dimension runs along the row).
template <typename T, int kN, int kK, int kPitch>
__device__ __forceinline__ void gemm_abt(float (&acc)[kN][4], const T* a, const T* b) {
  static_assert(kN % 2 == 0, "B is loaded 16 rows at a time");
  const int lane = threadIdx.x % kWarpThreads;
  // A: lane gives row lane % 16 of columns +0 (lanes 0-15) or +8 (lanes 16-31).
  const uint32_t a_row = smem_addr(a + (lane % 16) * kPitch + (lane / 16) * 8);
  // B: matrices (rows 0-7, k+0), (rows 0-7, k+8), (rows 8-15, k+0), (rows 8-15, k+8): b0, b1 of
  // n-block 2j, then b0, b1 of n-block 2j+1.
  const uint32_t b_row = smem_addr(b + ((lane % 8) + (lane / 16) * 8) * kPitch + ((lane / 8) % 2) * 8);
#pragma unroll
  for (int k = 0; k < kK; k += 16) {
    uint32_t af[4];
    ldmatrix_x4(af, a_row + k * sizeof(T));
#pragma unroll
    for (int n = 0; n < kN; n += 2) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b_row + (n * 8 * kPitch + k) * sizeof(T));
      mma_16816<T>(acc[n], af, bf[0], bf[1]);
      mma_16816<T>(acc[n + 1], af, bf[2], bf[3]);
    }
  }
}

// acc[16 x 8*kN] += P[16 x 16*kK] · B[16*kK x 8*kN]: P as A fragments in registers (from
// to_a_fragments), B's rows (the reduction dimension) start at `b`, columns at b's column 0, in a
// row-major shared tile of pitch kPitch.
template <typename T, int kN, int kK, int kPitch>
__device__ __forceinline__ void gemm_pb(float (&acc)[kN][4], const uint32_t (&pf)[kK][4], const T* b) {
  static_assert(kN % 2 == 0, "B is loaded 16 columns at a time");
  const int lane = threadIdx.x % kWarpThreads;
  // .trans matrices (k 0-7, n+0), (k 8-15, n+0), (k 0-7, n+8), (k 8-15, n+8): b0, b1 of n-block
  // 2j, then of 2j+1.
  const uint32_t b_row = smem_addr(b + ((lane % 8) + ((lane / 8) % 2) * 8) * kPitch + (lane / 16) * 8);
#pragma unroll
  for (int k = 0; k < kK; ++k) {
#pragma unroll
    for (int n = 0; n < kN; n += 2) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b_row + (k * 16 * kPitch + n * 8) * sizeof(T));
      mma_16816<T>(acc[n], pf[k], bf[0], bf[1]);
      mma_16816<T>(acc[n + 1], pf[k], bf[2], bf[3]);
    }
  }
}

// The C fragments of a [16 x 8*kN] float accumulator as the A fragments of the next product
// (see the header comment), rounded to 16 bits.
template <typename T, int kN>
__device__ __forceinline__ void to_a_fragments(uint32_t (&af)[kN / 2][4], const float (&c)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN / 2; ++j) {
    af[j][0] = pack2<T>(c[2 * j][0], c[2 * j][1]);
    af[j][1] = pack2<T>(c[2 * j][2], c[2 * j][3]);
    af[j][2] = pack2<T>(c[2 * j + 1][0], c[2 * j + 1][1]);
    af[j][3] = pack2<T>(c[2 * j + 1][2], c[2 * j + 1][3]);
  }
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int n = 0; n < kN; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
}

// Stores a [16 x 8*kN] float accumulator, times `mul`, as T: local row r (0..15) goes to
// base + (row0 + r) * row_stride, column d0 + c to + (d0 + c) * col_stride; rows at or past
// n_rows and columns at or past D are skipped. Runs once per block after its main loop, so plain
// strided stores serve every layout.
template <typename T, int kN>
__device__ __forceinline__ void store_acc(const float (&acc)[kN][4], T* base, int64_t row_stride, int64_t col_stride,
                                          int64_t n_rows, int d0, int64_t D, float mul) {
  const int lane = threadIdx.x % kWarpThreads, grp = lane / 4, tig = lane % 4;
#pragma unroll
  for (int n = 0; n < kN; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = grp + (e / 2) * 8;
      const int64_t d = d0 + n * 8 + 2 * tig + e % 2;
      if (r < n_rows && d < D) base[r * row_stride + d * col_stride] = from_float<T>(acc[n][e] * mul);
    }
  }
}

}  // namespace prefix_attn::cuda::mma
