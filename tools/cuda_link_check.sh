#!/usr/bin/env bash
# Builds the extension with its CUDA kernels against a CUDA build of torch, the way setup.py does
# with PREFIX_ATTN_CUDA=1, without importing that torch and without a GPU, and checks what the
# dynamic loader will do with the result (once, the cuda backend's stream resolved to null).
#
#   tools/cuda_link_check.sh                 (or `make cuda-link-check`): build, check, control
#   tools/cuda_link_check.sh --check FILE.so checks 1-4 on a build made elsewhere, e.g. on a GPU
#                                            machine against its installed torch:
#     TORCH_CUDA_DIR=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') \
#       tools/cuda_link_check.sh --check prefix_attn/_C.*.so
#
# The CUDA torch comes from, first to last:
#   TORCH_CUDA_DIR      a folder holding torch/include and torch/lib (an unpacked wheel, or the
#                       site-packages of an installed CUDA torch)
#   TORCH_CUDA_WHEEL    a CUDA torch wheel (.whl); its headers and libraries are unpacked once
#                       into build/cuda-link-check/ (about 1 GB)
#   pip download        torch==$TORCH_CUDA_VERSION (default: the venv's torch version, without
#                       its local tag), --no-deps: PyPI's Linux wheels are CUDA builds (~550 MB)
# Other knobs: PY (default .venv/bin/python; never imports torch here), NVCC, CXX,
# CUDA_HOME (default: nvcc's), CUDA_LINK_ARCH (default 80; linking does not depend on it).
#
# It asserts that
#   1. the extension needs libc10.so and libc10_cuda.so (readelf -d: NEEDED);
#   2. it never names the AOTI shim's aoti_torch_get_current_cuda_stream, and the current stream's
#      path is an undefined (U) reference to c10::impl::device_guard_impl_registry that libc10.so
#      defines, whose CUDA entry libc10_cuda.so (defining c10::cuda::getCurrentCUDAStream)
#      registers when it loads;
#   3. every weak undefined symbol of the extension that torch defines is defined by a library the
#      extension itself needs (a weak reference keeps no library in NEEDED, so it bound to
#      null when nothing else pulled libtorch_cuda.so into the load scope, and to the symbol only
#      by accident when something did);
#   4. every strong undefined symbol is defined in the extension's load scope (its NEEDED libraries
#      and theirs, and python), so the import cannot fail with "undefined symbol";
#   5. the check is sensitive: a control object holding the old weak reference, linked the same
#      way, shows the root cause (no NEEDED libtorch_cuda.so, a `w` symbol) and fails check 3.
# What it cannot show: that a call computes. The cuda backend's probe does that on a GPU.
#
# Not in CI (.ci/run) for now: each fresh runner would download a ~530 MB wheel and unpack ~1 GB.
# Its time would fit (about 70 s on 2 cores, download included). Run it after changing the glue's
# torch dependencies, setup.py's link flags, or the torch the GPU runs use.
set -euo pipefail
CHECK_ONLY=
if [[ ${1:-} == --check ]]; then
  [[ -f ${2:-} ]] || { echo "usage: $0 [--check FILE.so]" >&2; exit 2; }
  CHECK_ONLY=$(readlink -f "$2")
fi
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
ARCH=${CUDA_LINK_ARCH:-80}
OUT=build/cuda-link-check
mkdir -p "$OUT"
fail() { echo "cuda-link-check: FAIL: $*" >&2; exit 1; }

# --------------------------------------------------------------------------- the CUDA torch
unpack() {  # wheel -> folder holding torch/include and torch/lib
  local wheel=$1 dest="$OUT/$(basename "$1" .whl)"
  if [[ ! -f "$dest/.unpacked" ]]; then
    echo "== unpacking torch/include and torch/lib of $(basename "$wheel") into $dest" >&2
    rm -rf "$dest" && mkdir -p "$dest"
    unzip -q -o "$wheel" 'torch/include/*' 'torch/lib/*' 'torch/version.py' 'torch/utils/cpp_extension.py' -d "$dest"
    touch "$dest/.unpacked"
  fi
  echo "$dest"
}
if [[ -n "${TORCH_CUDA_DIR:-}" ]]; then
  ROOT=$TORCH_CUDA_DIR
elif [[ -n "${TORCH_CUDA_WHEEL:-}" ]]; then
  ROOT=$(unpack "$TORCH_CUDA_WHEEL")
else
  version=${TORCH_CUDA_VERSION:-$("$PY" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])")}
  wheel=$(ls "$OUT"/wheels/torch-"$version"-*.whl 2>/dev/null | head -1 || true)
  if [[ -z "$wheel" ]]; then
    echo "== pip download torch==$version (--no-deps)"
    pyver=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
    # ===: exactly this version, never a local build such as 2.13.0+cpu from a find-links folder.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
      --python-version "$pyver" "torch===$version" -d "$OUT/wheels" \
      || fail "could not download torch==$version; set TORCH_CUDA_WHEEL or TORCH_CUDA_DIR"
    wheel=$(ls "$OUT"/wheels/torch-"$version"-*.whl | head -1)
  fi
  ROOT=$(unpack "$wheel")
fi
TORCH=$ROOT/torch
TLIB=$TORCH/lib
[[ -f $TLIB/libtorch_cuda.so && -d $TORCH/include/c10/cuda ]] || fail "$TORCH is not a CUDA build of torch"
TORCH_VERSION=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$TORCH/version.py")

# nvcc names its own root (TOP), also when it is a wrapper script.
if [[ -z ${CUDA_HOME:-} ]] && command -v "$NVCC" >/dev/null; then
  CUDA_HOME=$(readlink -f "$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')")
fi
CUDA_LIB=${CUDA_HOME:-/nonexistent}/lib64
[[ -n $CHECK_ONLY || -f $CUDA_LIB/libcudart.so ]] || fail "no libcudart.so under $CUDA_LIB (set CUDA_HOME)"
echo "== torch $TORCH_VERSION from $ROOT; CUDA toolkit ${CUDA_HOME:-not found}"

# --------------------------------------------------------------------------- build, as setup.py does
# setup.py's link flags for the CUDA build, read from setup.py itself (no import: that needs torch).
LINK_ARGS=$("$PY" - <<'EOF'
import ast
for node in ast.parse(open("setup.py").read()).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CUDA_LINK_ARGS" for t in node.targets):
        print(" ".join(ast.literal_eval(node.value)))
EOF
)
[[ -n "$LINK_ARGS" ]] || fail "setup.py defines no CUDA_LINK_ARGS"
link() {  # output, objects...: CUDAExtension's libraries, then setup.py's extra_link_args
  local out=$1; shift
  # shellcheck disable=SC2086
  "$CXX" -shared "$@" -L"$TLIB" -L"$CUDA_LIB" -lc10 -ltorch -ltorch_cpu -ltorch_python -lcudart -lc10_cuda \
    -ltorch_cuda -fopenmp $LINK_ARGS -o "$out"
}

SO=$OUT/_C.so
if [[ -n $CHECK_ONLY ]]; then
  SO=$CHECK_ONLY
else
  PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  ABI=$(nm -DC "$TLIB/libc10.so" | grep -c '__cxx11' >/dev/null && echo 1 || echo 0)
  # The C++ standard torch's cpp_extension passes (c++17 up to torch 2.11, c++20 since).
  STD=$(grep -o "common_cflags += \['-std=c++[0-9]*'" "$TORCH/utils/cpp_extension.py" 2>/dev/null \
        | grep -o 'c++[0-9]*' || echo c++20)
  # The defines and include paths of torch.utils.cpp_extension's CUDAExtension and BuildExtension.
  DEFS=(-DPREFIX_ATTN_WITH_CUDA -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=$ABI)
  INCS=(-I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" -I"$CUDA_HOME/include" -I"$PYINC")
  NVCC_FLAGS=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
              -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
  mapfile -t CXX_SOURCES < <(ls csrc/prefix_attn_api.cpp csrc/cpu/prefix_attn_cpu.cpp csrc/cuda/*.cpp)
  mapfile -t CU_SOURCES < <(ls csrc/cuda/*.cu)
  echo "== compiling ${CXX_SOURCES[*]} ${CU_SOURCES[*]} (sm_$ARCH, -std=$STD)"
  mkdir -p "$OUT/obj"
  objs=() pids=()
  for f in "${CXX_SOURCES[@]}"; do
    objs+=("$OUT/obj/${f//\//_}.o")
    "$CXX" -std="$STD" -fPIC -O3 -fopenmp -fno-math-errno "${DEFS[@]}" "${INCS[@]}" -c "$f" -o "${objs[-1]}" &
    pids+=($!)
  done
  for f in "${CU_SOURCES[@]}"; do
    objs+=("$OUT/obj/${f//\//_}.o")
    "$NVCC" -std="$STD" -O3 -lineinfo "${NVCC_FLAGS[@]}" -gencode "arch=compute_$ARCH,code=sm_$ARCH" \
      -Xcompiler -fPIC "${DEFS[@]}" "${INCS[@]}" -c "$f" -o "${objs[-1]}" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || fail "a source did not compile against torch $TORCH_VERSION"; done
  link "$SO" "${objs[@]}"
  echo "== linked $SO"
fi

# --------------------------------------------------------------------------- checks
# Each check reports and the run fails at the end, so a broken build shows every finding at once.
failed=()
verdict() {  # number, passed (0/1), what
  if [[ $2 == 1 ]]; then echo "ok $1. $3"; else echo "FAIL $1. $3"; failed+=("$1"); fi
}
echo; echo "== readelf -d $SO | grep NEEDED"
readelf -d "$SO" | grep NEEDED | sed 's/^ */   /'
needed() { readelf -d "$1" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'; }
ok=1
for lib in libc10.so libc10_cuda.so; do needed "$SO" | grep -qx "$lib" || ok=0; done
verdict 1 $ok "NEEDED: libc10.so (the guard registry) and libc10_cuda.so (the CUDA streams)"

echo; echo "== nm -DC: the current stream's path"
shim=$(nm -D "$SO" | grep aoti_torch_get_current_cuda_stream | sed "s/^ *//" || true)
ours=$(nm -DC "$SO" | grep -E ' U c10::impl::device_guard_impl_registry$' || true)
theirs=$(nm -DC --defined-only "$TLIB/libc10.so" | grep -E ' [BDG] c10::impl::device_guard_impl_registry$' || true)
stream=$(nm -DC --defined-only "$TLIB/libc10_cuda.so" | grep -E ' T c10::cuda::getCurrentCUDAStream\(' || true)
registrar=$(nm -DC "$TLIB/libc10_cuda.so" | grep -E ' U c10::impl::DeviceGuardImplRegistrar::DeviceGuardImplRegistrar\(' || true)
echo "   _C.so:          ${ours:-<missing>}${shim:+; and $shim}"
echo "   libc10.so:      ${theirs:-<missing>}"
echo "   libc10_cuda.so: ${stream:-<missing>}"
echo "   libc10_cuda.so: ${registrar:-<missing>}"
ok=1; [[ -z $shim && -n $ours && -n $theirs && -n $stream && -n $registrar ]] || ok=0
verdict 2 $ok "no aoti_torch_get_current_cuda_stream; the registry is U in _C.so and defined by libc10.so"

# Checks 3 and 4 walk the load scope: NEEDED breadth-first through torch/lib, the toolkit and the
# system; libraries torch takes from its nvidia-* wheels (cuBLAS, cuDNN, ...) are not here and are
# reported, since only torch's own libraries need them.
scope_check() {  # so -> prints what it found; exit status: 2 (check 3 fails) + 1 (check 4 fails)
  "$PY" - "$1" "$TLIB" "$CUDA_LIB" "$("$PY" -c 'import sys; print(sys.executable)')" <<'EOF'
import glob, os, re, subprocess, sys
so, tlib, cudalib, python = sys.argv[1:]

def nm(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, path], capture_output=True, text=True).stdout
    return [l.split() for l in out.splitlines() if l.strip()]

def needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    return re.findall(r"Shared library: \[(.*?)\]", out)

ldconfig = dict(re.findall(r"^\s*(\S+) \(libc6,x86-64.*?\) => (\S+)$",
                           subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout, re.M))
# Where a torch wheel finds the CUDA libraries: nvidia-* wheels next to it (site-packages/nvidia).
nvidia = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(tlib)), "nvidia", "*", "lib")))
def find(soname):
    for d in (tlib, cudalib, *nvidia):
        if os.path.exists(os.path.join(d, soname)):
            return os.path.join(d, soname)
    return ldconfig.get(soname)

scope, missing, queue = [], [], list(needed(so))
py = os.path.realpath(python)
scope.append(py)
scope += [p for p in (find(n) for n in needed(py)) if p]  # libpython, when python links it
while queue:
    name = queue.pop(0)
    path = find(name)
    if path is None:
        missing.append(name) if name not in missing else None
    elif path not in scope:
        scope.append(path)
        queue += needed(path)
defined = {}
for path in scope:
    for parts in nm(path, "--defined-only"):
        if len(parts) == 3:
            defined.setdefault(parts[2].split("@")[0], path)
torch_defined = set()  # by any library of torch, in the load scope or not
for name in os.listdir(tlib):
    if ".so" in name:
        torch_defined.update(p[2].split("@")[0] for p in nm(os.path.join(tlib, name), "--defined-only") if len(p) == 3)
base = lambda s: s.split("@")[0]
direct = {p for p in (find(n) for n in needed(so)) if p}
undefined = [(p[0], p[1]) for p in nm(so, "--undefined-only") if len(p) == 2]
weak = [base(s) for kind, s in undefined if kind in "wv"]
where = lambda s: os.path.basename(defined[s]) if s in defined else "nowhere: null at run time"
weak_ok = [f"{s} ({where(s)})" for s in weak if s not in torch_defined or defined.get(s) in direct]
weak_bad = [f"{s} (defined by torch; found {where(s)})" for s in weak if s in torch_defined and defined.get(s) not in direct]
unresolved = [s for kind, s in undefined if kind == "U" and base(s) not in defined]
print(f"   {len(undefined)} undefined symbols; load scope: {len(scope)} objects; "
      f"not found here: {', '.join(missing) or 'none'}")
print(f"   weak, and safe (not torch's, or its definer is NEEDED): {', '.join(weak_ok) or 'none'}")
print(f"   weak, torch's, definer not NEEDED: {', '.join(weak_bad) or 'none'}")
print(f"   strong, defined nowhere in the scope: {', '.join(unresolved) or 'none'}")
sys.exit((2 if weak_bad else 0) + (1 if unresolved else 0))
EOF
}
echo; echo "== load scope of $SO"
rc=0; scope_check "$SO" || rc=$?
verdict 3 $(( rc & 2 ? 0 : 1 )) "every weak reference to a symbol of torch is backed by a library the extension needs"
verdict 4 $(( rc & 1 ? 0 : 1 )) "every strong undefined symbol is defined in the load scope"
finish() {
  if (( ${#failed[@]} )); then fail "check(s) ${failed[*]} of $SO"; fi
  echo; echo "cuda-link-check: $SO resolves its CUDA stream at load time (torch $TORCH_VERSION)"
}
[[ -z $CHECK_ONLY ]] || { finish; exit 0; }

echo; echo "== control: the old glue's weak reference, linked the same way"
cat > "$OUT/control.cpp" <<'EOF'
#include <cstdint>
extern "C" __attribute__((weak)) int32_t aoti_torch_get_current_cuda_stream(int32_t, void**);
extern "C" void* control_stream() {
  void* s = nullptr;
  if (aoti_torch_get_current_cuda_stream != nullptr) aoti_torch_get_current_cuda_stream(0, &s);
  return s;
}
EOF
"$CXX" -std=c++20 -fPIC -O2 -c "$OUT/control.cpp" -o "$OUT/control.o"
link "$OUT/control.so" "$OUT/control.o"
echo "   readelf -d control.so | grep NEEDED: $(needed "$OUT/control.so" | tr '\n' ' ')"
echo "   nm -D control.so: $(nm -D "$OUT/control.so" | grep aoti_torch_get_current_cuda_stream | sed 's/^ *//')"
echo "   libtorch_cuda.so: $(nm -D --defined-only "$TLIB/libtorch_cuda.so" | grep ' aoti_torch_get_current_cuda_stream$')"
rc=0; scope_check "$OUT/control.so" || rc=$?
verdict 5 $(( rc & 2 ? 1 : 0 )) "the control keeps no libtorch_cuda.so in NEEDED, and check 3 catches it"
finish
