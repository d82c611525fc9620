#!/usr/bin/env bash
# Installs prefix_attn every way a user would, each into a fresh venv that has only torch, and
# checks that the fused CPU backend then runs (or, without a compiler, that the install works and
# the first call says why in one line). Prints the time of each install and of its first call.
#
#   tools/install_check.sh [case ...]      (default: all)
#
# cases:
#   isolated      pip install <repo>                  pip's default build isolation: a pure-Python
#                                                     install, the kernels compiled at first use
#   no-isolation  pip install --no-build-isolation <repo>   compiled ahead, against the venv's torch
#   sdist         python -m build --sdist, then pip install <sdist>
#   wheel         python -m build --wheel (isolated: pure Python), then pip install <wheel>
#   binary-wheel  pip wheel --no-build-isolation (the portable binary), then pip install <wheel>
#   editable      pip install --no-build-isolation --no-deps -e <repo>   (what `make install` does)
#   no-compiler   CXX=/nonexistent pip install --no-build-isolation <repo>, then a call
#
# Environment: PYTHON (default python3), TORCH (default torch==2.13.0; pip's configured
# find-links / index must hold it, this script never downloads another torch: anything that
# asks for torch gets --no-deps or finds it installed), WORK (default /tmp/prefix_attn_install_check).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
WORK="${WORK:-/tmp/prefix_attn_install_check}"
CASES=("$@")
[ ${#CASES[@]} -eq 0 ] && CASES=(isolated no-isolation sdist wheel binary-wheel editable no-compiler)
export PIP_DISABLE_PIP_VERSION_CHECK=1

rm -rf "$WORK" && mkdir -p "$WORK/dist"
# A clean copy of the tree (no build outputs, no .so of a local build)
git -C "$REPO" ls-files -z --cached --others --exclude-standard | (cd "$REPO" && xargs -0 tar cf -) \
  | (mkdir -p "$WORK/src" && cd "$WORK/src" && tar xf -)

now() { date +%s; }
elapsed() { echo $(( $(now) - $1 )); }

base_venv() {  # one venv with torch, copied per case (python -m pip only: copies keep old shebangs)
  if [ ! -d "$WORK/base" ]; then
    local t0; t0=$(now)
    "$PYTHON" -m venv "$WORK/base"
    "$WORK/base/bin/python" -m pip install -q "$TORCH"
    echo "   (base venv with $TORCH: $(elapsed "$t0") s, not counted)"
  fi
  rm -rf "$WORK/$1" && cp -a "$WORK/base" "$WORK/$1"
  sed -i "s|$WORK/base|$WORK/$1|g" "$WORK/$1/pyvenv.cfg" "$WORK/$1/bin/activate" 2>/dev/null || true
}

# The first call, away from the source tree (so the installed copy is imported), in a process of
# its own, with a cache of its own: python -m prefix_attn, then a CPU call through the fused backend.
build_dist() {  # build_dist VENV sdist|wheel OUTDIR: builds with `python -m build` in a fresh VENV, prints the file
  base_venv "$1" >&2
  "$WORK/$1/bin/python" -m pip install -q build >&2
  local t0; t0=$(now)
  (cd "$SRC" && "$WORK/$1/bin/python" -m build "--$2" --outdir "$3" . > "$WORK/$2.log" 2>&1)
  local out; out=$(ls "$3"/*.tar.gz "$3"/*.whl 2>/dev/null | head -1)
  echo "   built $(basename "$out"): $(elapsed "$t0") s" >&2
  echo "$out"
}

install_dist() {  # install_dist VENV FILE: installs a built sdist / pure wheel, then its first call compiles
  local t0; t0=$(now)
  "$WORK/$1/bin/python" -m pip install -q "$2" 2>&1 | tail -3
  echo "   install: $(elapsed "$t0") s"
  local t1; t1=$(now); first_call "$1" "first use"; echo "   first call (compiles one ISA level): $(elapsed "$t1") s"
}

first_call() {
  local venv="$1" expect="$2"
  (cd "$WORK" && PREFIX_ATTN_CACHE_DIR="$WORK/$venv.cache" "$WORK/$venv/bin/python" -m prefix_attn) > "$WORK/$venv.report" 2>&1 \
    || { cat "$WORK/$venv.report"; return 1; }
  grep -E "^extension|^ +CPU kernels|^  cpu " "$WORK/$venv.report" | sed 's/^/   | /'
  grep -qE "^extension +$expect" "$WORK/$venv.report" || { echo "   expected the extension to be '$expect'"; return 1; }
  grep -qE "^  cpu +available$" "$WORK/$venv.report" || { echo "   the cpu backend is not available"; return 1; }
  (cd "$WORK" && PREFIX_ATTN_CACHE_DIR="$WORK/$venv.cache" "$WORK/$venv/bin/python" -c "
import torch, prefix_attn
from prefix_attn.reference import reference_forward
q, k, v = (torch.randn(2, 4, 33, 40) for _ in range(3)); pk, pv = (torch.randn(4, 7, 40) for _ in range(2))
out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, backend='cpu')
ref = reference_forward(q, k, v, pk[None], pv[None], None, None, None, 40 ** -0.5, True)[0]
assert (out - ref).abs().max() < 1e-4, (out - ref).abs().max()
print('   | a call through the cpu backend matches the reference')")
}

check_case() {
  local case="$1" t0 t1
  echo "== $case"
  # a copy of the tree per case: pip builds in the tree, and a build left there would speed up the next
  local SRC="$WORK/src-$case"
  rm -rf "$SRC" && cp -a "$WORK/src" "$SRC"
  case "$case" in
    isolated)
      base_venv v-isolated; t0=$(now)
      "$WORK/v-isolated/bin/python" -m pip install -q "$SRC" 2>&1 | tail -3
      echo "   install: $(elapsed "$t0") s"
      "$WORK/v-isolated/bin/python" -m pip list > "$WORK/isolated.list" 2>/dev/null
      ! grep -qiE "^nvidia-" "$WORK/isolated.list" || { echo "   CUDA wheels got installed"; return 1; }
      t1=$(now); first_call v-isolated "first use"; echo "   first call (compiles one ISA level): $(elapsed "$t1") s" ;;
    no-isolation)
      base_venv v-noiso
      "$WORK/v-noiso/bin/python" -m pip install -q "setuptools>=77" wheel ninja
      t0=$(now)
      "$WORK/v-noiso/bin/python" -m pip install -q --no-build-isolation "$SRC" 2>&1 | tail -3
      echo "   install (compiles every ISA level): $(elapsed "$t0") s"
      "$WORK/v-noiso/bin/python" -c "import importlib.metadata as m; print('   | Requires-Dist:', [r for r in m.requires('prefix_attn') if 'extra' not in r])"
      t1=$(now); first_call v-noiso "installed"; echo "   first call: $(elapsed "$t1") s" ;;
    sdist)
      local sdist; sdist=$(build_dist v-sdist sdist "$WORK/dist")
      install_dist v-sdist "$sdist" ;;
    wheel)
      local whl; whl=$(build_dist v-wheel wheel "$WORK/dist/pure")
      case "$whl" in *-py3-none-any.whl) ;; *) echo "   expected a pure-Python wheel"; return 1 ;; esac
      unzip -l "$whl" > "$WORK/wheel.list"  # not piped into grep -q: its early exit would fail unzip (pipefail)
      grep -q "prefix_attn/_csrc/cpu/prefix_attn_cpu.cpp" "$WORK/wheel.list" || { echo "   the wheel lacks the C++ sources"; return 1; }
      install_dist v-wheel "$whl" ;;
    binary-wheel)
      base_venv v-bwheel-build
      "$WORK/v-bwheel-build/bin/python" -m pip install -q "setuptools>=77" wheel ninja
      t0=$(now)
      "$WORK/v-bwheel-build/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist/binary" "$SRC"
      local whl; whl=$(ls "$WORK"/dist/binary/*.whl)
      echo "   built $(basename "$whl") ($(du -k "$whl" | cut -f1) kB): $(elapsed "$t0") s"
      base_venv v-bwheel; t0=$(now)
      "$WORK/v-bwheel/bin/python" -m pip install -q "$whl"
      echo "   install: $(elapsed "$t0") s"
      t1=$(now); first_call v-bwheel "installed"; echo "   first call: $(elapsed "$t1") s" ;;
    editable)
      base_venv v-editable
      "$WORK/v-editable/bin/python" -m pip install -q "setuptools>=77" wheel ninja
      t0=$(now)
      "$WORK/v-editable/bin/python" -m pip install -q --no-build-isolation --no-deps -e "$SRC" 2>&1 | tail -3
      echo "   install (what make install does; compiles every ISA level): $(elapsed "$t0") s"
      t1=$(now); first_call v-editable "installed"; echo "   first call: $(elapsed "$t1") s" ;;
    no-compiler)
      base_venv v-nocc
      "$WORK/v-nocc/bin/python" -m pip install -q "setuptools>=77" wheel ninja
      t0=$(now)
      CXX=/nonexistent "$WORK/v-nocc/bin/python" -m pip install -q --no-build-isolation "$SRC" 2>&1 | tail -3
      echo "   install without a compiler: $(elapsed "$t0") s"
      (cd "$WORK" && CXX=/nonexistent PREFIX_ATTN_CACHE_DIR="$WORK/v-nocc.cache" "$WORK/v-nocc/bin/python" -W always -c "
import torch, prefix_attn
q = torch.randn(1, 2, 5, 16)
for _ in range(3):
    out = prefix_attn.prefix_attention(q, q, q)
print('calls ran:', tuple(out.shape))") > "$WORK/v-nocc.out" 2>&1 || { cat "$WORK/v-nocc.out"; return 1; }
      sed 's/^/   | /' "$WORK/v-nocc.out"
      [ "$(grep -c "falling back" "$WORK/v-nocc.out")" = 1 ] || { echo "   expected one fallback warning"; return 1; }
      grep -q "no C++ compiler" "$WORK/v-nocc.out" || { echo "   the warning does not say why"; return 1; } ;;
    *) echo "unknown case $case"; return 2 ;;
  esac
}

failed=()
for c in "${CASES[@]}"; do
  t0=$(now)
  # a subshell outside any `if`: there set -e stops the case at its first failing command
  set +e
  (set -e; check_case "$c")
  rc=$?
  set -e
  if [ $rc = 0 ]; then echo "   $c: ok ($(elapsed "$t0") s in all)"; else echo "   $c: FAILED"; failed+=("$c"); fi
done
[ ${#failed[@]} -eq 0 ] && echo "install-check: all ${#CASES[@]} cases passed" || { echo "install-check: FAILED: ${failed[*]}"; exit 1; }
