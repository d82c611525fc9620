"""The Triton backend against the float64 reference.

On a GPU the whole hostile grid of test_correctness.py runs on Triton as well; this module is
what CPU-only CI can check: the same kernels under TRITON_INTERPRET=1 (set before Triton is
imported, so `make test` runs this file in a process of its own), on small shapes, for the
forward and every backward path, in fp32, fp16 and bf16.
"""
import pytest
import torch

import prefix_attn
from attn_testing import Case as C
from attn_testing import (check_against_reference, check_dropout_against_reference, kernel_keep_mask, make_inputs,
                          recompute_rel_error, reference_pair, run_attention)

if "triton" not in prefix_attn.available_backends():
    pytest.skip("the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 on CPU", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("nan_poison")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    # every prefix mode, causal or not, with ragged sizes (not multiples of the 32 blocks)
    C(B=2, Hq=4, Hkv=2, Nq=37, Nk=50, P=33, D=64, prefix="shared"),
    C(B=2, Hq=4, Hkv=2, Nq=37, Nk=50, P=33, D=64, causal=True, prefix="per_row"),
    C(B=3, Hq=4, Hkv=1, Nq=29, Nk=41, P=7, D=32, causal=True, prefix="bank", kpm="right"),
    C(B=2, Hq=2, Hkv=2, Nq=17, Nk=17, P=0, D=16, causal=True, prefix="none"),
    # decode, and Nk < Nq (early rows see only the prefix)
    C(B=2, Hq=4, Hkv=2, Nq=1, Nk=70, P=63, D=64, prefix="bank", kpm="left"),
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=17, P=9, D=64, causal=True),
    C(B=1, Hq=2, Hkv=1, Nq=40, Nk=7, P=0, D=32, causal=True, prefix="none"),
    # head dims padded to a power of two, strided views
    C(B=2, Hq=2, Hkv=1, Nq=23, Nk=29, P=5, D=80, layout="qT+kvslice"),
    C(B=2, Hq=2, Hkv=2, Nq=23, Nk=29, P=5, D=24, layout="qstride2", causal=True),
    C(B=1, Hq=2, Hkv=1, Nq=17, Nk=33, P=3, D=128, prefix="per_row"),
    # masks: bool and float, broadcast shapes, combined with padding; fully masked rows
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=40, P=1, D=64, causal=True, mask="bool-NqNk"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=33, P=7, D=64, kpm="left", mask="float-B1NqNk"),
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=47, P=5, D=64, kpm="left", mask="fmin-B11Nk"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=0, D=16, prefix="none", kpm="allpad"),
    C(B=3, Hq=4, Hkv=2, Nq=29, Nk=41, P=7, D=64, causal=True, prefix="bank", kpm="right", mask="bool-BHNqNk"),
    # every requires_grad pattern (prefix only: no dq / dk / dv kernel may run)
    C(B=3, Hq=4, Hkv=2, Nq=21, Nk=21, P=15, D=32, causal=True, grads="prefix"),
    C(B=3, Hq=4, Hkv=2, Nq=21, Nk=21, P=15, D=32, causal=True, prefix="bank", grads="prefix"),
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, grads="q"),
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, causal=True, grads="kv"),
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, grads="none"),
    C(B=2, Hq=8, Hkv=2, Nq=21, Nk=30, P=15, D=32, prefix="bank", grads="prefix_k"),
    # large scores (a stale running max overflows)
    C(B=2, Hq=2, Hkv=1, Nq=40, Nk=70, P=17, D=64, causal=True, amp=30),
    # low precision
    C(B=2, Hq=4, Hkv=2, Nq=37, Nk=50, P=33, D=64, causal=True, prefix="bank", dtype="fp16"),
    C(B=2, Hq=4, Hkv=2, Nq=37, Nk=50, P=33, D=64, causal=True, prefix="bank", dtype="bf16"),
    C(B=2, Hq=2, Hkv=1, Nq=1, Nk=60, P=20, D=80, kpm="left", dtype="bf16", layout="qT"),
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=21, P=15, D=32, causal=True, grads="prefix", dtype="fp16"),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in CASES])
def test_triton_matches_reference(case):
    x = make_inputs(case, device=DEVICE)
    ours = run_attention(x, "triton")
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, case)


# The backward's paths. deterministic=False (the default, and every case above): dQ is added by
# atomics from the key-major kernels, and the prefix gradient by atomics; a frozen prefix gets a
# dQ pass of its own over the prefix keys; prefix-only fuses Delta into its one kernel.
# deterministic=True: the dQ kernel owns its rows, and the prefix gradient is summed from chunk
# partials in a fixed order.
PATH_CASES = [
    (C(B=3, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, causal=True, grads="qkv"), False),
    (C(B=3, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, causal=True, grads="qkv"), True),
    (C(B=3, Hq=4, Hkv=2, Nq=37, Nk=50, P=33, D=64, causal=True, prefix="bank", kpm="right"), True),
    (C(B=2, Hq=4, Hkv=2, Nq=37, Nk=50, P=33, D=64, prefix="per_row", mask="bool-NqNk"), True),
    (C(B=3, Hq=4, Hkv=2, Nq=21, Nk=21, P=40, D=32, causal=True, prefix="per_row", grads="prefix"), False),
    (C(B=3, Hq=4, Hkv=1, Nq=21, Nk=21, P=40, D=32, causal=True, prefix="bank", grads="prefix"), True),
    (C(B=2, Hq=4, Hkv=2, Nq=32, Nk=32, P=32, D=32, causal=True), False),  # every tile full: no masks
    (C(B=2, Hq=4, Hkv=2, Nq=32, Nk=64, P=16, D=32, grads="prefix", dtype="bf16"), False),
]


@pytest.mark.gpu_tier
@pytest.mark.parametrize("case,deterministic",
                         [pytest.param(c, d, id=f"{c.id()}-{'det' if d else 'atomic'}") for c, d in PATH_CASES])
def test_triton_backward_paths(case, deterministic):
    x = make_inputs(case, device=DEVICE)
    ours = run_attention(x, "triton", deterministic=deterministic)
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, case)


@pytest.mark.gpu_tier
@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id()) for c in [
        C(B=3, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, causal=True, grads="prefix"),  # Delta fused with dlse
        C(B=2, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, prefix="bank", kpm="left"),
    ]])
def test_triton_lse_gradient(case):
    """A loss on out and lse: Delta = rowsum(dO * O) - dlse, in the preprocess or fused."""
    x = make_inputs(case, device=DEVICE)
    ours = run_attention(x, "triton", lse_grad=True)
    lo = run_attention(x.cast(case.torch_dtype), "reference", lse_grad=True)
    hi = run_attention(x.cast(torch.float64), "reference", lse_grad=True)
    hi.recompute_rel = recompute_rel_error(x)
    check_against_reference(ours, lo, hi, case)


# Attention dropout: every kernel regenerates the stream of csrc/prefix_attn_dropout.h; the
# references apply _dropout.py's mask for the same seed (see test_dropout.py).
DROPOUT_CASES = [
    (C(B=3, Hq=4, Hkv=2, Nq=37, Nk=50, P=13, D=32, causal=True, prefix="bank", kpm="right"), False),  # fused dQ
    (C(B=3, Hq=4, Hkv=2, Nq=37, Nk=50, P=13, D=32, causal=True, prefix="bank", kpm="right"), True),
    (C(B=3, Hq=4, Hkv=1, Nq=21, Nk=21, P=40, D=32, causal=True, grads="prefix"), False),  # one fused kernel
    (C(B=2, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, grads="q", mask="float-B1NqNk"), False),
    (C(B=2, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, causal=True, grads="kv"), False),
    (C(B=2, Hq=4, Hkv=2, Nq=32, Nk=64, P=32, D=64, causal=True, dtype="bf16"), False),
    (C(B=2, Hq=2, Hkv=1, Nq=17, Nk=23, P=5, D=80, layout="qT+kvslice", dtype="fp16"), False),
]


@pytest.mark.gpu_tier
@pytest.mark.parametrize("case,deterministic",
                         [pytest.param(c, d, id=f"{c.id()}-{'det' if d else 'atomic'}") for c, d in DROPOUT_CASES])
def test_triton_dropout_matches_reference(case, deterministic):
    check_dropout_against_reference(case, "triton", 0.3, DEVICE, deterministic=deterministic,
                                    lse_grad=case.grads == "prefix")


@pytest.mark.gpu_tier
def test_triton_dropout_mask_is_the_recorded_one():
    mask, call = kernel_keep_mask("triton", DEVICE, 2, 2, 1, 24, 20, 44, 0.4, seed=5)
    assert torch.equal(mask.cpu(), call.mask().cpu())
    assert 0.5 < mask.double().mean().item() < 0.7


def _candidate_rounds():
    """(head dim, round): round r forces every kernel kind's r-th autotuning candidate."""
    from prefix_attn.triton_backend import configs

    out = []
    for D in (64, 128):
        n = max(len(configs.candidates(kind, D, torch.bfloat16)) for kind in configs.KINDS)
        out += [pytest.param(D, r, id=f"D{D}-round{r}") for r in range(n)]
    return out


@pytest.mark.gpu_tier
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU candidate configs run on a GPU only")
@pytest.mark.parametrize("D,round_", _candidate_rounds())
def test_triton_every_autotune_candidate(D, round_):
    """Each tile config the autotuner may pick (configs.py), forced in turn, against the oracle:
    the tier runs with PREFIX_ATTN_AUTOTUNE=0, so this is where the other candidates run."""
    from prefix_attn.triton_backend import configs, tuning

    forced = {kind: c[min(round_, len(c) - 1)] for kind in configs.KINDS
              for c in [configs.candidates(kind, D, torch.bfloat16)]}
    cases = [C(B=2, Hq=4, Hkv=2, Nq=200, Nk=333, P=70, D=D, causal=True, dtype="bf16"),
             C(B=3, Hq=4, Hkv=2, Nq=96, Nk=96, P=64, D=D, prefix="bank", grads="prefix", dtype="bf16")]
    tuning.FORCED.update(forced)
    try:
        for case in cases:
            for det in (False, True):
                x = make_inputs(case, device=DEVICE)
                ours = run_attention(x, "triton", deterministic=det)
                lo, hi = reference_pair(x)
                check_against_reference(ours, lo, hi, case, what=f"{forced} det={det}: ")
    finally:
        tuning.FORCED.clear()


@pytest.mark.gpu_tier
@pytest.mark.parametrize("index_kind", ["every_other", "expanded"])
def test_triton_strided_prefix_index_and_lse_grad(index_kind):
    """A prefix_index view with non-unit stride (the kernels read IDX + b) and lse.sum()'s
    stride-0 gradient: both used to be read as if contiguous."""
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Nq, Nk, P, D, T = 4, 4, 2, 19, 23, 9, 32, 3

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE)

    if index_kind == "every_other":
        index = torch.tensor([0, 99, 2, 99, 1, 99, 2, 99], device=DEVICE)[::2]
    else:
        index = torch.tensor([1], device=DEVICE).expand(B)
    leaves = [randn(B, Hq, Nq, D), randn(B, Hkv, Nk, D), randn(B, Hkv, Nk, D), randn(T, Hkv, P, D),
              randn(T, Hkv, P, D)]
    results = {}
    for backend in ("triton", "reference"):
        x = [t.clone().requires_grad_() for t in leaves]
        out, lse = prefix_attn.prefix_attention(*x, causal=True, prefix_index=index, return_lse=True,
                                                backend=backend)
        (out.sum() + lse.sum()).backward()
        results[backend] = [out.detach(), lse.detach()] + [t.grad for t in x]
    for name, got, want in zip(["out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], *results.values()):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu_tier
def test_triton_deterministic_prefix_grads():
    case = C(B=5, Hq=4, Hkv=1, Nq=19, Nk=19, P=40, D=32, causal=True, prefix="shared", grads="prefix")
    x = make_inputs(case, device=DEVICE)
    first = run_attention(x, "triton", deterministic=True)
    for _ in range(2):
        again = run_attention(x, "triton", deterministic=True)
        for name, g in first.grads.items():
            if g is not None:
                assert torch.equal(g, again.grads[name]), f"d{name} changed between runs"


@pytest.mark.gpu_tier
def test_triton_fully_fmin_rows_refuse_in_backward():
    """A row hiding every key behind finfo.min (P == 0) cannot be rebuilt from a float32 lse:
    the backward must refuse, not return wrong gradients."""
    q = torch.randn(1, 1, 3, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 1, 4, 32, device=DEVICE)
    mask = torch.zeros(3, 1, device=DEVICE)
    mask[1] = torch.finfo(torch.float32).min
    out = prefix_attn.prefix_attention(q, k, k, attn_mask=mask, backend="triton")
    torch.testing.assert_close(out[0, 0, 1], k[0, 0].mean(0))
    with pytest.raises(NotImplementedError, match="finfo.min"):
        out.sum().backward()


@pytest.mark.parametrize("prefix", ["bank", "shared"])
def test_triton_launchers_cuda_path_read_nothing_back(prefix, monkeypatch):
    """The launchers' host code, forward and backward, makes no host read on its CUDA path (each
    would synchronise the stream): the range check is a device assert, the rows are grouped
    without bincount, and the float-mask lse test is not made when there is a prefix. Here on
    CPU, with the range check's device decision forced (test_syncs.py has the rest)."""
    from prefix_attn import _inputs, triton_backend
    from attn_testing import HostReads

    monkeypatch.setattr(_inputs, "_host_reads_are_free", lambda t: False)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Nq, Nk, P, D, T = 3, 4, 2, 9, 11, 5, 16, 4
    q, dout = (torch.randn(B, Hq, Nq, D, generator=g) for _ in range(2))
    k, v = (torch.randn(B, Hkv, Nk, D, generator=g) for _ in range(2))
    n = T if prefix == "bank" else 1
    pk, pv = (torch.randn(n, Hkv, P, D, generator=g) for _ in range(2))
    index = torch.tensor([3, 0, 3]) if prefix == "bank" else None
    mask = torch.randn(B, 1, Nq, Nk, generator=g).expand(B, Hq, Nq, Nk)  # a float mask
    with HostReads() as counter:
        out, lse = triton_backend.triton_forward(q, k, v, pk, pv, index, None, mask, 0.25, True)
        grads = triton_backend.triton_backward(dout, q, k, v, pk, pv, index, None, mask, out, lse, None, 0.25, True,
                                            False, True, True, True)
    assert counter.reads == [], f"host reads: {counter.reads}"
    assert counter.asserts == (2 if prefix == "bank" else 0)
    want = prefix_attn.prefix_attention(q, k, v, pk[0] if n == 1 else pk, pv[0] if n == 1 else pv, causal=True,
                                        softmax_scale=0.25, attn_mask=mask, prefix_index=index, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert all(t.shape == like.shape for t, like in zip(grads, (q, k, v, pk, pv)))


# --------------------------------------------------------------------------- the Triton ops validate too

from test_api import RAW_BWD_ERRORS, RAW_FWD_ERRORS, _bwd_good, assert_bwd_op_refuses, assert_fwd_op_refuses  # noqa: E402
from attn_testing import op_kwargs  # noqa: E402


@pytest.mark.parametrize("name", list(RAW_FWD_ERRORS))
def test_triton_fwd_op_validates(name):
    """torch.ops.prefix_attn.triton_fwd may be called directly, past the Python checks of
    prefix_attention: it must refuse what the compiled fwd refuses, before a kernel reads out of
    bounds (an unexpanded mask, a short padding mask, a short prefix_v, k with another D)."""
    assert_fwd_op_refuses(torch.ops.prefix_attn.triton_fwd.default, name)


@pytest.mark.parametrize("name", list(RAW_BWD_ERRORS))
def test_triton_bwd_op_validates(name):
    assert_bwd_op_refuses(torch.ops.prefix_attn.triton_bwd.default, name)


def test_triton_ops_accept_the_good_arguments():
    good = _bwd_good()
    op = torch.ops.prefix_attn.triton_bwd.default
    grads = op(**op_kwargs(op, **good))
    assert [tuple(g.shape) for g in grads] == [tuple(good[n].shape) for n in ("q", "k", "v", "prefix_k", "prefix_v")]
