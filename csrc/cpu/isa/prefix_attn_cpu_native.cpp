// The CPU kernels at the native level, in namespace prefix_attn::cpu_native. The flags come from
// prefix_attn/_build.py (the one list both the setup.py build and the first-use build read).
// Compiled with -march=native (PREFIX_ATTN_CPU_ARCH=native): runs only on CPUs like the build's.
#define PREFIX_ATTN_CPU_NS cpu_native
#include "../prefix_attn_cpu.cpp"
