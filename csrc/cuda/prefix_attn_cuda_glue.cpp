// Host glue for the CUDA kernels: the device guard and stream, the backward's workspace
// (allocated through torch's caching allocator), and limits the kernels cannot take. Inputs
// were validated by prefix_attn_api.cpp, shared with the CPU path. Built only with CUDA.
//
// It includes no CUDA header, torch's or the toolkit's: the device guard and the current stream
// both come from c10's device-generic guard interface (c10/core), which libc10_cuda implements
// for CUDA. So the same source compiles against the CPU torch wheel, and `make cuda-check`
// checks on a machine without a CUDA build of torch exactly what a CUDA build compiles.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <optional>

#include "prefix_attn_cuda.h"

namespace prefix_attn::cuda_glue {

namespace {
constexpr int64_t kMaxHeadDim = 256;  // the SIMT kernels' kMaxPerLane * 32, the tensor-core kernels' largest tile
// The kernels put query tiles or key tiles on the grid's y axis, at most 65535 blocks; the
// smallest tiles are the SIMT kernels' (16 queries, 8 keys), and batch rows times heads go on x.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxQueries = 16 * kMaxGridY, kMaxKeys = 8 * kMaxGridY;

void check_sizes(const FwdParams& p, const at::Tensor& q) {
  TORCH_CHECK_NOT_IMPLEMENTED(p.D <= kMaxHeadDim, "prefix_attn: the cuda backend runs head dims up to ",
                              kMaxHeadDim, "; q has shape ", q.sizes());
  TORCH_CHECK_NOT_IMPLEMENTED(p.Nq <= kMaxQueries && p.Nk <= kMaxKeys && p.P <= kMaxKeys,
                              "prefix_attn: the cuda backend runs up to ", kMaxQueries, " queries and ", kMaxKeys,
                              " keys in the sequence and in the prefix; got Nq = ", p.Nq, ", Nk = ", p.Nk,
                              ", P = ", p.P, " (q has shape ", q.sizes(), ")");
  TORCH_CHECK_NOT_IMPLEMENTED(p.B * p.Hq <= INT32_MAX && p.T * p.Hkv <= INT32_MAX,
                              "prefix_attn: the cuda backend runs up to 2^31 - 1 (batch row, head) pairs; q has shape ",
                              q.sizes());
}

// torch's current CUDA stream on q's device, as a cudaStream_t: c10::cuda::getCurrentCUDAStream
// reached through the CUDA guard implementation that libc10_cuda registers when torch loads it.
// Every symbol on this path is libc10's, which the extension needs anyway; setup.py also makes
// libc10_cuda a DT_NEEDED of the extension, so the implementation is loaded whenever we are
// (tools/cuda_link_check.sh checks both against a CUDA torch).
// (Once, the AOTI shim's aoti_torch_get_current_cuda_stream, referenced weakly, resolved to
// null at load: --as-needed had dropped libtorch_cuda, which only that weak reference used.)
// Without a CUDA build of torch, getDeviceGuardImpl throws "not linked with support for cuda".
void* current_stream(const at::Tensor& q) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return impl->getStreamNativeHandle(impl->getStream(q.device()));
}

void check_launch(const char* what) {
  const char* err = cuda::last_error();
  TORCH_CHECK(err == nullptr, "prefix_attn: the CUDA ", what, " kernels failed: ", err);
}
}  // namespace

void forward(const FwdParams& p, const at::Tensor& q) {
  check_sizes(p, q);
  const c10::DeviceGuard guard(q.device());
  cuda::forward(p, current_stream(q));
  check_launch("forward");
}

void backward(const BwdParams& p, const at::Tensor& q, const std::optional<at::Tensor>& prefix_index,
              const at::Tensor& lse, at::Tensor& dprefix_k, at::Tensor& dprefix_v) {
  check_sizes(p, q);
  if (p.mask_kind == MaskKind::kFloat && p.P == 0) {
    // A row whose visible scores all sit near finfo.min (a float mask hiding every key) lost
    // log(l) in its float32 lse; the probabilities rebuilt from it would be wrong. Only possible
    // with P == 0: every row sees the prefix keys, whose scores no mask touches. The test reads
    // its answer back (a host sync), so a call with a prefix does not make it.
    const bool huge = (lse.abs().gt(1048576.0) & lse.isfinite()).any().item<bool>();
    TORCH_CHECK_NOT_IMPLEMENTED(!huge,
                                "prefix_attn: the cuda backward cannot rebuild rows whose every visible key has an "
                                "additive mask near finfo.min; use a bool mask or key_padding_mask for padding");
  }
  const c10::DeviceGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  const auto i64 = q.options().dtype(at::kLong);

  at::Tensor delta = at::empty({p.B * p.Hq * p.Nq}, f32);
  at::Tensor rows, row_start, partial_k, partial_v;
  cuda::BwdWorkspace ws;
  ws.delta = delta.data_ptr<float>();
  if (p.need_dprefix && p.P > 0) {
    // No host reads and no host-to-device copies here: either would synchronise the stream on
    // every call (at::bincount reads the index's min and max back to size its output).
    if (prefix_index.has_value()) {
      auto [entries, order] = at::sort(*prefix_index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      rows = order;
      row_start = at::searchsorted(entries, at::arange(p.T + 1, i64));
    } else {
      rows = at::arange(p.B, i64);
      row_start = p.T == 1 ? at::arange(2, i64).mul_(p.B) : at::arange(p.B + 1, i64);
    }
    ws.rows = rows.data_ptr<int64_t>();
    ws.row_start = row_start.data_ptr<int64_t>();
    ws.chunks = cuda::dprefix_chunks(p, cuda::sm_count(q.device().index()));
    if (ws.chunks > 1) {
      partial_k = at::empty({ws.chunks, p.T, p.Hkv, p.P, p.D}, f32);
      partial_v = at::empty_like(partial_k);
      ws.dprefix_k_partial = partial_k.data_ptr<float>();
      ws.dprefix_v_partial = partial_v.data_ptr<float>();
    }
  }
  cuda::backward(p, ws, current_stream(q));
  check_launch("backward");
  if (ws.chunks > 1) {  // chunk partials, summed in a fixed order: deterministic
    dprefix_k.copy_(partial_k.sum(0));
    dprefix_v.copy_(partial_v.sum(0));
  }
}

}  // namespace prefix_attn::cuda_glue
