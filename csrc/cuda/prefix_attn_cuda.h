// The CUDA kernels' entry points. Plain C++: no torch, no CUDA headers, so the host glue can
// include it and nvcc can compile the kernels without torch.
#pragma once

#include <cstdint>

#include "../prefix_attn_params.h"

namespace prefix_attn::cuda {

// Device buffers the backward needs, allocated by the host glue (through torch's caching
// allocator) and sized by backward_workspace().
struct BwdWorkspace {
  float* delta = nullptr;          // [B, Hq, Nq]: rowsum(dout * out) - dlse
  const int64_t* rows = nullptr;   // [B]: rows grouped by the bank entry they use
  const int64_t* row_start = nullptr;  // [T + 1]: entry t's rows are rows[row_start[t] .. t+1)
  int64_t chunks = 1;              // row chunks per entry for dprefix
  float* dprefix_k_partial = nullptr;  // [chunks, T, Hkv, P, D] when chunks > 1
  float* dprefix_v_partial = nullptr;
};

// Chunks of (row, query tile) pairs for the prefix gradient: enough blocks to fill `sm_count`
// multiprocessors twice, one pair per chunk at most.
int64_t dprefix_chunks(const FwdParams& p, int sm_count);

// `stream` is a cudaStream_t.
void forward(const FwdParams& params, void* stream);
void backward(const BwdParams& params, const BwdWorkspace& ws, void* stream);

// Multiprocessors of CUDA device `device`, or 0 when the query fails.
int sm_count(int device);

// The error of the last CUDA call or launch on this thread (cudaGetLastError, which clears it),
// or nullptr when there was none.
const char* last_error();

}  // namespace prefix_attn::cuda
