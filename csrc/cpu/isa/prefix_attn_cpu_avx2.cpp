// The CPU kernels at the avx2 level, in namespace prefix_attn::cpu_avx2. The flags come from
// prefix_attn/_build.py (the one list both the setup.py build and the first-use build read).
#if defined(__x86_64__) && (!defined(__AVX2__) || !defined(__FMA__) || defined(__AVX512F__))
#error "compile this file with the AVX2 flags of prefix_attn/_build.py (x86-64-v3)"
#endif
#define PREFIX_ATTN_CPU_NS cpu_avx2
#include "../prefix_attn_cpu.cpp"
