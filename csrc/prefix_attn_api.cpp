// Torch-facing glue: validates the tensors, allocates outputs, fills the plain params structs
// and hands them to the kernels of the tensors' device. The ops are registered with
// torch.library (schema here, CPU / CUDA kernels here, fake kernels and autograd in
// prefix_attn/_ops.py), so that torch.compile sees each as one opaque op.
//
// Users may call torch.ops.prefix_attn.* directly, bypassing the Python checks, so every input
// is checked again here; errors are ValueError / TypeError / NotImplementedError naming the
// argument and the shape it got. prefix_index's values are checked only here, by the ops that
// index the bank with them (on CUDA as a device-side assert: see check_index_range).
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <optional>
#include <string>

#include "cpu/prefix_attn_cpu.h"
#include "cpu/prefix_attn_cpu_dispatch.h"
#include "prefix_attn_params.h"

#ifdef PREFIX_ATTN_WITH_CUDA
// csrc/cuda/prefix_attn_cuda_glue.cpp: stream, workspace, and the kernels' own limits.
namespace prefix_attn::cuda_glue {
void forward(const FwdParams& p, const at::Tensor& q);
void backward(const BwdParams& p, const at::Tensor& q, const std::optional<at::Tensor>& prefix_index,
              const at::Tensor& lse, at::Tensor& dprefix_k, at::Tensor& dprefix_v);
}  // namespace prefix_attn::cuda_glue
#endif

namespace prefix_attn {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Debug aid for tests: fill every output with NaN before a kernel runs, so an element the
// kernel forgets to write cannot pass for a correct one.
std::atomic<bool> g_poison_outputs{false};

Tensor alloc_like(const Tensor& t) {
  Tensor out = at::empty_like(t);  // preserves a dense layout, e.g. a transposed [B, N, H, D]
  if (g_poison_outputs.load()) out.fill_(std::nan(""));
  return out;
}

Tensor alloc(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor out = at::empty(sizes, opts);
  if (g_poison_outputs.load()) out.fill_(std::nan(""));
  return out;
}

struct Sizes {
  int64_t B, Hq, Hkv, Nq, Nk, P, T, D;
};

void check_dtype(const Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "prefix_attn: ", name, " must have dtype ", want,
                   " like q, got ", t.scalar_type(), " with shape ", t.sizes());
}

void check_device(const Tensor& t, const char* name, const Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), "prefix_attn: ", name, " is on ", t.device(),
                    " but q is on ", q.device());
}

// prefix_index's values must lie in [0, T) for the bank prefix_k (as check_prefix_index_range in
// prefix_attn/_inputs.py). On CPU a host read is free: the exact check, naming the values seen.
// On CUDA a host read would wait for the stream on every call (and keep a training step out of a
// CUDA graph), so it is a device-side assert, as torch's own index ops do: queued on the current
// stream before our kernels, and a failed device assert stops all later work on the device, so
// no kernel reads out of bounds. The error surfaces at the next synchronisation.
// `on_device` is !idx.is_cpu(), except in the test aid _check_prefix_index_range.
void check_index_range(const Tensor& idx, const Tensor& prefix_k, bool on_device) {
  const int64_t T = prefix_k.size(0);
  if (idx.numel() == 0) return;
  if (!on_device) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < T, "prefix_attn: prefix_index values must lie in [0, ", T,
                      ") for a bank of shape ", prefix_k.sizes(), ", got values in [", lo, ", ",
                      hi, "]");
    return;
  }
  const std::string msg = c10::str("prefix_attn: prefix_index values must lie in [0, ", T,
                                   ") for a bank of shape ", prefix_k.sizes());
  at::_assert_async(idx.ge(0).logical_and_(idx.lt(T)).all(), msg);
}

Sizes check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& prefix_k,
                   const OptTensor& prefix_v, const OptTensor& prefix_index,
                   const OptTensor& key_padding_mask, const OptTensor& attn_mask, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, "prefix_attn: q must be 4-D [B, Hq, Nq, D], got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "prefix_attn: k must be 4-D [B, Hkv, Nk, D], got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "prefix_attn: v must have k's shape ", k.sizes(),
                    ", got ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "prefix_attn: q must be float32, float16 or bfloat16, got ", dtype);
  check_dtype(k, "k", dtype);
  check_dtype(v, "v", dtype);
  check_device(k, "k", q);
  check_device(v, "v", q);

  Sizes s{};
  s.B = q.size(0);
  s.Hq = q.size(1);
  s.Nq = q.size(2);
  s.D = q.size(3);
  s.Hkv = k.size(1);
  s.Nk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == s.B && k.size(3) == s.D,
                    "prefix_attn: k must be [B, Hkv, Nk, D] with q's B and D; q has shape ",
                    q.sizes(), ", k has shape ", k.sizes());
  TORCH_CHECK_VALUE(s.D >= 1, "prefix_attn: head dim D must be at least 1, q has shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(s.Hkv >= 1 && s.Hq % s.Hkv == 0,
                    "prefix_attn: q's heads must be a multiple of k's heads (MHA, GQA, MQA); q "
                    "has shape ", q.sizes(), ", k has shape ", k.sizes());
  TORCH_CHECK_VALUE(std::isfinite(scale), "prefix_attn: scale must be finite, got ", scale);

  TORCH_CHECK_VALUE(prefix_k.has_value() == prefix_v.has_value(),
                    "prefix_attn: give both prefix_k and prefix_v, or neither");
  s.P = 0;
  s.T = 0;
  if (prefix_k.has_value()) {
    const Tensor& pk = *prefix_k;
    const Tensor& pv = *prefix_v;
    TORCH_CHECK_VALUE(pk.dim() == 4 && pk.size(1) == s.Hkv && pk.size(3) == s.D,
                      "prefix_attn: prefix_k must be [T, Hkv, P, D] = [T, ", s.Hkv, ", P, ", s.D,
                      "] here, got shape ", pk.sizes());
    TORCH_CHECK_VALUE(pv.sizes() == pk.sizes(), "prefix_attn: prefix_v must have prefix_k's shape ",
                      pk.sizes(), ", got ", pv.sizes());
    check_dtype(pk, "prefix_k", dtype);
    check_dtype(pv, "prefix_v", dtype);
    check_device(pk, "prefix_k", q);
    check_device(pv, "prefix_v", q);
    s.T = pk.size(0);
    s.P = pk.size(2);
    // An empty batch may come with an empty per-row prefix (T == B == 0); rows need an entry.
    TORCH_CHECK_VALUE(s.T >= 1 || s.B == 0, "prefix_attn: prefix_k has no entries, shape ",
                      pk.sizes());
    if (prefix_index.has_value()) {
      const Tensor& idx = *prefix_index;
      TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong,
                       "prefix_attn: prefix_index must be int64, got ", idx.scalar_type());
      TORCH_CHECK_VALUE(idx.dim() == 1 && idx.size(0) == s.B,
                        "prefix_attn: prefix_index must have shape [B] = [", s.B, "], got ",
                        idx.sizes());
      check_device(idx, "prefix_index", q);
      check_index_range(idx, pk, !idx.is_cpu());
    } else {
      TORCH_CHECK_VALUE(s.T == 1 || s.T == s.B,
                        "prefix_attn: without prefix_index, prefix_k must have 1 entry (shared) "
                        "or B = ", s.B, " entries (one per row), got shape ", pk.sizes());
    }
  } else {
    TORCH_CHECK_VALUE(!prefix_index.has_value(),
                      "prefix_attn: prefix_index was given without a prefix");
  }

  if (key_padding_mask.has_value()) {
    const Tensor& m = *key_padding_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool,
                     "prefix_attn: key_padding_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == s.B && m.size(1) == s.Nk,
                      "prefix_attn: key_padding_mask must be [B, Nk] = [", s.B, ", ", s.Nk,
                      "], got shape ", m.sizes());
    check_device(m, "key_padding_mask", q);
  }
  if (attn_mask.has_value()) {
    const Tensor& m = *attn_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat,
                     "prefix_attn: attn_mask must be bool or float32 here, got ", m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 4 && m.size(0) == s.B && m.size(1) == s.Hq &&
                          m.size(2) == s.Nq && m.size(3) == s.Nk,
                      "prefix_attn: attn_mask must be expanded to [B, Hq, Nq, Nk] = [", s.B, ", ",
                      s.Hq, ", ", s.Nq, ", ", s.Nk, "], got shape ", m.sizes());
    check_device(m, "attn_mask", q);
  }
  return s;
}

// Attention dropout's parameters (prefix_attn_dropout.h), checked: p in [0, 1), the seed a
// non-negative int64, the offset a uint32 (what prefix_attn/_dropout.py draws).
DropoutParams dropout_params(double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0,
                    "prefix_attn: dropout_p must lie in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(seed >= 0, "prefix_attn: dropout_seed must be non-negative, got ", seed);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= int64_t{0xFFFFFFFF},
                    "prefix_attn: dropout_offset must lie in [0, 2^32), got ", offset);
  DropoutParams d;
  d.enabled = dropout_p > 0.0;
  // floor(p * 2^32) is exact in double; p < 1 keeps it below 2^32.
  d.threshold = static_cast<uint32_t>(std::floor(dropout_p * 4294967296.0));
  d.scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  d.seed = static_cast<uint64_t>(seed);
  d.offset = static_cast<uint32_t>(offset);
  return d;
}

View4 view4(const Tensor& t) {
  View4 out;
  out.ptr = t.data_ptr();
  for (int i = 0; i < 4; ++i) out.s[i] = t.stride(i);
  return out;
}

MutView4 mut_view4(Tensor& t) {
  MutView4 out;
  out.ptr = t.data_ptr();
  for (int i = 0; i < 4; ++i) out.s[i] = t.stride(i);
  return out;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

// Fills everything but the outputs. `index` keeps a contiguous copy of prefix_index alive.
void fill_common(FwdParams& p, const Sizes& s, const Tensor& q, const Tensor& k, const Tensor& v,
                 const OptTensor& prefix_k, const OptTensor& prefix_v,
                 const OptTensor& prefix_index, const OptTensor& key_padding_mask,
                 const OptTensor& attn_mask, double scale, bool causal, Tensor& index) {
  p.dtype = to_dtype(q.scalar_type());
  p.B = s.B;
  p.Hq = s.Hq;
  p.Hkv = s.Hkv;
  p.Nq = s.Nq;
  p.Nk = s.Nk;
  p.P = s.P;
  p.T = s.T;
  p.D = s.D;
  p.q = view4(q);
  p.k = view4(k);
  p.v = view4(v);
  if (prefix_k.has_value()) {
    p.prefix_k = view4(*prefix_k);
    p.prefix_v = view4(*prefix_v);
  }
  if (prefix_index.has_value()) {
    index = prefix_index->contiguous();
    p.prefix_index = index.data_ptr<int64_t>();
  }
  if (key_padding_mask.has_value()) {
    p.key_padding_mask = key_padding_mask->data_ptr<bool>();
    p.kpm_s[0] = key_padding_mask->stride(0);
    p.kpm_s[1] = key_padding_mask->stride(1);
  }
  if (attn_mask.has_value()) {
    p.mask_kind = attn_mask->scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kFloat;
    p.attn_mask = view4(*attn_mask);
  }
  p.scale = static_cast<float>(scale);
  p.causal = causal;
}

std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                               const OptTensor& prefix_k, const OptTensor& prefix_v,
                               const OptTensor& prefix_index, const OptTensor& key_padding_mask,
                               const OptTensor& attn_mask, double scale, bool causal,
                               bool /*deterministic: only the backward reads it*/, double dropout_p,
                               int64_t dropout_seed, int64_t dropout_offset) {
  const Sizes s = check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                               attn_mask, scale);
  Tensor out = alloc_like(q);
  Tensor lse = alloc({s.B, s.Hq, s.Nq}, q.options().dtype(at::kFloat));
  FwdParams p;
  Tensor index;
  fill_common(p, s, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale,
              causal, index);
  p.dropout = dropout_params(dropout_p, dropout_seed, dropout_offset);
  p.out = mut_view4(out);
  p.lse = lse.data_ptr<float>();
  if (q.is_cpu()) {
    cpu::forward(p);
  } else {
#ifdef PREFIX_ATTN_WITH_CUDA
    cuda_glue::forward(p, q);
#else
    TORCH_CHECK_NOT_IMPLEMENTED(false, "prefix_attn: this build has no CUDA kernels; q is on ",
                                q.device());
#endif
  }
  return {out, lse};
}

void check_like(const Tensor& t, const char* name, const Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), "prefix_attn: ", name, " must have ", like_name,
                    "'s shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "prefix_attn: ", name,
                   " must have dtype ", like.scalar_type(), ", got ", t.scalar_type());
  check_device(t, name, like);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
    const OptTensor& prefix_k, const OptTensor& prefix_v, const OptTensor& prefix_index,
    const OptTensor& key_padding_mask, const OptTensor& attn_mask, const Tensor& out,
    const Tensor& lse, const OptTensor& dlse, double scale, bool causal, bool deterministic,
    bool need_dq, bool need_dkv, bool need_dprefix, double dropout_p, int64_t dropout_seed,
    int64_t dropout_offset) {
  const Sizes s = check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                               attn_mask, scale);
  check_like(dout, "dout", q, "q");
  check_like(out, "out", q, "q");
  const std::vector<int64_t> lse_shape{s.B, s.Hq, s.Nq};
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape) && lse.scalar_type() == at::kFloat,
                    "prefix_attn: lse must be float32 [B, Hq, Nq] = ", at::IntArrayRef(lse_shape),
                    ", got ", lse.scalar_type(), " ", lse.sizes());
  check_device(lse, "lse", q);
  if (dlse.has_value()) check_like(*dlse, "dlse", lse, "lse");
  need_dprefix = need_dprefix && prefix_k.has_value();
  const DropoutParams dropout = dropout_params(dropout_p, dropout_seed, dropout_offset);

  auto none = [&] { return q.new_empty({0}); };
  Tensor dq = need_dq ? alloc_like(q) : none();
  Tensor dk = need_dkv ? alloc_like(k) : none();
  Tensor dv = need_dkv ? alloc_like(v) : none();
  Tensor dpk = need_dprefix ? alloc_like(*prefix_k) : none();
  Tensor dpv = need_dprefix ? alloc_like(*prefix_v) : none();
  if (s.B * s.Hq * s.Nq == 0) {  // no query: every gradient is zero
    for (Tensor* t : {&dq, &dk, &dv, &dpk, &dpv}) t->zero_();
    return {dq, dk, dv, dpk, dpv};
  }

  BwdParams p;
  Tensor index;
  fill_common(p, s, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale,
              causal, index);
  p.dropout = dropout;
  const Tensor lse_c = lse.contiguous();
  const Tensor dlse_c = dlse.has_value() ? dlse->contiguous() : Tensor();
  p.dout = view4(dout);
  p.out_fwd = view4(out);
  p.lse_fwd = lse_c.data_ptr<float>();
  p.dlse = dlse.has_value() ? dlse_c.data_ptr<float>() : nullptr;
  p.need_dq = need_dq;
  p.need_dkv = need_dkv;
  p.need_dprefix = need_dprefix;
  p.deterministic = deterministic;
  if (need_dq) p.dq = mut_view4(dq);
  if (need_dkv) {
    p.dk = mut_view4(dk);
    p.dv = mut_view4(dv);
  }
  if (need_dprefix) {
    p.dprefix_k = mut_view4(dpk);
    p.dprefix_v = mut_view4(dpv);
  }
  if (q.is_cpu()) {
    cpu::backward(p);
  } else {
#ifdef PREFIX_ATTN_WITH_CUDA
    cuda_glue::backward(p, q, prefix_index, lse_c, dpk, dpv);
#else
    TORCH_CHECK_NOT_IMPLEMENTED(false, "prefix_attn: this build has no CUDA kernels; q is on ",
                                q.device());
#endif
  }
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace
}  // namespace prefix_attn

TORCH_LIBRARY(prefix_attn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
      "Tensor? prefix_index, Tensor? key_padding_mask, Tensor? attn_mask, float scale, "
      "bool causal, bool deterministic, float dropout_p=0., int dropout_seed=0, "
      "int dropout_offset=0) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
      "Tensor? prefix_index, Tensor? key_padding_mask, Tensor? attn_mask, Tensor out, "
      "Tensor lse, Tensor? dlse, float scale, bool causal, bool deterministic, bool need_dq, "
      "bool need_dkv, bool need_dprefix, float dropout_p=0., int dropout_seed=0, "
      "int dropout_offset=0) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dprefix_k, "
      "Tensor dprefix_v)");
}

TORCH_LIBRARY_IMPL(prefix_attn, CPU, m) {
  m.impl("fwd", &prefix_attn::fwd);
  m.impl("bwd", &prefix_attn::bwd);
}

#ifdef PREFIX_ATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(prefix_attn, CUDA, m) {
  m.impl("fwd", &prefix_attn::fwd);
  m.impl("bwd", &prefix_attn::bwd);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefix_attn compiled kernels; the ops live in torch.ops.prefix_attn";
  m.def("_set_poison_outputs", [](bool on) { prefix_attn::g_poison_outputs.store(on); },
        "Fill kernel outputs with NaN before computing (a test aid).");
  m.def("_check_prefix_index_range",
        [](const at::Tensor& prefix_index, const at::Tensor& prefix_k, bool on_device) {
          prefix_attn::check_index_range(prefix_index, prefix_k, on_device);
        },
        "The ops' range check of prefix_index; on_device=True takes the CUDA path whatever the "
        "device (a test aid: tests count its host reads on CPU).");
  m.def("_cpu_isa", [] { return std::string(prefix_attn::cpu::isa_in_use()); },
        "The ISA level the CPU kernels run at (chosen at the first call; PREFIX_ATTN_CPU_ISA).");
  m.def("_cpu_isas_built", &prefix_attn::cpu::isas_built, "The ISA levels compiled in, best first.");
  m.def("_has_cuda_kernels", [] {
#ifdef PREFIX_ATTN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
