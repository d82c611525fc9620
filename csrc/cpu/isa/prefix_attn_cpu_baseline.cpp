// The CPU kernels at the baseline level, in namespace prefix_attn::cpu_baseline. The flags come from
// prefix_attn/_build.py (the one list both the setup.py build and the first-use build read).
#if defined(__AVX__)
#error "the baseline level must not use AVX: compile this file with -march=x86-64 (prefix_attn/_build.py)"
#endif
#define PREFIX_ATTN_CPU_NS cpu_baseline
#include "../prefix_attn_cpu.cpp"
