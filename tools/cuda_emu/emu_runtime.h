// A lane-level host emulator of the CUDA subset the prefix_attn kernels use: one block at a time,
// each thread a ucontext fiber; __syncthreads, __shfl_xor_sync, ldmatrix and mma.sync are warp- or
// block-collectives computed when every participant has arrived (from the PTX ISA's documented
// fragment layouts, written independently of the kernels' own comments). cp.async copies land at
// the latest moment the ISA allows (at wait_group) or, in "early" mode, at issue; shared memory
// starts as 0xFF bytes (NaN in fp16 / fp32) so a read of a never-written element poisons the result.
// ldmatrix reads, cp.async writes and st.shared zero stores are shadow-tracked per byte for races
// without a barrier.
// Runs under AddressSanitizer: global buffers are allocated to their exact size.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };

struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
struct __half2 { __half x, y; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return float(f); }
inline __half __float2half_rn(float x) { _Float16 f = _Float16(x); __half h; std::memcpy(&h.x, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 h) { uint32_t u = uint32_t(h.x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline float __expf(float x) { return expf(x); }

namespace emu {

struct Copy { uint32_t dst; const void* src; int size; };
struct Thread {
  ucontext_t ctx;
  char* stack = nullptr;
  dim3 tid;
  bool done = false;
  std::vector<Copy> open;
  std::deque<std::vector<Copy>> groups;
};
struct Warp {
  int count = 0;
  uint64_t gen = 0;
  int kind[32];
  uint32_t in[32][12];
  uint32_t out[32][4];
};
struct State {
  dim3 grid, block_idx, block_dim;
  int nthreads = 0, cur = -1;
  std::vector<Thread> threads;
  ucontext_t sched;
  unsigned char* smem = nullptr;
  size_t smem_size = 0;
  int bar_count = 0;
  int bar_kind = 0;              // what the threads waiting at the barrier called: 1 plain, 2 _or
  bool bar_or = false, bar_or_result = false;
  uint64_t bar_gen = 0, progress = 0;
  Warp warps[32];
  int epoch = 0;
  std::vector<int> w_epoch, w_tid, r_epoch, r_tid;
  std::vector<char> pending;
  std::function<void()> entry;
  // options
  bool late_copies = true;
  int schedule = 0;  // 0 in order, 1 reversed, 2 random per round
  std::mt19937 rng{1234};
  int sm_count = 132;
  size_t max_smem_optin = 232448;  // sm_90: 227 KB
  // results
  long races = 0, oob = 0, misaligned = 0, pending_at_exit = 0;
  cudaError_t error = cudaSuccess;
  std::map<const void*, size_t> max_dyn_smem;
  std::map<std::string, size_t> launched_smem;
};
inline State& S() { static State s; return s; }

inline void fail(const char* what) {
  std::fprintf(stderr, "EMU FATAL: %s (block %u,%u,%u thread %d)\n", what, S().block_idx.x, S().block_idx.y,
               S().block_idx.z, S().cur);
  std::abort();
}

inline Thread& me() { return S().threads[S().cur]; }
inline void yield() { swapcontext(&me().ctx, &S().sched); }

// __syncthreads (kind 1) and __syncthreads_or (kind 2): every thread of the block must call the
// same one; the OR of the predicates is returned to all.
inline bool barrier(int kind, bool pred) {
  State& s = S();
  const uint64_t g = s.bar_gen;
  ++s.progress;
  if (s.bar_count == 0) s.bar_kind = kind;
  else if (s.bar_kind != kind) fail("threads of a block at different kinds of barrier");
  s.bar_or = s.bar_or || pred;
  if (++s.bar_count == s.nthreads) {
    s.bar_count = 0;
    s.bar_or_result = s.bar_or;
    s.bar_or = false;
    ++s.bar_gen;
    ++s.epoch;
  } else {
    while (s.bar_gen == g) yield();
  }
  // stable until this thread reaches the next barrier, which needs every thread
  return s.bar_or_result;
}
inline void syncthreads() { barrier(1, false); }

// A warp-wide operation: every lane deposits `in`, the last to arrive computes every lane's `out`.
template <typename F>
inline void collective(int kind, const uint32_t* in, int nin, uint32_t* out, int nout, F&& compute) {
  State& s = S();
  const int tid = int(me().tid.x), lane = tid % 32;
  Warp& W = s.warps[tid / 32];
  W.kind[lane] = kind;
  std::memcpy(W.in[lane], in, 4 * nin);
  const uint64_t g = W.gen;
  ++s.progress;
  if (++W.count == 32) {
    for (int l = 0; l < 32; ++l)
      if (W.kind[l] != kind) fail("lanes of a warp in different collectives (divergence)");
    compute(W);
    W.count = 0;
    ++W.gen;
  } else {
    while (W.gen == g) yield();
  }
  std::memcpy(out, W.out[lane], 4 * nout);
}

// ----- shared-memory shadow
inline void shadow_read(uint32_t off, int n, int tid) {
  State& s = S();
  if (off + n > s.smem_size) { ++s.oob; fail("shared-memory read out of bounds"); }
  for (uint32_t b = off; b < off + n; ++b) {
    if (s.pending[b]) { ++s.races; std::fprintf(stderr, "RACE: read of in-flight cp.async byte %u by %d\n", b, tid); }
    else if (s.w_epoch[b] == s.epoch && s.w_tid[b] != tid) {
      ++s.races;
      if (s.races < 10) std::fprintf(stderr, "RACE: byte %u written by %d, read by %d with no barrier between\n", b, s.w_tid[b], tid);
    }
    if (s.r_epoch[b] == s.epoch && s.r_tid[b] != tid) s.r_tid[b] = -1; else if (s.r_epoch[b] != s.epoch) s.r_tid[b] = tid;
    s.r_epoch[b] = s.epoch;
  }
}
inline void shadow_war(uint32_t off, int n, int tid) {
  State& s = S();
  for (uint32_t b = off; b < off + n; ++b)
    if (s.r_epoch[b] == s.epoch && s.r_tid[b] != tid) {
      ++s.races;
      if (s.races < 10) std::fprintf(stderr, "RACE: byte %u read by %d, overwritten by %d's cp.async with no barrier between\n", b, s.r_tid[b], tid);
    }
}
inline void apply_copy(const Copy& c, int tid) {
  State& s = S();
  shadow_war(c.dst, 16, tid);
  if (c.size == 16) std::memcpy(s.smem + c.dst, c.src, 16);
  else std::memset(s.smem + c.dst, 0, 16);
  for (uint32_t b = c.dst; b < c.dst + 16; ++b) {
    s.pending[b] = 0;
    s.w_epoch[b] = s.epoch;
    s.w_tid[b] = tid;
  }
}

template <typename T>
inline T* smem() { return reinterpret_cast<T*>(S().smem); }
inline uint32_t smem_offset(const void* p) {
  const auto d = reinterpret_cast<const unsigned char*>(p) - S().smem;
  if (d < 0 || size_t(d) > S().smem_size) fail("smem_addr of a pointer outside shared memory");
  return uint32_t(d);
}

// ----- launch
inline void trampoline() {
  S().entry();
  State& s = S();
  Thread& t = me();
  if (!t.open.empty() || !t.groups.empty()) ++s.pending_at_exit;
  for (auto& g : t.groups) for (auto& c : g) apply_copy(c, s.cur);
  for (auto& c : t.open) apply_copy(c, s.cur);
  t.done = true;
  swapcontext(&t.ctx, &s.sched);
}

inline void run_block(size_t smem_bytes) {
  State& s = S();
  const int n = int(s.block_dim.x);
  s.nthreads = n;
  s.smem_size = smem_bytes;
  s.smem = new unsigned char[smem_bytes ? smem_bytes : 1];
  std::memset(s.smem, 0xFF, smem_bytes);
  s.w_epoch.assign(smem_bytes, -1); s.w_tid.assign(smem_bytes, -1);
  s.r_epoch.assign(smem_bytes, -1); s.r_tid.assign(smem_bytes, -1);
  s.pending.assign(smem_bytes, 0);
  s.epoch = 0; s.bar_count = 0; s.bar_or = false;
  for (auto& w : s.warps) w.count = 0;
  s.threads.assign(n, Thread{});
  // small stacks: ASan clears a fiber's whole stack shadow on every switch
  static const size_t kStack = size_t(std::getenv("EMU_STACK_KB") ? std::atoi(std::getenv("EMU_STACK_KB")) : 256) << 10;
  for (int i = 0; i < n; ++i) {
    Thread& t = s.threads[i];
    t.tid = dim3(unsigned(i), 0, 0);
    t.stack = static_cast<char*>(std::malloc(kStack));
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, trampoline, 0);
  }
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  int alive = n;
  while (alive > 0) {
    if (s.schedule == 1) std::reverse(order.begin(), order.end());
    if (s.schedule == 2) std::shuffle(order.begin(), order.end(), s.rng);
    const uint64_t before = s.progress;
    int finished = 0;
    for (int i : order) {
      if (s.threads[i].done) continue;
      s.cur = i;
      swapcontext(&s.sched, &s.threads[i].ctx);
      if (s.threads[i].done) { ++finished; --alive; }
    }
    if (alive > 0 && finished == 0 && s.progress == before) fail("deadlock: threads wait at a barrier or collective others never reach");
  }
  for (auto& t : s.threads) std::free(t.stack);
  s.threads.clear();
  delete[] s.smem;
  s.smem = nullptr;
  s.cur = -1;
}

template <typename K>
struct Launch {
  K kernel;
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A... args) {
    State& s = S();
    auto it = s.max_dyn_smem.find(reinterpret_cast<const void*>(kernel));
    const size_t allowed = it == s.max_dyn_smem.end() ? 48 * 1024 : std::max<size_t>(48 * 1024, it->second);
    if (smem > allowed || grid.y > 65535 || grid.z > 65535 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        block.x > 1024) {
      std::fprintf(stderr, "EMU: launch refused (grid %u,%u,%u block %u smem %zu allowed %zu)\n", grid.x, grid.y,
                   grid.z, block.x, smem, allowed);
      s.error = cudaErrorInvalidConfiguration;
      return;
    }
    auto tup = std::make_tuple(args...);
    s.entry = [&] { std::apply(kernel, tup); };
    s.grid = grid;
    s.block_dim = block;
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          s.block_idx = dim3(x, y, z);
          run_block(smem);
        }
  }
};
template <typename K>
Launch<K> launch(K kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<K>{kernel, grid, block, smem};
}

}  // namespace emu

#define threadIdx (emu::me().tid)
#define blockIdx (emu::S().block_idx)
#define gridDim (emu::S().grid)
#define blockDim (emu::S().block_dim)

inline void __syncthreads() { emu::syncthreads(); }
inline int __syncthreads_or(int pred) { return emu::barrier(2, pred != 0); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lanemask) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) emu::fail("partial shuffle mask");
  uint32_t in, out;
  std::memcpy(&in, &v, 4);
  emu::collective(0x100 | lanemask, &in, 1, &out, 1, [&](emu::Warp& W) {
    for (int l = 0; l < 32; ++l) W.out[l][0] = W.in[l ^ lanemask][0];
  });
  T r;
  std::memcpy(&r, &out, 4);
  return r;
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute, int value) {
  if (size_t(value) > emu::S().max_smem_optin) { emu::S().error = cudaErrorInvalidValue; return cudaErrorInvalidValue; }
  emu::S().max_dyn_smem[reinterpret_cast<const void*>(kernel)] = size_t(value);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu::S().sm_count : int(emu::S().max_smem_optin);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaGetLastError() { const cudaError_t e = emu::S().error; emu::S().error = cudaSuccess; return e; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated launch error"; }
