"""Turns csrc/ into host C++ for the lane-level emulator (tools/cuda_emu/README.md).

Copies csrc/ to OUT, then, in the copy only:
  - prefix_attn_mma.cuh: the inline-PTX wrappers (ldmatrix, mma.sync, cp.async, st.shared) are
    replaced by `#include "emu_ptx.h"`, the emulator's versions of the same functions;
  - `extern __shared__ T smem[];` becomes a pointer to the emulated block's shared memory;
  - `kernel<<<grid, block, smem, stream>>>(args)` becomes `emu::launch(kernel, grid, block, smem,
    stream)(args)`.
Everything else (tile loaders, fragment arithmetic, masks, dropout, launchers) is the real code.
"""
import pathlib
import re
import shutil
import sys

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
if out.exists():
    shutil.rmtree(out)
shutil.copytree(src, out)

mma = out / "cuda" / "prefix_attn_mma.cuh"
text = mma.read_text()
begin = text.index("// --------------------------------------------------------------------------- PTX wrappers")
end = text.index("// --------------------------------------------------------------------------- tiles")
text = text[:begin] + '#include "emu_ptx.h"\n\n' + text[end:]
mma.write_text(text)

for f in list((out / "cuda").glob("*.cu")) + list((out / "cuda").glob("*.cuh")):
    t = f.read_text()
    t = re.sub(r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) smem\[\];",
               r"\1* smem = emu::smem<\1>();", t)
    t = re.sub(r"^(\s*)([^\n]+?)<<<(.*?)>>>\(", r"\1emu::launch(\2, \3)(", t, flags=re.M | re.S)
    assert "<<<" not in t and "asm volatile" not in t, f
    f.write_text(t)
