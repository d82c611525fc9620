"""Checks that each ISA level of the CPU kernels in prefix_attn._C uses only its own instructions.

    python tools/isa_check.py [path/to/_C*.so]     (default: the one prefix_attn imports)

Disassembles the extension (objdump), attributes every instruction to the function it lies in,
and counts per level (the kernels of level L live in namespace prefix_attn::cpu_L):
  - avx512:   must use zmm registers (it takes the kernels' AVX-512 path);
  - avx2:     must use ymm registers, and no zmm or mask register;
  - baseline: no VEX/EVEX instruction at all (nothing past SSE);
  - every other function (the op glue, the dispatcher, whatever the linker kept of inline library
    code): no VEX/EVEX either. A library function compiled into a wide level's file and chosen
    by the linker for all callers (one definition per name) would break the baseline here.
Exit status 1 with the offending functions listed, 0 with the counts. A build with
PREFIX_ATTN_CPU_ARCH=native has the one level "native", which is not checked.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import subprocess
import sys

LEVELS = ("avx512", "avx2", "baseline", "native")
_FUNC = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_INSN = re.compile(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$")


def level_of(function: str) -> str:
    for level in LEVELS:  # its namespace, or the suffix setup.py gives each level's other symbols
        if f"cpu_{level}" in function:  # no level name begins another
            return level
    return "other"


def is_vex(mnemonic: str, operands: str) -> bool:
    """VEX / EVEX encoded: AVX and later (v-prefixed vector instructions, or mask registers)."""
    if re.search(r"%k[0-7]\b", operands):
        return True
    return mnemonic.startswith("v") and mnemonic not in ("verr", "verw")


def scan(path: str):
    """{level: Counter(zmm=, ymm=, vex=, insns=, functions=)}, {level: {function: vex count}}."""
    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", path], check=True,
                          capture_output=True, text=True).stdout
    counts = collections.defaultdict(collections.Counter)
    vex_functions = collections.defaultdict(collections.Counter)
    function, level = None, "other"
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            function, level = m.group(1), level_of(m.group(1))
            counts[level]["functions"] += 1
            continue
        m = _INSN.match(line)
        if not m or function is None:
            continue
        mnemonic, operands = m.group(1), m.group(2)
        c = counts[level]
        c["insns"] += 1
        c["zmm"] += "%zmm" in operands
        c["ymm"] += "%ymm" in operands
        if is_vex(mnemonic, operands):
            c["vex"] += 1
            vex_functions[level][function] += 1
    return counts, vex_functions


def check(path: str) -> list:
    """The problems found, as lines (empty: the binary is as it should be)."""
    counts, vex = scan(path)
    problems = []
    built = [level for level in LEVELS if counts[level]["functions"]]
    if built == ["native"]:
        return []
    for level in ("avx512", "avx2", "baseline"):
        if not counts[level]["functions"]:
            problems.append(f"no function of level {level} (namespace prefix_attn::cpu_{level}) in {path}")
    if counts["avx512"]["functions"] and not counts["avx512"]["zmm"]:
        problems.append("level avx512 uses no zmm register: it does not take the kernels' AVX-512 path")
    if counts["avx2"]["functions"]:
        if not counts["avx2"]["ymm"]:
            problems.append("level avx2 uses no ymm register")
        if counts["avx2"]["zmm"]:
            problems.append(f"level avx2 uses zmm registers ({counts['avx2']['zmm']} instructions)")
    for level in ("baseline", "other"):
        for function, n in sorted(vex[level].items(), key=lambda kv: -kv[1])[:20]:
            problems.append(f"{level}: {n} AVX (VEX/EVEX) instructions in {function}")
    return problems


def default_path() -> str:
    import prefix_attn

    found = glob.glob(os.path.join(os.path.dirname(prefix_attn.__file__), "_C*.so"))
    if not found:
        raise SystemExit("no prefix_attn/_C*.so: build the extension first")
    return found[0]


def main(argv) -> int:
    path = argv[1] if len(argv) > 1 else default_path()
    counts, _ = scan(path)
    print(f"{path}: {os.path.getsize(path) / 1e6:.2f} MB")
    for level in LEVELS + ("other",):
        c = counts[level]
        if c["functions"]:
            print(f"  {level:9s} {c['functions']:5d} functions {c['insns']:7d} instructions: "
                  f"{c['zmm']:5d} with zmm, {c['ymm']:5d} with ymm, {c['vex']:5d} VEX/EVEX")
    problems = check(path)
    for problem in problems:
        print("  PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
