// Plain description of one prefix-attention call: pointers, strides (in elements) and sizes.
//
// Kernels see only this struct, never a torch tensor, so a kernel translation unit can be
// compiled without torch headers (nvcc checks the CUDA kernels on machines whose torch has no
// CUDA headers). The host glue in prefix_attn_api.cpp validates the tensors and fills it in.
#pragma once

#include <cstdint>

#include "prefix_attn_dropout.h"

namespace prefix_attn {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// attn_mask, when given, is either a bool mask (true = attend) or an additive float32 mask.
enum class MaskKind : int32_t { kNone = 0, kBool = 1, kFloat = 2 };

// A strided 4-D view: element (a, b, c, d) lives at ptr + a*s[0] + b*s[1] + c*s[2] + d*s[3].
struct View4 {
  const void* ptr = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

struct MutView4 {
  void* ptr = nullptr;
  int64_t s[4] = {0, 0, 0, 0};
};

struct FwdParams {
  DType dtype = DType::kFloat32;

  // Sizes. q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; prefix: [T, Hkv, P, D].
  int64_t B = 0, Hq = 0, Hkv = 0, Nq = 0, Nk = 0, P = 0, T = 0, D = 0;

  View4 q, k, v;
  View4 prefix_k, prefix_v;  // unused when P == 0

  // Which bank entry row b uses: prefix_index[b] when non-null, otherwise entry 0 when
  // T == 1 (a shared prefix) and entry b when T == B (one prefix per row).
  const int64_t* prefix_index = nullptr;

  // key_padding_mask: [B, Nk], true = attend. Null when absent.
  const bool* key_padding_mask = nullptr;
  int64_t kpm_s[2] = {0, 0};

  // attn_mask, viewed as [B, Hq, Nq, Nk] (broadcast dimensions have stride 0).
  MaskKind mask_kind = MaskKind::kNone;
  View4 attn_mask;

  float scale = 1.f;
  bool causal = false;

  // Attention dropout (prefix_attn_dropout.h); disabled unless dropout_p > 0.
  DropoutParams dropout;

  // Outputs: out [B, Hq, Nq, D] in dtype (any strides); lse [B, Hq, Nq] float32, contiguous.
  MutView4 out;
  float* lse = nullptr;

  PREFIX_ATTN_HD int64_t prefix_entry(int64_t b) const {
    if (prefix_index != nullptr) return prefix_index[b];
    return T == 1 ? 0 : b;
  }
};

struct BwdParams : FwdParams {
  View4 dout;                  // [B, Hq, Nq, D]
  View4 out_fwd;               // the forward's out, read for Delta = rowsum(dout * out)
  const float* lse_fwd = nullptr;  // [B, Hq, Nq], contiguous, natural log
  const float* dlse = nullptr;     // gradient of lse, [B, Hq, Nq] contiguous, or null

  bool need_dq = false, need_dkv = false, need_dprefix = false;
  bool deterministic = false;

  MutView4 dq, dk, dv;             // like q, k, v
  MutView4 dprefix_k, dprefix_v;   // like prefix_k, prefix_v: [T, Hkv, P, D]
};

}  // namespace prefix_attn
