// Runtime ISA dispatch of the CPU kernels: the levels compiled in (PREFIX_ATTN_HAS_<LEVEL>,
// defined by the build) are tried best first, and the first one this CPU runs serves every call.
// This file is compiled with the baseline flags: it must run anywhere, to say what it found.
#include "prefix_attn_cpu.h"
#include "prefix_attn_cpu_dispatch.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace prefix_attn {

#define PREFIX_ATTN_DECLARE_LEVEL(ns)            \
  namespace ns {                                 \
  void forward(const FwdParams& params);         \
  void backward(const BwdParams& params);        \
  }
#ifdef PREFIX_ATTN_HAS_NATIVE
PREFIX_ATTN_DECLARE_LEVEL(cpu_native)
#endif
#ifdef PREFIX_ATTN_HAS_AVX512
PREFIX_ATTN_DECLARE_LEVEL(cpu_avx512)
#endif
#ifdef PREFIX_ATTN_HAS_AVX2
PREFIX_ATTN_DECLARE_LEVEL(cpu_avx2)
#endif
#ifdef PREFIX_ATTN_HAS_BASELINE
PREFIX_ATTN_DECLARE_LEVEL(cpu_baseline)
#endif
#undef PREFIX_ATTN_DECLARE_LEVEL

namespace cpu {
namespace {

struct Level {
  const char* name;
  bool (*supported)();  // does this CPU (and its OS) run the level's instructions
  void (*forward)(const FwdParams&);
  void (*backward)(const BwdParams&);
};

// x86-64-v4 / -v3 are the psABI levels the files are compiled for (AVX-512 F/BW/CD/DQ/VL;
// AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE). libgcc's check includes the OS's XSAVE support of the
// wider registers.
[[maybe_unused]] bool always() { return true; }
#if defined(__x86_64__)
[[maybe_unused]] bool has_v4() { return __builtin_cpu_supports("x86-64-v4"); }
[[maybe_unused]] bool has_v3() { return __builtin_cpu_supports("x86-64-v3"); }
#endif

const Level kLevels[] = {
#ifdef PREFIX_ATTN_HAS_NATIVE
    {"native", always, cpu_native::forward, cpu_native::backward},
#endif
#ifdef PREFIX_ATTN_HAS_AVX512
    {"avx512", has_v4, cpu_avx512::forward, cpu_avx512::backward},
#endif
#ifdef PREFIX_ATTN_HAS_AVX2
    {"avx2", has_v3, cpu_avx2::forward, cpu_avx2::backward},
#endif
#ifdef PREFIX_ATTN_HAS_BASELINE
    {"baseline", always, cpu_baseline::forward, cpu_baseline::backward},
#endif
};

std::string level_names() {
  std::string names;
  for (const Level& level : kLevels) names += (names.empty() ? "" : ", ") + std::string(level.name);
  return names;
}

const Level& choose() {
  const char* forced = std::getenv("PREFIX_ATTN_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    for (const Level& level : kLevels) {
      if (std::string(forced) != level.name) continue;
      TORCH_CHECK(level.supported(), "prefix_attn: PREFIX_ATTN_CPU_ISA=", forced,
                  ", but this CPU cannot run that level; it runs: ", [] {
                    std::string ok;
                    for (const Level& l : kLevels)
                      if (l.supported()) ok += (ok.empty() ? "" : ", ") + std::string(l.name);
                    return ok;
                  }());
      return level;
    }
    TORCH_CHECK(false, "prefix_attn: PREFIX_ATTN_CPU_ISA=", forced,
                " is not a level compiled into this build; it has: ", level_names());
  }
  for (const Level& level : kLevels)
    if (level.supported()) return level;
  TORCH_CHECK(false, "prefix_attn: this CPU runs none of the levels compiled into this build (",
              level_names(), "); rebuild without PREFIX_ATTN_CPU_ARCH=native");
}

// Chosen once: every call of the process runs the same code (results do not change with the
// level a call happened to get). A failed choice (a bad override) is retried at the next call.
const Level& level() {
  static const Level& chosen = choose();
  return chosen;
}

}  // namespace

const char* isa_in_use() { return level().name; }

std::vector<std::string> isas_built() {
  std::vector<std::string> names;
  for (const Level& level : kLevels) names.emplace_back(level.name);
  return names;
}

void forward(const FwdParams& params) { level().forward(params); }

void backward(const BwdParams& params) { level().backward(params); }

}  // namespace cpu
}  // namespace prefix_attn
