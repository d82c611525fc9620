"""How prefix_attn._C is compiled: the one description that setup.py (a build ahead of install)
and _ops.py (a build at first use) both read. No torch import at module level: setup.py loads this
file by path, before it knows whether torch is there.

The CPU kernels (csrc/cpu/prefix_attn_cpu.cpp) are compiled once per ISA level, each through its
own file csrc/cpu/isa/prefix_attn_cpu_<level>.cpp into namespace prefix_attn::cpu_<level>, and
csrc/cpu/prefix_attn_cpu_dispatch.cpp picks the best level the CPU runs at the first call.
"""
from __future__ import annotations

import os
import platform
from typing import Dict, List

# Levels, best first, with their compiler flags: the x86-64 psABI levels. v4 is AVX-512
# (F/BW/CD/DQ/VL: Skylake-X, Ice Lake, Sapphire Rapids, Zen 4 on), v3 AVX2 + FMA + F16C (Haswell,
# Zen 1 on), and the baseline SSE2 (any x86-64). Tuning stays generic: these binaries travel.
# AVX-512: the kernels' 16-float vectors fill zmm registers whatever the flags; loops the compiler
# vectorises itself get 256-bit vectors, as GCC's tunings for every AVX-512 Intel CPU choose (and
# so a -march=native build there).
X86_LEVELS: Dict[str, List[str]] = {
    "avx512": ["-march=x86-64-v4", "-mtune=generic", "-mprefer-vector-width=256"],
    "avx2": ["-march=x86-64-v3", "-mtune=generic"],
    "baseline": ["-march=x86-64", "-mtune=generic"],
}

# Every C++ file: optimised, no debug info (Python's own CFLAGS carry -g: 13.7 MB instead of
# ~1 MB), -fopenmp because at::parallel_for is an inline `#pragma omp parallel` in PyTorch's
# OpenMP builds (without it our loops run on one thread; libgomp resolves to torch's copy).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
LINK_FLAGS = ["-fopenmp"]

# Relative to csrc/: compiled with the baseline flags (they must run anywhere, to dispatch).
COMMON_SOURCES = ["prefix_attn_api.cpp", "cpu/prefix_attn_cpu_dispatch.cpp"]
# Everything a build reads, for the first-use build's copy of the sources.
SOURCE_GLOBS = ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cpu/isa/*.cpp"]


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def level_source(level: str) -> str:
    """The file (relative to csrc/) that compiles the CPU kernels at `level`."""
    return f"cpu/isa/prefix_attn_cpu_{level}.cpp"


def level_define(level: str) -> str:
    """The macro that tells the dispatcher `level` is linked in."""
    return f"PREFIX_ATTN_HAS_{level.upper()}"


def cpu_arch_override() -> str:
    """PREFIX_ATTN_CPU_ARCH=native (or another -march value) builds one level for that CPU only,
    in place of the portable levels: the opt-in for a machine-specific build."""
    return os.environ.get("PREFIX_ATTN_CPU_ARCH", "").strip()


def levels(arch: str = "") -> Dict[str, List[str]]:
    """The levels a build ahead of install compiles, with their flags."""
    if arch:
        return {"native": [f"-march={arch}"]}
    if is_x86_64():
        return dict(X86_LEVELS)
    return {"baseline": []}  # other architectures: what the compiler targets by default


def common_flags(arch: str = "") -> List[str]:
    """Flags of the files compiled once (the op glue and the dispatcher)."""
    if arch:
        return [f"-march={arch}"]
    return X86_LEVELS["baseline"] if is_x86_64() else []


def isolate_level_object(obj: str, level: str) -> str:
    """Gives every symbol a level's object defines a name of its own (suffix .cpu_<level>), in a
    copy next to it; returns the copy's path.

    The levels' objects all hold out-of-line copies of the same library code (std::vector's
    members, say), each compiled with that level's instructions, under the same weak names; the
    linker keeps one copy per name for the whole extension, which can be an AVX-512 one called
    from the baseline level: an illegal instruction on an older CPU. Renamed, each level calls
    only its own copies. (The level's own functions already have unique names: the namespace.)
    tools/isa_check.py checks the result."""
    import subprocess

    nm = os.environ.get("NM", "nm")
    objcopy = os.environ.get("OBJCOPY", "objcopy")
    listing = subprocess.run([nm, "--defined-only", "-P", obj], check=True, capture_output=True, text=True).stdout
    own = f"cpu_{level}"
    names = sorted({line.split()[0] for line in listing.splitlines() if line.strip()})
    renamed = [name for name in names if own not in name]
    out = obj[: -len(".o")] + f".{own}.o" if obj.endswith(".o") else obj + f".{own}"
    map_path = out + ".symbols"
    with open(map_path, "w") as f:
        f.writelines(f"{name} {name}.{own}\n" for name in renamed)
    subprocess.run([objcopy, f"--redefine-syms={map_path}", obj, out], check=True)
    return out
