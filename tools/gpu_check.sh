#!/usr/bin/env bash
# The GPU check (`make gpu-check`), sized for one 10-minute command on a lent GPU machine:
#
#   1. pick a python with torch: $GPU_PYTHON, else python3, else the project's .venv; without a
#      CUDA device it says so in one line and exits 2;
#   2. env.txt: GPU, driver, python, torch, Triton, CUDA, the project's commit;
#   3. build the extension in place with the CUDA kernels, for this GPU's architecture only
#      (build.log);
#   4. the cuda backend's kernels under compute-sanitizer (memcheck, racecheck: tools/cuda_sanitize.sh,
#      < 60 s), when compute-sanitizer exists, then the GPU test tier, `pytest -m gpu_tier`, on the
#      GPU backends present, under its own timeout (both in tests.log);
#   5. the kernel benchmark suite to its deadline, targets first (results.md / .json / .png);
#   6. the end-to-end benchmark (benchmarks/bench_e2e.py --device cuda: a 1 B Llama and SmolLM2,
#      prefix tuning against PEFT) in the time kept back for it: GPU_CHECK_E2E_SECONDS (default
#      150), at most 45% of what is left when the suite starts. Its rows go into results.md and
#      results.json (key "e2e"), and e2e.md / e2e.json in the results folder (not mirrored).
#
# Everything finishes within --seconds of the start (default 450): each benchmark is killed 15 s
# after its deadline if a case overruns it. A failed build or tier makes the exit status 1, but the
# later steps still run, so a GPU window is never wasted. Every file records the commit
# (tools/project_commit.py). Files go to benchmarks/results/<gpu>/ and, with --mirror DIR (or
# $PREFIX_ATTN_MIRROR), to DIR too, flat: at most 7 files, what a device tool's $OUT takes back.
#
#   tools/gpu_check.sh [--mirror DIR] [--out DIR] [--seconds N] [--tier-timeout N] [--skip-build]
#   tools/gpu_check.sh --tier-only [--out DIR] [--tier-timeout N]     # just the test tier
#   tools/gpu_check.sh --call 1|2 [--mirror DIR] [--out DIR] [--seconds N]
#
# --call splits the check into two device commands of at most 5 minutes each (default --seconds
# 290; `make gpu-call-1`, `make gpu-call-2`), each ending with tools/gpu_summary.py's summary of
# both (under 10,000 characters, the last thing printed):
#   call 1, correctness: steps 2-4 (the tier holds the float64 oracle on every GPU backend, the
#     sync-free checks and the CUDA-graph capture), its log call-1.log, the tier's junit XML tier.xml;
#   call 2, speed: steps 2, 5 and 6 (the build only if the cuda backend is missing, as on a fresh
#     machine), its log call-2.log; the suite gets what e2e (GPU_CHECK_E2E_SECONDS, default 140
#     here) leaves.
#
# Compile caches: TRITON_CACHE_DIR defaults to build/triton-cache when that folder exists (the
# prepared cache, `make triton-cache`); every Triton compile request of every step is logged as a
# hit or a miss in triton-cache[-call-N].log (tools/triton_cache_hook), summed up by the summary. A miss
# on a prepared cache means its keys did not match (another Triton build, options or source).
# compute-sanitizer is skipped in one line when it cannot attach to the device.
#
# Environment: GPU_PYTHON (the python to use), PREFIX_ATTN_VENV (where to look for the project's
# venv, default ./.venv), GPU_CHECK_WORKERS (pytest-xdist workers, default min(cores, 12); 0 = no
# xdist), PREFIX_ATTN_CUDA_ARCHS (default: this GPU's), PREFIX_ATTN_COMMIT (overrides the commit).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
export PYTHONUNBUFFERED=1

SECONDS_TOTAL=${GPU_CHECK_SECONDS:-450}
TIER_TIMEOUT=${GPU_CHECK_TIER_TIMEOUT:-150}
E2E_SECONDS=${GPU_CHECK_E2E_SECONDS:-150}
MIRROR=${PREFIX_ATTN_MIRROR:-}
OUT_DIR=""
SKIP_BUILD=0
TIER_ONLY=0
CALL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mirror) MIRROR=$2; shift 2 ;;
    --out) OUT_DIR=$2; shift 2 ;;
    --seconds) SECONDS_TOTAL=$2; shift 2 ;;
    --tier-timeout) TIER_TIMEOUT=$2; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --tier-only) TIER_ONLY=1; shift ;;
    --call) CALL=$2; shift 2
            case "$CALL" in 1|2) ;; *) echo "gpu-check: --call takes 1 or 2, got '$CALL'" >&2; exit 2 ;; esac
            SECONDS_TOTAL=${GPU_CHECK_SECONDS:-290}; E2E_SECONDS=${GPU_CHECK_E2E_SECONDS:-140} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
DEADLINE=$((START + SECONDS_TOTAL))
left() { echo $((DEADLINE - $(date +%s))); }

# ------------------------------------------------------------------ 1. a python with CUDA torch
VENV=${PREFIX_ATTN_VENV:-$ROOT/.venv}
if [ -n "${GPU_PYTHON:-}" ]; then
  PY=$GPU_PYTHON
else
  PY=python3
  if ! python3 -c "import torch" >/dev/null 2>&1 && [ -x "$VENV/bin/python" ]; then
    PY=$VENV/bin/python
  fi
fi
PROBE='
import re, sys
try:
    import torch
except Exception as e:
    print(f"no CUDA-enabled torch: {sys.executable} cannot import torch ({type(e).__name__}: {e})")
    sys.exit(3)
if torch.version.cuda is None:
    print(f"no CUDA device: torch {torch.__version__} has no CUDA")
    sys.exit(2)
if not torch.cuda.is_available():
    print(f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU")
    sys.exit(2)
name = torch.cuda.get_device_name()
major, minor = torch.cuda.get_device_capability()
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), f"{major}.{minor}", name)
'
probe=$("$PY" -c "$PROBE" 2>/dev/null)
rc=$?
if [ $rc -ne 0 ]; then
  if [ -z "$probe" ]; then
    probe="no CUDA-enabled torch: '$PY' is not a python that imports torch (exit $rc)"
  fi
  [ $rc = 2 ] || [ -n "${GPU_PYTHON:-}" ] || probe="$probe; set GPU_PYTHON to a python with CUDA torch"
  echo "gpu-check: $probe" >&2
  exit 2
fi
read -r SLUG ARCH GPU_NAME <<<"$probe"

OUT_DIR=${OUT_DIR:-$ROOT/benchmarks/results/$SLUG}
mkdir -p "$OUT_DIR" || exit 2
DIRS=("$OUT_DIR")
if [ -n "$MIRROR" ]; then
  mkdir -p "$MIRROR" || exit 2
  [ "$(cd "$MIRROR" && pwd)" != "$(cd "$OUT_DIR" && pwd)" ] && DIRS+=("$MIRROR")
fi
# write one log file in every results folder at once (so a killed run still leaves it everywhere);
# TEE_ARGS=-a appends
to_logs() { local name=$1; shift; local files=(); for d in "${DIRS[@]}"; do files+=("$d/$name"); done; tee ${TEE_ARGS:-} "${files[@]}"; }

# The prepared Triton cache (carried packed: build/triton-cache.tar.gz, unpacked once), and a log
# of every compile request: hit or miss (tools/triton_cache_hook)
if [ ! -d "$ROOT/build/triton-cache" ] && [ -f "$ROOT/build/triton-cache.tar.gz" ]; then
  mkdir -p "$ROOT/build" && tar -xzf "$ROOT/build/triton-cache.tar.gz" -C "$ROOT/build" \
    || echo "gpu-check: build/triton-cache.tar.gz did not unpack; Triton compiles from scratch" >&2
fi
if [ -z "${TRITON_CACHE_DIR:-}" ] && [ -d "$ROOT/build/triton-cache" ]; then
  export TRITON_CACHE_DIR=$ROOT/build/triton-cache
  # Triton's group files hold absolute paths: point them at where the cache is now
  "$PY" tools/triton_cache_prepare.py --relocate "$TRITON_CACHE_DIR" >/dev/null 2>&1 \
    || echo "gpu-check: could not relocate $TRITON_CACHE_DIR's group files: every prepared entry will miss" >&2
fi
TRITON_LOG=$OUT_DIR/triton-cache.log; [ "$CALL" = 0 ] || TRITON_LOG=$OUT_DIR/triton-cache-call-$CALL.log
[ "$TIER_ONLY" = 1 ] || rm -f "$TRITON_LOG"
export PREFIX_ATTN_TRITON_LOG=$TRITON_LOG
export PYTHONPATH=$ROOT/tools/triton_cache_hook${PYTHONPATH:+:$PYTHONPATH}
mirror_triton_log() { local d; for d in "${DIRS[@]:1}"; do [ -f "$TRITON_LOG" ] && cp "$TRITON_LOG" "$d/"; done; true; }
triton_counts() {  # "H hits, M misses" of the log so far
  local h=0 m=0
  [ -f "$TRITON_LOG" ] && { h=$(grep -c '^hit ' "$TRITON_LOG"); m=$(grep -c '^miss ' "$TRITON_LOG"); }
  echo "$h hits, $m misses"
}

PREFIX_ATTN_COMMIT=$("$PY" tools/project_commit.py 2>/dev/null || echo unknown)
export PREFIX_ATTN_COMMIT
header() { echo "# prefix_attn $1, commit $PREFIX_ATTN_COMMIT, $(date -u +%Y-%m-%dT%H:%M:%SZ), $GPU_NAME"; }

# ------------------------------------------------------------------ the test tier
GPU_TESTS=(tests/test_correctness.py tests/test_determinism.py tests/test_api.py tests/test_ops.py tests/test_triton.py
           tests/test_dropout.py tests/test_syncs.py tests/test_cuda_probe.py tests/integrations/test_hf_syncs.py)
run_tier() {  # $1: timeout in seconds; writes tests.log; returns pytest's status, 124 on timeout
  local backends workers xdist=() timeout_args=() missing=0 b
  backends=$("$PY" -c "import prefix_attn as p; print(','.join(b for b in p.available_backends() if b in ('triton', 'cuda')))" 2>&1 | tail -1)
  for b in triton cuda; do
    if [[ ",$backends," != *",$b,"* ]]; then
      why=$("$PY" -c "from prefix_attn import backends; print(backends.unavailable_reason('$b'))" 2>&1 | tail -1)
      echo "gpu-check: FAIL: the $b backend is not available here: $why (available GPU backends: '$backends'; see build.log)"
      missing=1
    fi
  done
  [[ "$backends" =~ ^[a-z,]+$ ]] || backends=triton,cuda  # an import error: the tests fail and say why
  workers=${GPU_CHECK_WORKERS:-$(( $(nproc) < 12 ? $(nproc) : 12 ))}
  if [ "$workers" -gt 1 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then xdist=(-n "$workers"); fi
  if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then timeout_args=(--timeout 100); fi
  local cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache} before after status
  before=$(find "$cache" -name '*.cubin' 2>/dev/null | wc -l)
  {
    header "GPU test tier (pytest -m gpu_tier)"
    echo "# backends under test: $backends; timeout ${1}s; ${xdist[*]:-no xdist}"
    # autotuning off: it would compile every candidate of every test's kernels; the candidates are
    # checked against the oracle by test_triton_every_autotune_candidate instead
    # -v: one line per test as it finishes, so a tier cut short still says what passed (the
    # summary reads them); SIGINT at the timeout: pytest then still writes its report and tier.xml
    PREFIX_ATTN_TEST_BACKENDS=$backends PREFIX_ATTN_AUTOTUNE=0 OMP_NUM_THREADS=1 timeout -s INT -k 10 "$1" \
      "$PY" -m pytest -v -m gpu_tier -p no:cacheprovider -p no:benchmark "${xdist[@]}" "${timeout_args[@]}" \
      --durations=10 --junitxml "$OUT_DIR/tier.xml" "${GPU_TESTS[@]}" 2>&1
    status=$?
    for d in "${DIRS[@]:1}"; do [ -f "$OUT_DIR/tier.xml" ] && cp "$OUT_DIR/tier.xml" "$d/"; done
    echo
    after=$(find "$cache" -name '*.cubin' 2>/dev/null | wc -l)
    echo "# Triton kernels compiled during the tier: $((after - before)) (new entries in $cache); compile requests so far: $(triton_counts)"
    echo "# pytest exit status: $status$([ $status = 124 ] && echo ' (timed out)')"
    exit $status
  } | TEE_ARGS=${TESTS_LOG_APPEND:+-a} to_logs tests.log | tail -25
  status=${PIPESTATUS[0]}
  [ "$status" = 0 ] && status=$missing
  return "$status"
}

if [ "$TIER_ONLY" = 1 ]; then
  run_tier "$TIER_TIMEOUT"
  exit $?
fi

# Steps 2-5, logged to gpu-check.log.
main_check() {
# ------------------------------------------------------------------ 2. env.txt
header "gpu-check$([ "$CALL" = 0 ] || echo ", call $CALL of 2")"
echo "gpu-check: $GPU_NAME (sm_${ARCH/./}), python $PY, deadline in $(left) s, results in ${DIRS[*]}"
{
  header "environment"
  echo "commit: $PREFIX_ATTN_COMMIT"
  "$PY" - <<'EOF' 2>&1
import platform, sys, torch
print("python:", sys.version.split()[0], sys.executable)
print("torch:", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
try:
    import triton
    print("triton:", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
p = torch.cuda.get_device_properties(0)
print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
print("host:", platform.node(), platform.platform())
EOF
  echo "cpus: $(nproc)"
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,temperature.gpu --format=csv
} | to_logs env.txt >/dev/null

FAILED=()
# ------------------------------------------------------------------ 3. build
# A prebuilt extension (`make cuda-prebuild`: built here for the GPU machine's torch, stamped with
# the hash of the sources it was built from) is used when it loads and the sources still match.
src_hash() { cat $(find csrc -type f | LC_ALL=C sort) setup.py | sha256sum | cut -c1-16; }
cuda_loads() { "$PY" -c "import sys, prefix_attn; sys.exit('cuda' not in prefix_attn.available_backends())" >/dev/null 2>&1; }
if [ "$SKIP_BUILD" = 0 ] && [ -f build/prebuilt-cuda.sha ] && [ "$(cat build/prebuilt-cuda.sha)" = "$(src_hash)" ] && cuda_loads; then
  echo "== build: skipped, the prebuilt extension loads and matches the sources ($(src_hash))"
  SKIP_BUILD=1
elif [ "$CALL" = 2 ] && [ "$SKIP_BUILD" = 0 ] && cuda_loads; then
  echo "== build: skipped, the cuda backend is already built (call 1 on this machine)"
  SKIP_BUILD=1
fi
if [ "$SKIP_BUILD" = 0 ]; then
  export PREFIX_ATTN_CUDA_ARCHS=${PREFIX_ATTN_CUDA_ARCHS:-$ARCH}
  t0=$(date +%s)
  budget=$(( $(left) - 120 < 240 ? $(left) - 120 : 240 ))
  echo "== build (PREFIX_ATTN_CUDA_ARCHS=$PREFIX_ATTN_CUDA_ARCHS, timeout ${budget}s)"
  {
    header "build"
    PREFIX_ATTN_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} timeout -k 5 "$((budget > 1 ? budget : 1))" \
      "$PY" setup.py build_ext --inplace 2>&1
    status=$?
    echo "# build exit status: $status"
    exit $status
  } | to_logs build.log | tail -5
  if [ "${PIPESTATUS[0]}" = 0 ]; then result=ok; else result=FAILED; FAILED+=(build); fi
  echo "== build: $result, $(( $(date +%s) - t0 )) s"
fi

# ------------------------------------------------------------------ 4. sanitizer, then the test tier
# The cuda kernels were written without a GPU: an out-of-bounds access or a shared-memory race is
# the first thing to know, before any test reads their results. tests.log starts with it.
if [ "$CALL" != 2 ]; then
if command -v compute-sanitizer >/dev/null && [ "$(left)" -gt "${GPU_CHECK_SANITIZER_MIN_LEFT:-$([ "$CALL" = 1 ] && echo 150 || echo 240)}" ]; then
  t0=$(date +%s)
  echo "== compute-sanitizer (tools/cuda_sanitize.sh, timeout 90s)"
  {
    header "compute-sanitizer on the cuda backend's kernels"
    timeout -k 5 90 tools/cuda_sanitize.sh "$PY" 2>&1
    status=$?
    echo "# cuda-sanitize exit status: $status$([ $status = 124 ] && echo ' (timed out)')"
    echo
    exit $status
  } | to_logs tests.log | tail -6
  case "${PIPESTATUS[0]}" in
    0) result=ok ;;
    3) result="skipped (it cannot attach to this device)" ;;
    *) result=FAILED; FAILED+=(sanitizer) ;;
  esac
  TESTS_LOG_APPEND=1
  echo "== compute-sanitizer: $result, $(( $(date +%s) - t0 )) s"
fi
keep=$([ "$CALL" = 1 ] && echo 15 || echo 90)  # call 1 keeps back only the summary's time
tier_timeout=$(( $(left) - keep < TIER_TIMEOUT ? $(left) - keep : TIER_TIMEOUT ))
t0=$(date +%s)
echo "== test tier (timeout ${tier_timeout}s)"
if [ "$tier_timeout" -gt 10 ]; then
  run_tier "$tier_timeout" || FAILED+=(tests)
else
  echo "gpu-check: no time left for the test tier"; FAILED+=(tests)
fi
echo "== test tier: $(( $(date +%s) - t0 )) s; Triton compile requests: $(triton_counts)"
fi

if [ "$CALL" != 1 ]; then

# ------------------------------------------------------------------ 5. the kernel suite, to its deadline
tests_rc=0; [[ " ${FAILED[*]} " == *" tests "* ]] && tests_rc=1
if [ "$CALL" = 2 ]; then  # the tier ran in call 1: its status from tests.log, -1 when not there
  tests_rc=$(grep -o 'pytest exit status: [0-9]*' "$OUT_DIR/tests.log" 2>/dev/null | tail -1 | grep -o '[0-9]*$')
  tests_rc=${tests_rc:--1}
fi
pct=$([ "$CALL" = 2 ] && echo 55 || echo 45)  # call 2: the e2e cases where attention matters need ~140 s
e2e_share=$(( $(left) * pct / 100 < E2E_SECONDS ? $(left) * pct / 100 : E2E_SECONDS ))
[ "$e2e_share" -lt 0 ] && e2e_share=0
SUITE_DEADLINE=$((DEADLINE - e2e_share))
suite_left() { echo $((SUITE_DEADLINE - $(date +%s))); }
echo "== benchmarks ($(suite_left) s for the kernel suite, then ${e2e_share} s for end to end)"
mirror_args=(); [ "${#DIRS[@]}" -gt 1 ] && mirror_args=(--mirror "${DIRS[1]}")
timeout -k 5 $(( $(suite_left) + 15 > 1 ? $(suite_left) + 15 : 1 )) \
  "$PY" benchmarks/gpu_suite.py --skip-tests --tests-rc "$tests_rc" --deadline "$SUITE_DEADLINE" \
  --out "$OUT_DIR" "${mirror_args[@]}"
status=$?
# 124: stopped in a case that overran the deadline; the cases before it are saved
if [ $status = 124 ]; then
  echo "gpu-check: the suite overran its deadline and was stopped; the cases it finished are saved"
elif [ $status != 0 ]; then
  FAILED+=(benchmarks)
fi

# ------------------------------------------------------------------ 6. end to end, to the deadline
echo "== end to end ($(left) s to the deadline)"
merge_args=(); for d in "${DIRS[@]}"; do merge_args+=(--merge-into "$d"); done
timeout -k 5 $(( $(left) + 15 > 1 ? $(left) + 15 : 1 )) \
  "$PY" benchmarks/bench_e2e.py --device cuda --deadline "$DEADLINE" --budget "$(( $(left) > 0 ? $(left) : 0 ))" \
  --out "$OUT_DIR" "${merge_args[@]}"
status=$?
if [ $status = 124 ]; then
  echo "gpu-check: the end-to-end benchmark overran the deadline and was stopped; the cases it finished are saved"
elif [ $status != 0 ]; then
  FAILED+=(e2e)
fi
echo "== end to end: done; Triton compile requests: $(triton_counts)"
fi
mirror_triton_log

echo "gpu-check: done in $(( $(date +%s) - START )) s; $(ls "${DIRS[-1]}" | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu-check: FAILED: ${FAILED[*]}"
  return 1
fi
echo "gpu-check: passed"
}

LOG=gpu-check.log; [ "$CALL" = 0 ] || LOG=call-$CALL.log
main_check 2>&1 | to_logs "$LOG"
rc=${PIPESTATUS[0]}
if [ "$CALL" != 0 ]; then
  echo
  "$PY" tools/gpu_summary.py "$OUT_DIR" --max-chars 10000
fi
exit "$rc"
