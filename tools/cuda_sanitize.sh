#!/usr/bin/env bash
# The cuda backend's kernels under compute-sanitizer: memcheck (out-of-bounds and misaligned
# accesses, also of shared memory) and racecheck (shared-memory hazards: a missing barrier), on a
# few small shapes that reach every kernel: the tensor-core forward, dQ, dK/dV and dprefix (bf16
# and fp16; head dims 64, 96 and 256; tails; causal, masks, a bank; dprefix in place and in
# chunks; strided views; dropout when the API has it) and the SIMT kernels (fp32, head dim 40).
# Under a minute on an H200, most of it racecheck. Needs the extension built with its CUDA
# kernels (tools/gpu_check.sh builds it first and runs this early, when compute-sanitizer exists).
#
#   tools/cuda_sanitize.sh [python]        exit status 1 when a tool reports an error, 3 when
#                                          compute-sanitizer cannot attach to the device (one line)
#
# Some GPU machines refuse the sanitizer the device; a few-second probe (the driver API alone:
# init, a context, one allocation, under memcheck) finds out before any time goes to the kernels.
#
# PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor gets its own allocation, so that memcheck sees a
# read past a tensor's end instead of into the caching allocator's next block.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${1:-${GPU_PYTHON:-python3}}
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
command -v "$SAN" >/dev/null || { echo "cuda-sanitize: $SAN not found"; exit 2; }

SCRIPT=$(mktemp --suffix=.py)
trap 'rm -f "$SCRIPT"' EXIT
cat >"$SCRIPT" <<'EOF'
import inspect, sys
import torch
import prefix_attn
from prefix_attn import backends

reason = backends.unavailable_reason("cuda")
if reason is not None:
    sys.exit(f"cuda-sanitize: the cuda backend is not available: {reason}")
has_dropout = "dropout_p" in inspect.signature(prefix_attn.prefix_attention).parameters
dev = "cuda"


def call(B, Hq, Hkv, Nq, Nk, P, D, dtype, causal=False, prefix="shared", kpm=False, mask=None, transposed=False,
         dropout=0.0, grads=("q", "k", "v", "prefix")):
    torch.manual_seed(0)
    q = torch.randn(B, Nq, Hq, D, device=dev, dtype=dtype).transpose(1, 2) if transposed else \
        torch.randn(B, Hq, Nq, D, device=dev, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, device=dev, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, device=dev, dtype=dtype)
    lead = {"shared": (), "per_row": (B,), "bank": (3,)}[prefix]
    pk = torch.randn(*lead, Hkv, P, D, device=dev, dtype=dtype)
    pv = torch.randn(*lead, Hkv, P, D, device=dev, dtype=dtype)
    index = torch.arange(B, device=dev) % 2 if prefix == "bank" else None
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (pk, "prefix"), (pv, "prefix")):
        t.requires_grad_(name in grads)
    kw = dict(prefix_index=index, causal=causal, backend="cuda")
    if kpm:
        kw["key_padding_mask"] = torch.arange(Nk, device=dev).expand(B, Nk) >= 3
    if mask == "bool":
        kw["attn_mask"] = torch.rand(Nq, Nk, device=dev) > 0.2
    elif mask == "float":
        kw["attn_mask"] = torch.randn(B, 1, Nq, Nk, device=dev)
    if dropout and has_dropout:
        kw["dropout_p"] = dropout
    out = prefix_attn.prefix_attention(q, k, v, pk, pv, **kw)
    out.float().square().sum().backward()
    torch.cuda.synchronize()


bf16, fp16 = torch.bfloat16, torch.float16
call(2, 4, 2, 70, 77, 19, 64, bf16, causal=True)                        # tensor cores: tails, GQA
call(2, 2, 1, 33, 50, 9, 96, fp16, kpm=True, mask="bool", prefix="bank")  # masks, a bank, D 96
call(1, 2, 2, 20, 40, 5, 256, bf16, causal=True, transposed=True)       # D 256, a strided q
call(3, 2, 1, 64, 64, 40, 64, bf16, prefix="per_row", mask="float", grads=("prefix",))  # dprefix only
call(2, 2, 2, 45, 45, 17, 64, bf16, causal=True, dropout=0.2)           # dropout, when the API has it
call(2, 2, 1, 21, 30, 7, 40, torch.float32, causal=True, kpm=True)      # SIMT
print(f"cuda-sanitize: 6 calls ran (dropout {'included' if has_dropout else 'not in this API'})")
EOF

PROBE='
import ctypes, sys
cuda = ctypes.CDLL("libcuda.so.1")
dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
sys.exit(cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0)
         or cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) or cuda.cuCtxSetCurrent(ctx)
         or cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(256)))
'
probe=$(timeout -k 2 ${SANITIZE_PROBE_TIMEOUT:-30} "$SAN" --tool memcheck --error-exitcode 1 "$PY" -c "$PROBE" 2>&1)
rc=$?
if [ "$rc" != 0 ] || grep -q "^========= .*Error" <<<"$probe"; then
  why=$(grep -m1 -i "error\|not supported\|unable" <<<"$probe" | sed 's/^=* *//' | cut -c1-200)
  echo "cuda-sanitize: skipped: compute-sanitizer cannot attach to this device (probe exit $rc: ${why:-no message})"
  exit 3
fi

status=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 1 --print-limit 20 \
    "$PY" "$SCRIPT" 2>&1 | tail -40
  rc=${PIPESTATUS[0]}
  echo "== $tool exit status: $rc"
  [ "$rc" = 0 ] || status=1
done
exit $status
