// Runs the real kernels (prepare.py's host copy) through the emulator on small shapes with tails,
// masks, causal edges, GQA / MQA, banks, strided views, dropout, padded keys holding inf / NaN /
// 1.7e38 in K and V, and every gradient, replicating
// the host glue's backward workspace, and compares with a float64 reference written from
// SPEC.md and prefix_attn_dropout.h. Also checks: every output element written, nothing written
// outside the outputs' views, no NaN, rows with no visible key give out 0 / lse -inf.
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "emu_runtime.h"
#include "cuda/prefix_attn_cuda.h"
#include "prefix_attn_params.h"

using namespace prefix_attn;

static uint16_t f2h(float x, DType dt) { return dt == DType::kFloat16 ? __float2half_rn(x).x : __float2bfloat16_rn(x).x; }
static float h2f(uint16_t v, DType dt) { return dt == DType::kFloat16 ? __half2float(__half{v}) : __bfloat162float(__nv_bfloat16{v}); }

// A 4-D view over an exactly-sized allocation. Elements are 2 bytes (16-bit) or 4 (fp32).
struct Arr {
  DType dt;
  int64_t shape[4];
  int64_t st[4];
  int64_t storage = 0;  // elements allocated
  int64_t offset = 0;   // view start, in elements
  unsigned char* mem = nullptr;
  int esize() const { return dt == DType::kFloat32 ? 4 : 2; }
  void* ptr() const { return mem + offset * esize(); }
  int64_t idx(int64_t a, int64_t b, int64_t c, int64_t d) const { return offset + a * st[0] + b * st[1] + c * st[2] + d * st[3]; }
  float get(int64_t a, int64_t b, int64_t c, int64_t d) const {
    const int64_t i = idx(a, b, c, d);
    if (dt == DType::kFloat32) { float f; std::memcpy(&f, mem + 4 * i, 4); return f; }
    uint16_t v; std::memcpy(&v, mem + 2 * i, 2); return h2f(v, dt);
  }
  void set(int64_t a, int64_t b, int64_t c, int64_t d, float x) {
    const int64_t i = idx(a, b, c, d);
    if (dt == DType::kFloat32) { std::memcpy(mem + 4 * i, &x, 4); return; }
    const uint16_t v = f2h(x, dt); std::memcpy(mem + 2 * i, &v, 2);
  }
  View4 view() const { View4 v; v.ptr = ptr(); for (int i = 0; i < 4; ++i) v.s[i] = st[i]; return v; }
  MutView4 mview() const { MutView4 v; v.ptr = ptr(); for (int i = 0; i < 4; ++i) v.s[i] = st[i]; return v; }
};

// layout 0: contiguous; 1: dims 1 and 2 swapped in memory ([B, N, H, D] viewed as [B, H, N, D]);
// 2: column stride 2; 3: contiguous but one element past a 16-byte boundary.
static Arr make(DType dt, int64_t s0, int64_t s1, int64_t s2, int64_t s3, int layout) {
  Arr a;
  a.dt = dt;
  a.shape[0] = s0; a.shape[1] = s1; a.shape[2] = s2; a.shape[3] = s3;
  const int64_t n = s0 * s1 * s2 * s3;
  if (layout == 1) {
    a.st[3] = 1; a.st[1] = s3; a.st[2] = s1 * s3; a.st[0] = s1 * s2 * s3; a.storage = n;
  } else if (layout == 2) {
    a.st[3] = 2; a.st[2] = 2 * s3; a.st[1] = 2 * s3 * s2; a.st[0] = 2 * s3 * s2 * s1; a.storage = 2 * n;
  } else {
    a.st[3] = 1; a.st[2] = s3; a.st[1] = s3 * s2; a.st[0] = s3 * s2 * s1; a.storage = n;
  }
  if (layout == 3) { a.offset = 1; a.storage += 1; }
  const size_t bytes = size_t(std::max<int64_t>(a.storage, 1)) * a.esize();
  a.mem = static_cast<unsigned char*>(aligned_alloc(16, (bytes + 15) / 16 * 16));
  // exact size for ASan when the size is a multiple of 16; otherwise within 15 bytes
  std::memset(a.mem, 0x7E, bytes);
  return a;
}

static bool is_sentinel(const Arr& a, int64_t i) {
  for (int b = 0; b < a.esize(); ++b) if (a.mem[i * a.esize() + b] != 0x7E) return false;
  return true;
}

struct Case {
  std::string name;
  DType dt;
  int64_t B, Hq, Hkv, Nq, Nk, P, T, D;
  bool causal = false;
  int prefix = 1;  // 0 none, 1 shared (T = 1), 2 one per row (T = B), 3 bank with index
  std::vector<int64_t> index;
  int kpm = 0;     // 0 none, 1 right padding, 2 left padding
  std::vector<int64_t> pad;  // padded keys per row (default: 0, then 7b + 3)
  // What the K and V rows of padded keys hold (SPEC.md, "Padded keys": never read into any
  // result): 0 ordinary values, 1 +-inf, 2 NaN, 3 +-1.7e38 (finite in fp32 and bf16, inf in fp16).
  int garbage_k = 0, garbage_v = 0;
  int amask = 0;   // 0 none, 1 bool [B, 1, Nq, Nk] broadcast, 2 float [1, Hq, Nq, Nk], 3 float all -inf rows
  double dropout = 0.0;
  int layout = 0;  // for q, dout, out, dq (1, 2) and k, v (3)
  float qscale = 1.5f;  // larger: peaked softmax, the running max moves between tiles
  bool dlse = false;
  bool need_dq = true, need_dkv = true, need_dprefix = true;
};

struct Result { double worst = 0; bool ok = true; };

static void check(Result& r, const char* what, const std::vector<double>& ref, const std::vector<double>& got, double tol) {
  double err = 0, mx = 0; int64_t bad_nan = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isnan(got[i])) { ++bad_nan; continue; }
    if (std::isinf(ref[i]) || std::isinf(got[i])) {
      if (ref[i] != got[i]) { ++bad_nan; }
      continue;
    }
    err = std::max(err, std::fabs(ref[i] - got[i]));
    mx = std::max(mx, std::fabs(ref[i]));
  }
  const double rel = err / (mx + 1e-3);
  const bool ok = bad_nan == 0 && rel <= tol;
  std::printf("    %-6s max|err| %.3g  max|ref| %.3g  rel %.3g  nan/inf-mismatch %" PRId64 "%s\n", what, err, mx, rel, bad_nan,
              ok ? "" : "   <-- FAIL");
  r.ok = r.ok && ok;
  r.worst = std::max(r.worst, rel);
}

// Every element of the view written (not the sentinel), and every other element of the storage untouched.
static int64_t check_writes(const Arr& a, const char* what) {
  std::vector<char> in_view(a.storage, 0);
  int64_t unwritten = 0, stray = 0;
  for (int64_t i0 = 0; i0 < a.shape[0]; ++i0)
    for (int64_t i1 = 0; i1 < a.shape[1]; ++i1)
      for (int64_t i2 = 0; i2 < a.shape[2]; ++i2)
        for (int64_t i3 = 0; i3 < a.shape[3]; ++i3) {
          const int64_t i = a.idx(i0, i1, i2, i3);
          in_view[i] = 1;
          if (is_sentinel(a, i)) ++unwritten;
        }
  for (int64_t i = 0; i < a.storage; ++i) if (!in_view[i] && !is_sentinel(a, i)) ++stray;
  if (unwritten || stray) std::printf("    %s: %" PRId64 " elements never written, %" PRId64 " written outside the view  <-- FAIL\n", what, unwritten, stray);
  return unwritten + stray;
}

static bool run_case(const Case& c, uint64_t seed) {
  std::printf("== %s\n", c.name.c_str());
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  const DType dt = c.dt;
  const int64_t B = c.B, Hq = c.Hq, Hkv = c.Hkv, Nq = c.Nq, Nk = c.Nk, P = c.P, D = c.D, T = c.T;
  const int qlay = c.layout == 1 || c.layout == 2 ? c.layout : 0, kvlay = c.layout == 3 ? 3 : 0;
  Arr q = make(dt, B, Hq, Nq, D, qlay), k = make(dt, B, Hkv, Nk, D, kvlay), v = make(dt, B, Hkv, Nk, D, kvlay);
  Arr pk = make(dt, T, Hkv, P, D, kvlay), pv = make(dt, T, Hkv, P, D, 0);
  Arr dout = make(dt, B, Hq, Nq, D, qlay);
  auto fill = [&](Arr& a, float scale) {
    for (int64_t i0 = 0; i0 < a.shape[0]; ++i0) for (int64_t i1 = 0; i1 < a.shape[1]; ++i1)
      for (int64_t i2 = 0; i2 < a.shape[2]; ++i2) for (int64_t i3 = 0; i3 < a.shape[3]; ++i3) a.set(i0, i1, i2, i3, scale * nd(rng));
  };
  fill(q, c.qscale); fill(k, 1.5f); fill(v, 1.f); fill(pk, 1.5f); fill(pv, 1.f); fill(dout, 1.f);
  // gaps of strided inputs: NaN, so that a read of one poisons the result
  for (Arr* a : {&q, &k, &v, &pk, &pv, &dout})
    for (int64_t i = 0; i < a->storage; ++i) if (is_sentinel(*a, i)) {
      if (a->esize() == 2) { const uint16_t nan = 0x7FFF; std::memcpy(a->mem + 2 * i, &nan, 2); }
      else { const float nan = NAN; std::memcpy(a->mem + 4 * i, &nan, 4); }
    }

  const int64_t eP = c.prefix == 0 ? 0 : P;
  int64_t* index = nullptr;
  if (c.prefix == 3) { index = new int64_t[B]; for (int64_t b = 0; b < B; ++b) index[b] = c.index[b]; }
  auto entry = [&](int64_t b) -> int64_t { return index ? index[b] : (T == 1 ? 0 : b); };

  bool* kpm = nullptr;
  std::vector<int64_t> valid_len(B);
  if (c.kpm) {
    kpm = new bool[B * Nk];
    for (int64_t b = 0; b < B; ++b) {
      valid_len[b] = !c.pad.empty() ? Nk - c.pad[b] : b == 0 ? Nk : std::max<int64_t>(0, Nk - 7 * b - 3);
      for (int64_t j = 0; j < Nk; ++j) kpm[b * Nk + j] = c.kpm == 1 ? j < valid_len[b] : j >= Nk - valid_len[b];
    }
  }
  auto garbage = [](int kind, int64_t d) -> float {
    const float sign = d % 3 == 1 ? -1.f : 1.f;  // both signs: a sum of them is NaN, not just inf
    return kind == 1 ? sign * INFINITY : kind == 2 ? NAN : sign * 1.7e38f;
  };
  int64_t n_padded = 0;
  if (kpm)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < Nk; ++j) {
        if (kpm[b * Nk + j]) continue;
        ++n_padded;
        for (int64_t g = 0; g < Hkv; ++g)
          for (int64_t d = 0; d < D; ++d) {
            if (c.garbage_k) k.set(b, g, j, d, garbage(c.garbage_k, d));
            if (c.garbage_v) v.set(b, g, j, d, garbage(c.garbage_v, d));
          }
      }
  bool* bmask = nullptr; float* fmask = nullptr;
  int64_t ms[4] = {0, 0, 0, 0};
  if (c.amask == 1) {
    bmask = new bool[B * Nq * Nk];
    for (int64_t i = 0; i < B * Nq * Nk; ++i) bmask[i] = (rng() % 5) != 0;
    ms[0] = Nq * Nk; ms[1] = 0; ms[2] = Nk; ms[3] = 1;
  } else if (c.amask >= 2) {
    fmask = new float[Hq * Nq * Nk];
    for (int64_t i = 0; i < Hq * Nq * Nk; ++i) {
      const int64_t ii = (i / Nk) % Nq;
      fmask[i] = c.amask == 3 && ii % 3 == 0 ? -INFINITY : ((rng() % 4) == 0 ? -INFINITY : 0.5f * nd(rng));
    }
    ms[0] = 0; ms[1] = Nq * Nk; ms[2] = Nk; ms[3] = 1;
  }
  auto mask_val = [&](int64_t b, int64_t h, int64_t i, int64_t j, bool& vis) -> double {
    vis = true;
    if (c.causal && j > i + Nk - Nq) vis = false;
    if (kpm && !kpm[b * Nk + j]) vis = false;
    if (bmask && !bmask[b * ms[0] + h * ms[1] + i * ms[2] + j * ms[3]]) vis = false;
    if (fmask) {
      const float f = fmask[b * ms[0] + h * ms[1] + i * ms[2] + j * ms[3]];
      if (f == -INFINITY) vis = false;
      return f;
    }
    return 0.0;
  };

  FwdParams p;
  p.dtype = dt; p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Nq = Nq; p.Nk = Nk; p.P = eP; p.T = T; p.D = D;
  p.q = q.view(); p.k = k.view(); p.v = v.view();
  if (c.prefix) { p.prefix_k = pk.view(); p.prefix_v = pv.view(); }
  p.prefix_index = index;
  if (kpm) { p.key_padding_mask = kpm; p.kpm_s[0] = Nk; p.kpm_s[1] = 1; }
  if (bmask) { p.mask_kind = MaskKind::kBool; p.attn_mask.ptr = bmask; }
  if (fmask) { p.mask_kind = MaskKind::kFloat; p.attn_mask.ptr = fmask; }
  for (int i = 0; i < 4; ++i) p.attn_mask.s[i] = ms[i];
  p.scale = float(1.0 / std::sqrt(double(D)));
  p.causal = c.causal;
  if (c.dropout > 0) {
    p.dropout.enabled = true;
    p.dropout.threshold = uint32_t(std::floor(c.dropout * 4294967296.0));
    p.dropout.scale = float(1.0 / (1.0 - c.dropout));
    p.dropout.seed = rng() >> 1;
    p.dropout.offset = uint32_t(rng());
  }
  Arr out = make(dt, B, Hq, Nq, D, qlay);
  float* lse = new float[std::max<int64_t>(1, B * Hq * Nq)];
  for (int64_t i = 0; i < B * Hq * Nq; ++i) lse[i] = NAN;
  p.out = out.mview();
  p.lse = lse;

  // ---------------- reference (float64)
  const int64_t NK = eP + Nk;
  std::vector<double> r_out(B * Hq * Nq * D, 0.0), r_lse(B * Hq * Nq), r_dq(B * Hq * Nq * D, 0.0);
  std::vector<double> r_dk(B * Hkv * Nk * D, 0.0), r_dv(B * Hkv * Nk * D, 0.0), r_dpk(T * Hkv * P * D, 0.0), r_dpv(T * Hkv * P * D, 0.0);
  std::vector<float> dlse(c.dlse ? B * Hq * Nq : 0);
  for (auto& x : dlse) x = 0.3f * nd(rng);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t g = h / (Hq / Hkv), e = entry(b), bh = b * Hq + h;
      for (int64_t i = 0; i < Nq; ++i) {
        std::vector<double> s(NK), pr(NK, 0.0), keep(NK, 1.0);
        std::vector<char> vis(NK, 1);
        auto key = [&](int64_t j, int64_t d) { return j < eP ? pk.get(e, g, j, d) : k.get(b, g, j - eP, d); };
        auto val = [&](int64_t j, int64_t d) { return j < eP ? pv.get(e, g, j, d) : v.get(b, g, j - eP, d); };
        double m = -INFINITY;
        for (int64_t j = 0; j < NK; ++j) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += double(q.get(b, h, i, d)) * key(j, d);
          s[j] = dot * double(p.scale);
          if (j >= eP) { bool vv; s[j] += mask_val(b, h, i, j - eP, vv); vis[j] = vv; }
          if (vis[j]) m = std::max(m, s[j]);
          if (c.dropout > 0) keep[j] = dropout_keep(p.dropout, j < eP, bh, i, j < eP ? j : j - eP) ? double(p.dropout.scale) : 0.0;
        }
        const int64_t row = bh * Nq + i;
        if (m == -INFINITY) { r_lse[row] = -INFINITY; continue; }
        double l = 0;
        for (int64_t j = 0; j < NK; ++j) if (vis[j]) l += std::exp(s[j] - m);
        r_lse[row] = m + std::log(l);
        for (int64_t j = 0; j < NK; ++j) pr[j] = vis[j] ? std::exp(s[j] - m) / l : 0.0;
        for (int64_t d = 0; d < D; ++d) {
          double o = 0;
          for (int64_t j = 0; j < NK; ++j) if (vis[j]) o += pr[j] * keep[j] * val(j, d);
          r_out[row * D + d] = o;
        }
        // backward
        std::vector<double> dp(NK), ds(NK);
        double delta = 0;
        for (int64_t j = 0; j < NK; ++j) {
          dp[j] = 0;
          if (!vis[j]) continue;  // a hidden key is not in the sum, whatever its V holds
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += double(dout.get(b, h, i, d)) * val(j, d);
          dp[j] = keep[j] * dot;
          delta += pr[j] * dp[j];
        }
        if (c.dlse) delta -= dlse[row];
        for (int64_t j = 0; j < NK; ++j) ds[j] = pr[j] * (dp[j] - delta);
        for (int64_t j = 0; j < NK; ++j) {
          if (pr[j] == 0.0) continue;
          for (int64_t d = 0; d < D; ++d) {
            r_dq[row * D + d] += double(p.scale) * ds[j] * key(j, d);
            const double gk = double(p.scale) * ds[j] * q.get(b, h, i, d), gv = pr[j] * keep[j] * dout.get(b, h, i, d);
            if (j < eP) { r_dpk[((e * Hkv + g) * P + j) * D + d] += gk; r_dpv[((e * Hkv + g) * P + j) * D + d] += gv; }
            else { r_dk[((b * Hkv + g) * Nk + j - eP) * D + d] += gk; r_dv[((b * Hkv + g) * Nk + j - eP) * D + d] += gv; }
          }
        }
      }
    }

  // ---------------- forward
  Result res;
  // observed: fp16 <= 6e-4, bf16 <= 6e-3; one wrong dropout bit or mask element costs ~1e-2
  const double tol = dt == DType::kFloat16 ? 3e-3 : dt == DType::kBFloat16 ? 1.5e-2 : 1e-4;
  cuda::forward(p, nullptr);
  if (const char* err = cuda::last_error()) { std::printf("    forward launch error: %s  <-- FAIL\n", err); return false; }
  auto collect = [&](const Arr& a) {
    std::vector<double> o;
    for (int64_t i0 = 0; i0 < a.shape[0]; ++i0) for (int64_t i1 = 0; i1 < a.shape[1]; ++i1)
      for (int64_t i2 = 0; i2 < a.shape[2]; ++i2) for (int64_t i3 = 0; i3 < a.shape[3]; ++i3) o.push_back(a.get(i0, i1, i2, i3));
    return o;
  };
  int64_t bad = check_writes(out, "out");
  check(res, "out", r_out, collect(out), tol);
  std::vector<double> g_lse(lse, lse + B * Hq * Nq);
  check(res, "lse", r_lse, g_lse, tol);
  int64_t norow = 0;
  for (int64_t row = 0; row < B * Hq * Nq; ++row)
    if (r_lse[row] == -INFINITY) {
      ++norow;
      for (int64_t d = 0; d < D; ++d)
        if (out.get(row / (Hq * Nq), (row / Nq) % Hq, row % Nq, d) != 0.f) { ++bad; break; }
    }
  if (norow) std::printf("    %" PRId64 " rows with no visible key\n", norow);

  // ---------------- backward, with the glue's workspace
  BwdParams bp;
  static_cast<FwdParams&>(bp) = p;
  bp.dout = dout.view();
  bp.out_fwd = out.view();
  bp.lse_fwd = lse;
  bp.dlse = c.dlse ? dlse.data() : nullptr;
  bp.need_dq = c.need_dq; bp.need_dkv = c.need_dkv; bp.need_dprefix = c.need_dprefix && c.prefix != 0;
  Arr dq = make(dt, B, Hq, Nq, D, qlay), dk = make(dt, B, Hkv, Nk, D, 0), dv = make(dt, B, Hkv, Nk, D, c.layout == 2 ? 2 : 0);
  Arr dpk = make(dt, T, Hkv, P, D, 0), dpv = make(dt, T, Hkv, P, D, c.layout == 1 ? 1 : 0);
  bp.dq = dq.mview(); bp.dk = dk.mview(); bp.dv = dv.mview(); bp.dprefix_k = dpk.mview(); bp.dprefix_v = dpv.mview();
  float* delta = new float[std::max<int64_t>(1, B * Hq * Nq)];
  cuda::BwdWorkspace ws;
  ws.delta = delta;
  int64_t *rows = nullptr, *row_start = nullptr;
  float *part_k = nullptr, *part_v = nullptr;
  if (bp.need_dprefix && eP > 0) {
    rows = new int64_t[B];
    row_start = new int64_t[T + 1];
    std::vector<int64_t> order(B);
    for (int64_t b = 0; b < B; ++b) order[b] = b;
    if (index) {
      std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b2) { return index[a] < index[b2]; });
      for (int64_t t = 0; t <= T; ++t) {
        int64_t n = 0;
        for (int64_t b = 0; b < B; ++b) n += index[b] < t;
        row_start[t] = n;
      }
    } else {
      for (int64_t t = 0; t <= T; ++t) row_start[t] = T == 1 ? t * B : t;
    }
    for (int64_t b = 0; b < B; ++b) rows[b] = order[b];
    ws.rows = rows;
    ws.row_start = row_start;
    ws.chunks = cuda::dprefix_chunks(bp, cuda::sm_count(0));
    if (ws.chunks > 1) {
      const int64_t n = ws.chunks * T * Hkv * P * D;
      part_k = new float[n]; part_v = new float[n];
      for (int64_t i = 0; i < n; ++i) part_k[i] = part_v[i] = NAN;
      ws.dprefix_k_partial = part_k;
      ws.dprefix_v_partial = part_v;
    }
  }
  cuda::backward(bp, ws, nullptr);
  if (const char* err = cuda::last_error()) { std::printf("    backward launch error: %s  <-- FAIL\n", err); return false; }
  if (ws.chunks > 1) {
    std::printf("    dprefix in %" PRId64 " chunks\n", ws.chunks);
    for (int64_t t = 0; t < T; ++t) for (int64_t g = 0; g < Hkv; ++g) for (int64_t j = 0; j < P; ++j) for (int64_t d = 0; d < D; ++d) {
      float sk = 0, sv = 0;
      for (int64_t ch = 0; ch < ws.chunks; ++ch) {
        const int64_t o = (((ch * T + t) * Hkv + g) * P + j) * D + d;
        sk += part_k[o]; sv += part_v[o];
      }
      dpk.set(t, g, j, d, sk); dpv.set(t, g, j, d, sv);
    }
  }
  if (bp.need_dq) { bad += check_writes(dq, "dq"); check(res, "dq", r_dq, collect(dq), tol); }
  if (bp.need_dkv) {
    bad += check_writes(dk, "dk") + check_writes(dv, "dv");
    check(res, "dk", r_dk, collect(dk), tol); check(res, "dv", r_dv, collect(dv), tol);
    if (kpm) {  // a padded key's own gradients: exactly 0, not merely small
      int64_t nonzero = 0;
      for (int64_t b = 0; b < B; ++b) for (int64_t g = 0; g < Hkv; ++g) for (int64_t j = 0; j < Nk; ++j)
        if (!kpm[b * Nk + j]) for (int64_t d = 0; d < D; ++d) nonzero += dk.get(b, g, j, d) != 0.f || dv.get(b, g, j, d) != 0.f;
      std::printf("    %" PRId64 " padded keys: %" PRId64 " dk / dv elements not exactly 0%s\n", n_padded, nonzero,
                  nonzero ? "   <-- FAIL" : "");
      bad += nonzero;
    }
  } else {
    bad += !(is_sentinel(dk, 0) || dk.storage == 0);
  }
  if (bp.need_dprefix) {
    bad += check_writes(dpk, "dpk") + check_writes(dpv, "dpv");
    check(res, "dpk", r_dpk, collect(dpk), tol); check(res, "dpv", r_dpv, collect(dpv), tol);
  }
  auto& s = emu::S();
  if (s.races || s.oob || s.misaligned) { std::printf("    races %ld oob %ld misaligned %ld  <-- FAIL\n", s.races, s.oob, s.misaligned); bad += 1; }
  s.races = s.oob = s.misaligned = 0;
  const bool ok = res.ok && bad == 0;
  std::printf("    %s (worst rel %.3g)\n", ok ? "ok" : "FAILED", res.worst);
  return ok;
}

int main(int argc, char** argv) {
  auto& s = emu::S();
  const char* mode = std::getenv("EMU_MODE");  // "early" applies cp.async at issue
  s.late_copies = !(mode && std::string(mode) == "early");
  if (const char* sch = std::getenv("EMU_SCHED")) s.schedule = std::atoi(sch);
  if (const char* sm = std::getenv("EMU_SMS")) s.sm_count = std::atoi(sm);
  // the device's opt-in shared memory per block: 232448 (sm_90), 166912 (sm_80), 101376 (sm_86/89/120)
  if (const char* o = std::getenv("EMU_OPTIN")) s.max_smem_optin = size_t(std::atol(o));
  const char* only = argc > 1 ? argv[1] : nullptr;
  const DType F16 = DType::kFloat16, BF = DType::kBFloat16, F32 = DType::kFloat32;
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  {  // the self-check's shape: tails everywhere, causal, GQA, shared prefix
    Case c{"probe-like bf16 D64 Nq70 Nk77 P19 causal GQA shared", BF, 2, 4, 2, 70, 77, 19, 1, 64};
    c.causal = true; add(c);
  }
  {  // D=16 in the 32 bucket, Nk < Nq causal without prefix: rows with no visible key
    Case c{"fp16 D16 Nq37 Nk5 P0 causal (empty rows)", F16, 1, 2, 1, 37, 5, 0, 1, 16};
    c.causal = true; c.prefix = 0; c.dlse = true; add(c);
  }
  {  // D=80 in the 96 bucket, bank with an unused entry, padding + bool mask, dropout
    Case c{"bf16 D80 bank T3 kpm-left boolmask dropout0.2", BF, 2, 2, 2, 33, 100, 40, 3, 80};
    c.prefix = 3; c.index = {2, 0}; c.kpm = 2; c.amask = 1; c.dropout = 0.2; c.dlse = true; add(c);
  }
  {  // D=256, MQA, float mask, causal Nk > Nq, dropout
    Case c{"fp16 D256 MQA Nq40 Nk50 P33 causal floatmask dropout0.1", F16, 1, 3, 1, 40, 50, 33, 1, 256};
    c.causal = true; c.amask = 2; c.dropout = 0.1; add(c);
  }
  {  // D=144 in the 256 bucket (columns past D in the second half), per-row prefix
    Case c{"bf16 D144 per-row prefix Nq20 Nk18 P7 kpm-right", BF, 2, 2, 1, 20, 18, 7, 2, 144};
    c.prefix = 2; c.kpm = 1; add(c);
  }
  {  // strided views: q / dout / out / dq transposed, D=128
    Case c{"fp16 D128 transposed q/out/dq causal Nq65 Nk65 P16 dropout0.3", F16, 2, 2, 2, 65, 65, 16, 1, 128};
    c.causal = true; c.layout = 1; c.dropout = 0.3; add(c);
  }
  {  // column-strided q: the element-wise tile loader
    Case c{"bf16 D32 column-strided q/dout/out/dq Nq19 Nk30 P5", BF, 1, 2, 2, 19, 30, 5, 1, 32};
    c.layout = 2; add(c);
  }
  {  // misaligned k / v / prefix_k: element-wise loader for those
    Case c{"fp16 D96 misaligned k/v Nq50 Nk70 P9 causal GQA bank", F16, 3, 4, 2, 50, 70, 9, 2, 96};
    c.layout = 3; c.causal = true; c.prefix = 3; c.index = {1, 1, 0}; add(c);
  }
  {  // float mask hiding whole rows, with a prefix (rows still see the prefix)
    Case c{"bf16 D64 float mask -inf rows P3 dropout0.5", BF, 1, 2, 2, 24, 40, 3, 1, 64};
    c.amask = 3; c.dropout = 0.5; add(c);
  }
  {  // prefix only trainable; Nk = 0
    Case c{"fp16 D64 Nk0 P70 only dprefix", F16, 2, 2, 1, 30, 0, 70, 1, 64};
    c.need_dq = false; c.need_dkv = false; add(c);
  }
  {  // D=208 in the 256 bucket, dK/dV split over head-dim halves with a tail in the second half
    Case c{"bf16 D208 causal GQA4 dropout0.25 kpm Nq45 Nk35 P21", BF, 2, 4, 1, 45, 35, 21, 1, 208};
    c.causal = true; c.dropout = 0.25; c.kpm = 1; c.dlse = true; add(c);
  }
  {  // D=48 (64 bucket), D=112 (128 bucket), peaked scores, several query tiles, causal Nk < Nq with a prefix
    Case c{"fp16 D48 peaked causal Nq150 Nk100 P8", F16, 1, 2, 2, 150, 100, 8, 1, 48};
    c.causal = true; c.qscale = 6.f; add(c);
    Case c2{"bf16 D112 peaked dropout0.15 Nq70 Nk130 P64 bank", BF, 3, 2, 2, 70, 130, 64, 4, 112};
    c2.qscale = 5.f; c2.dropout = 0.15; c2.prefix = 3; c2.index = {3, 3, 3}; add(c2);
  }
  {  // the SIMT path, for comparison
    Case c{"fp32 D40 SIMT causal P5 dropout0.2", F32, 1, 2, 1, 21, 26, 5, 1, 40};
    c.causal = true; c.dropout = 0.2; add(c);
  }
  // Padded keys whose K / V hold inf, NaN or 1.7e38: padding inside a tile, whole padded tiles
  // (keys [64, 128) of the 64-key tiles, [32, 64) of the 32-key ones), a row with every key padded
  {
    Case c{"padded garbage bf16 D64 kpm-right nan-K inf-V P6 dlse", BF, 3, 2, 1, 33, 150, 6, 1, 64};
    c.kpm = 1; c.pad = {0, 5, 130}; c.garbage_k = 2; c.garbage_v = 1; c.dlse = true; add(c);
  }
  {
    Case c{"padded garbage fp16 D32 kpm-left inf-K huge-V P0 dropout0.2 dlse (a row all padded)", F16, 3, 2, 2, 20, 140, 0, 1, 32};
    c.prefix = 0; c.kpm = 2; c.pad = {3, 70, 140}; c.garbage_k = 1; c.garbage_v = 3; c.dropout = 0.2; c.dlse = true;
    add(c);
  }
  {
    Case c{"padded garbage bf16 D128 causal GQA kpm-right huge-K huge-V P9 dropout0.3 dlse", BF, 2, 4, 2, 40, 100, 9, 1, 128};
    c.causal = true; c.kpm = 1; c.pad = {0, 70}; c.garbage_k = 3; c.garbage_v = 3; c.dropout = 0.3; c.dlse = true;
    add(c);
  }
  {
    Case c{"padded garbage bf16 D256 kpm-left huge-K nan-V P4 per-row", BF, 2, 2, 1, 18, 75, 4, 2, 256};
    c.prefix = 2; c.kpm = 2; c.pad = {40, 10}; c.garbage_k = 3; c.garbage_v = 2; add(c);
  }
  {
    Case c{"padded garbage fp32 SIMT D40 kpm-left nan-K inf-V P5 dropout0.2 dlse", F32, 2, 2, 1, 21, 70, 5, 1, 40};
    c.kpm = 2; c.pad = {0, 40}; c.garbage_k = 2; c.garbage_v = 1; c.dropout = 0.2; c.dlse = true; add(c);
  }
  {
    Case c{"padded garbage fp32 SIMT D24 causal kpm-right huge-K huge-V P0", F32, 2, 2, 2, 30, 40, 0, 1, 24};
    c.prefix = 0; c.causal = true; c.kpm = 1; c.pad = {5, 33}; c.garbage_k = 3; c.garbage_v = 3; add(c);
  }
  int failed = 0, run = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (only && cases[i].name.find(only) == std::string::npos) continue;
    ++run;
    failed += !run_case(cases[i], 1000 + i);
  }
  std::printf("%d of %d cases failed (cp.async %s, schedule %d)\n", failed, run, s.late_copies ? "late" : "early", s.schedule);
  return failed != 0;
}
