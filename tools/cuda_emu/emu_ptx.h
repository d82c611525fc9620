// The emulator's stand-ins for the PTX wrappers of prefix_attn_mma.cuh (same names and
// signatures; included inside namespace prefix_attn::cuda::mma by prepare.py's copy).
// Layouts from the PTX ISA (9.7.14.5.8 mma.m16n8k16, 9.7.14.5.15 ldmatrix), lane = 4 * grp + tig:
//   A (.f16/.bf16, 16x16): a0,a1: (grp, 2tig+{0,1}); a2,a3: (grp+8, ..); a4,a5: (grp, 8+2tig+..);
//                          a6,a7: (grp+8, 8+2tig+..); element 2r in the low half of register r.
//   B (16x8): b0,b1: (k = 2tig+{0,1}, n = grp); b2,b3: (k = 8+2tig+.., n = grp)
//   C/D (16x8 f32): c0,c1: (grp, 2tig+{0,1}); c2,c3: (grp+8, 2tig+..)
//   ldmatrix: lanes 8m..8m+7 give rows 0..7 of matrix m; lane t receives in register m the
//   elements (t/4, 2(t%4)) and (t/4, 2(t%4)+1) of matrix m, or with .trans of its transpose,
//   i.e. the stored elements (2(t%4), t/4) and (2(t%4)+1, t/4).

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return emu::smem_offset(p); }

inline uint16_t emu_smem16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, emu::S().smem + addr, 2);
  return v;
}

inline void emu_ldmatrix(uint32_t (&r)[4], uint32_t row_addr, bool trans) {
  uint32_t out[4];
  emu::collective(trans ? 3 : 2, &row_addr, 1, out, 4, [&](emu::Warp& W) {
    const int wbase = int(emu::me().tid.x) / 32 * 32;
    for (int l = 0; l < 32; ++l) {
      const uint32_t a = W.in[l][0];
      if (a % 16 != 0) { ++emu::S().misaligned; emu::fail("ldmatrix row address not 16-byte aligned"); }
      emu::shadow_read(a, 16, wbase + l);
    }
    for (int t = 0; t < 32; ++t)
      for (int m = 0; m < 4; ++m) {
        uint16_t lo, hi;
        if (!trans) {
          const uint32_t row = W.in[8 * m + t / 4][0];
          lo = emu_smem16(row + 2 * (2 * (t % 4)));
          hi = emu_smem16(row + 2 * (2 * (t % 4) + 1));
        } else {
          lo = emu_smem16(W.in[8 * m + 2 * (t % 4)][0] + 2 * (t / 4));
          hi = emu_smem16(W.in[8 * m + 2 * (t % 4) + 1][0] + 2 * (t / 4));
        }
        W.out[t][m] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
  });
  for (int m = 0; m < 4; ++m) r[m] = out[m];
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t row_addr) { emu_ldmatrix(r, row_addr, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row_addr) { emu_ldmatrix(r, row_addr, true); }

inline float emu_to_f(uint16_t v, bool bf16) { return bf16 ? __bfloat162float(__nv_bfloat16{v}) : __half2float(__half{v}); }

inline void emu_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1};
  std::memcpy(in + 6, d, 16);
  uint32_t out[4];
  emu::collective(bf16 ? 5 : 4, in, 10, out, 4, [&](emu::Warp& W) {
    float A[16][16], B[16][8], C[16][8];
    int seenA[16][16] = {}, seenB[16][8] = {}, seenC[16][8] = {};
    for (int t = 0; t < 32; ++t) {
      const int grp = t / 4, tig = t % 4;
      for (int i = 0; i < 8; ++i) {  // a_i, i = 2 * register + half
        const int row = grp + ((i / 2) % 2) * 8, col = 2 * tig + (i % 2) + (i / 4) * 8;
        const uint16_t v = uint16_t(W.in[t][i / 2] >> (16 * (i % 2)));
        A[row][col] = emu_to_f(v, bf16);
        ++seenA[row][col];
      }
      for (int i = 0; i < 4; ++i) {  // b_i
        const int k = 2 * tig + (i % 2) + (i / 2) * 8, n = grp;
        const uint16_t v = uint16_t(W.in[t][4 + i / 2] >> (16 * (i % 2)));
        B[k][n] = emu_to_f(v, bf16);
        ++seenB[k][n];
      }
      for (int i = 0; i < 4; ++i) {  // c_i
        const int row = grp + (i / 2) * 8, col = 2 * tig + i % 2;
        std::memcpy(&C[row][col], &W.in[t][6 + i], 4);
        ++seenC[row][col];
      }
    }
    for (auto& r : seenA) for (int v : r) if (v != 1) emu::fail("A layout not a bijection");
    for (auto& r : seenB) for (int v : r) if (v != 1) emu::fail("B layout not a bijection");
    for (auto& r : seenC) for (int v : r) if (v != 1) emu::fail("C layout not a bijection");
    for (int t = 0; t < 32; ++t) {
      const int grp = t / 4, tig = t % 4;
      for (int i = 0; i < 4; ++i) {
        const int row = grp + (i / 2) * 8, col = 2 * tig + i % 2;
        double acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
        const float f = float(acc);
        std::memcpy(&W.out[t][i], &f, 4);
      }
    }
  });
  std::memcpy(d, out, 16);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma(d, a, b0, b1, std::is_same<T, __nv_bfloat16>::value);
}

// pack2: the real code, verbatim.
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

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const uint32_t off = emu::smem_offset(dst);
  if (off % 16 != 0 || off + 16 > emu::S().smem_size) emu::fail("cp.async destination misaligned or out of bounds");
  if (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::fail("cp.async source not 16-byte aligned");
  const emu::Copy c{off, src, valid ? 16 : 0};
  const int tid = int(emu::me().tid.x);
  if (emu::S().late_copies) {
    emu::shadow_war(off, 16, tid);
    for (uint32_t b = off; b < off + 16; ++b) emu::S().pending[b] = 1;
    emu::me().open.push_back(c);
  } else {
    emu::apply_copy(c, tid);
  }
}

// st.shared.v4 of zeros, shadow-tracked as a write: a read of it by another thread, or its
// overwriting of bytes another thread read or a cp.async has in flight, without a barrier
// between, is a race.
__device__ __forceinline__ void st_shared_zero_16(void* dst) {
  auto& s = emu::S();
  const uint32_t off = emu::smem_offset(dst);
  if (off % 16 != 0 || off + 16 > s.smem_size) { ++s.misaligned; emu::fail("st.shared.v4 misaligned or out of bounds"); }
  const int tid = int(emu::me().tid.x);
  emu::shadow_war(off, 16, tid);
  for (uint32_t b = off; b < off + 16; ++b) {
    if (s.pending[b]) { ++s.races; std::fprintf(stderr, "RACE: store over in-flight cp.async byte %u by %d\n", b, tid); }
    s.w_epoch[b] = s.epoch;
    s.w_tid[b] = tid;
  }
  std::memset(s.smem + off, 0, 16);
}

__device__ __forceinline__ void cp_async_commit() {
  emu::me().groups.push_back(std::move(emu::me().open));
  emu::me().open.clear();
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  auto& t = emu::me();
  while (int(t.groups.size()) > kPending) {
    for (auto& c : t.groups.front()) emu::apply_copy(c, int(t.tid.x));
    t.groups.pop_front();
  }
}
