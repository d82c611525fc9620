#!/bin/bash
# Builds the emulator: tools/cuda_emu/build.sh [OUT]  (default /tmp/cuda_emu)
set -e
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-/tmp/cuda_emu}
mkdir -p "$out"
python3 "$here/prepare.py" "$root/csrc" "$out/csrc"
for f in prefix_attn_kernels prefix_attn_tc_fwd prefix_attn_tc_bwd; do
  cp "$out/csrc/cuda/$f.cu" "$out/csrc/cuda/$f.emu.cpp"
done
san=${EMU_SANITIZE-"-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer"}
flags="-std=c++17 $san -I$here/fake -I$here -I$out/csrc -I$out/csrc/cuda"
objs=""
for f in prefix_attn_kernels prefix_attn_tc_fwd prefix_attn_tc_bwd; do
  g++ $flags -c "$out/csrc/cuda/$f.emu.cpp" -o "$out/$f.o" &
  objs="$objs $out/$f.o"
done
g++ $flags -c "$here/harness.cpp" -o "$out/harness.o"
wait
g++ $flags $objs "$out/harness.o" -o "$out/emu"
echo "built $out/emu"
