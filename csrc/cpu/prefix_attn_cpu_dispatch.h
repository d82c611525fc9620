#pragma once

// The CPU kernels are compiled once per ISA level into one extension (csrc/cpu/isa/*.cpp), and
// cpu::forward / cpu::backward (prefix_attn_cpu.h) pick the best level this CPU runs, once, at
// the first call, as ATen's CPU dispatch does. PREFIX_ATTN_CPU_ISA=<level> forces one (tests).

#include <string>
#include <vector>

namespace prefix_attn::cpu {

// The level the kernels run at ("avx512", "avx2", "baseline" or "native"). Throws, naming the
// variable and the levels, where PREFIX_ATTN_CPU_ISA asks for one this binary or CPU cannot run.
const char* isa_in_use();

// The levels compiled into this binary, best first.
std::vector<std::string> isas_built();

}  // namespace prefix_attn::cpu
