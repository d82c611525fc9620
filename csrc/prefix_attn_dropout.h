// The attention-dropout stream: which probabilities a call drops, as a pure function of
// (seed, offset, batch row, query head, query, key). Every backend computes it from this
// definition, so a forward and its backward (and the Python copy in prefix_attn/_dropout.py,
// which the reference backend and the tests use) agree bit for bit without storing a mask.
//
//   key     (k0, k1) = (seed & 0xffffffff, seed >> 32)
//   counter (c0, c1, c2, c3) = ((col >> 2) | (is_prefix << 31), i, b * Hq + h, offset)
//   r       = Philox4x32-10(counter, key)[col & 3]
//   keep    iff r >= threshold, threshold = floor(dropout_p * 2^32) (exact in double; < 2^32 as p < 1)
//
// col is the key's index within its segment (prefix key p, or sequence key n), so a tile of
// four-aligned columns of one segment takes its four words from a single Philox call. Kept
// probabilities are scaled by 1 / (1 - dropout_p). Torch-free: included by the CPU kernels,
// the CUDA kernels and their host glue.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PREFIX_ATTN_HD __host__ __device__ __forceinline__
#else
#define PREFIX_ATTN_HD inline
#endif

namespace prefix_attn {

struct DropoutParams {
  bool enabled = false;        // dropout_p > 0
  uint32_t threshold = 0;      // keep iff r >= threshold
  float scale = 1.f;           // 1 / (1 - dropout_p)
  uint64_t seed = 0;
  uint32_t offset = 0;
};

PREFIX_ATTN_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11), the variant cuRAND, torch and Triton's
// tl.philox use. c is the counter on entry and the four random words on exit.
PREFIX_ATTN_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0 = c[0], c2 = c[2];
    c[0] = philox_mulhi(kMulB, c2) ^ c[1] ^ k0;
    c[2] = philox_mulhi(kMulA, c0) ^ c[3] ^ k1;
    c[1] = kMulB * c2;
    c[3] = kMulA * c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

// The four words for columns 4*col4 .. 4*col4 + 3 of one segment, for query i of row-head bh.
PREFIX_ATTN_HD void dropout_words4(const DropoutParams& d, bool is_prefix, int64_t bh, int64_t i, int64_t col4,
                                   uint32_t r[4]) {
  r[0] = static_cast<uint32_t>(col4) | (is_prefix ? 0x80000000u : 0u);
  r[1] = static_cast<uint32_t>(i);
  r[2] = static_cast<uint32_t>(bh);
  r[3] = d.offset;
  philox4x32_10(r, static_cast<uint32_t>(d.seed), static_cast<uint32_t>(d.seed >> 32));
}

// Whether one probability is kept. Kernels that walk four columns at a time call
// dropout_words4 once instead.
PREFIX_ATTN_HD bool dropout_keep(const DropoutParams& d, bool is_prefix, int64_t bh, int64_t i, int64_t col) {
  uint32_t r[4];
  dropout_words4(d, is_prefix, bh, i, col >> 2, r);
  return r[col & 3] >= d.threshold;
}

}  // namespace prefix_attn
