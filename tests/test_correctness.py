"""Kernel backends against the reference, on a hostile grid of shapes, layouts, masks,
prefix modes, dtypes and requires_grad patterns.

Every output buffer starts as NaN (``nan_poison``), so an element a kernel does not
write fails the test. The bound is ``err(ours) <= 2 * err(same-precision reference) +
floor`` (see conftest).

The grid is a covering design, not a cartesian product: HAND_CASES lists cases that each
combine several hostile features (every P in {0, 1, 63, 257}, every Nq in {1, 17, 113,
1025}, Nk above and below Nq, head dims 16 to 256, GQA groups 1/2/4, every mask shape,
every prefix mode, every requires_grad pattern), and PRODUCT_CASES crosses the features
most likely to interact (prefix mode x causal x padding) at a small shape.
"""

import itertools
import math

import pytest
import torch

import prefix_attn
from conftest import (
    Case,
    OpLog,
    backend_params,
    bank_index,
    check_against_reference,
    device_for,
    make_inputs,
    padding_lengths,
    reference_pair,
    run_attention,
)

pytestmark = pytest.mark.usefixtures("nan_poison")

BACKENDS = backend_params()

C = Case

HAND_CASES = [
    # tiny and degenerate
    C(B=1, Hq=1, Hkv=1, Nq=1, Nk=1, P=0, D=16, prefix="none"),
    C(B=1, Hq=2, Hkv=2, Nq=1, Nk=1, P=1, D=16),
    C(B=4, Hq=4, Hkv=4, Nq=9, Nk=13, P=3, D=32, prefix="bank"),
    # decoding: one query against a long cache
    C(B=2, Hq=4, Hkv=2, Nq=1, Nk=300, P=63, D=64, prefix="bank"),
    C(B=3, Hq=8, Hkv=2, Nq=1, Nk=129, P=257, D=128, causal=True, prefix="per_row", kpm="left"),
    C(B=1, Hq=2, Hkv=2, Nq=1, Nk=1025, P=0, D=128, prefix="none", kpm="right"),
    # Nq = 17
    C(B=2, Hq=4, Hkv=4, Nq=17, Nk=17, P=0, D=64, causal=True, prefix="none"),
    C(B=2, Hq=4, Hkv=4, Nq=17, Nk=17, P=0, D=64, causal=True, prefix="shared"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=40, P=1, D=80, causal=True, mask="bool-NqNk"),
    C(B=2, Hq=4, Hkv=1, Nq=17, Nk=17, P=63, D=16, causal=True, prefix="bank", layout="qT", grads="prefix"),
    C(B=2, Hq=2, Hkv=1, Nq=17, Nk=50, P=257, D=64, kpm="right", grads="q"),
    C(B=2, Hq=2, Hkv=2, Nq=17, Nk=33, P=63, D=128, prefix="per_row", mask="float-NqNk", grads="prefix"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=17, P=63, D=64, scale=0.5, mask="float-HNqNk"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=33, P=63, D=64, causal=True, prefix="bank", kpm="right", mask="bool-B11Nk", grads="prefix"),
    # Nq = 113 (odd, not a multiple of any block)
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank", layout="kvslice"),
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, prefix="per_row", mask="float-B1NqNk", grads="kv"),
    C(B=1, Hq=6, Hkv=2, Nq=113, Nk=113, P=257, D=128, causal=True, layout="qT+kvslice"),
    C(B=2, Hq=3, Hkv=3, Nq=113, Nk=150, P=1, D=64, kpm="int_left", mask="bool-BHNqNk"),
    C(B=3, Hq=2, Hkv=1, Nq=113, Nk=113, P=0, D=80, causal=True, prefix="none", kpm="right", grads="q"),
    # Nk < Nq: causal rows before Nq - Nk see only the prefix (or nothing when P = 0)
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=17, P=63, D=64, causal=True),
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=50, P=0, D=64, causal=True, prefix="none"),
    C(B=1, Hq=2, Hkv=1, Nq=50, Nk=7, P=1, D=16, causal=True, prefix="bank"),
    C(B=2, Hq=2, Hkv=1, Nq=17, Nk=1, P=257, D=64, causal=True),
    C(B=2, Hq=4, Hkv=2, Nq=100, Nk=1, P=63, D=64, prefix="bank"),
    # block-aligned sizes (the easy path must be right too)
    C(B=2, Hq=4, Hkv=4, Nq=64, Nk=64, P=64, D=64, causal=True, grads="none"),
    C(B=1, Hq=4, Hkv=2, Nq=257, Nk=257, P=63, D=64, causal=True, prefix="bank", mask="bool-1HNqNk"),
    # single-tensor grads and odd requires_grad patterns
    C(B=2, Hq=8, Hkv=2, Nq=31, Nk=31, P=15, D=64, causal=True, prefix="bank", kpm="int_right", grads="k"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=15, D=80, prefix="per_row", mask="bool-Nk", grads="v"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=15, D=16, kpm="allpad", grads="prefix_k"),
    # fully masked rows (P = 0): out 0, lse -inf
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=0, D=16, kpm="allpad"),
    C(B=2, Hq=2, Hkv=1, Nq=40, Nk=40, P=0, D=64, prefix="none", mask="bool-Nq1"),
    # strides
    C(B=2, Hq=2, Hkv=2, Nq=23, Nk=29, P=5, D=64, layout="qstride2"),
    C(B=2, Hq=2, Hkv=1, Nq=129, Nk=129, P=63, D=64, causal=True, prefix="per_row", kpm="left", mask="float-B1NqNk", layout="qT"),
    # other head dims from the SPEC's list
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=33, P=63, D=256, causal=True),
    C(B=1, Hq=2, Hkv=1, Nq=17, Nk=33, P=3, D=96),
    C(B=1, Hq=2, Hkv=1, Nq=17, Nk=33, P=3, D=32, prefix="bank", T=1),
    # long sequences
    C(B=1, Hq=1, Hkv=1, Nq=1025, Nk=1025, P=63, D=64, causal=True),
    C(B=1, Hq=2, Hkv=1, Nq=1025, Nk=1100, P=257, D=128, prefix="bank", T=2, kpm="left", grads="prefix"),
]

LOW_PRECISION_CASES = [
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank", dtype="fp16"),
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank", dtype="bf16"),
    C(B=1, Hq=2, Hkv=1, Nq=1, Nk=300, P=257, D=128, kpm="left", dtype="fp16"),
    C(B=2, Hq=4, Hkv=4, Nq=17, Nk=17, P=0, D=64, causal=True, prefix="none", dtype="bf16"),
    C(B=2, Hq=4, Hkv=1, Nq=64, Nk=100, P=63, D=128, prefix="per_row", mask="float-B1NqNk", layout="qT", dtype="bf16"),
    C(B=2, Hq=2, Hkv=1, Nq=33, Nk=17, P=1, D=16, causal=True, grads="prefix", dtype="fp16"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=0, D=64, kpm="allpad", dtype="fp16"),
    C(B=2, Hq=8, Hkv=2, Nq=50, Nk=50, P=15, D=64, causal=True, prefix="bank", kpm="int_right", grads="prefix", dtype="bf16"),
    C(B=1, Hq=2, Hkv=2, Nq=257, Nk=257, P=63, D=96, causal=True, layout="kvslice", dtype="bf16"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=40, P=7, D=256, mask="bool-NqNk", dtype="fp16"),
]

_GRAD_CYCLE = ["all", "prefix", "q", "kv", "all", "none", "prefix", "all"]


def _product_grads(i, prefix):
    grads = _GRAD_CYCLE[i % len(_GRAD_CYCLE)]
    return "all" if grads == "prefix" and prefix == "none" else grads


PRODUCT_CASES = [
    C(B=3, Hq=4, Hkv=2, Nq=13, Nk=29, P=5, D=32, prefix=prefix, causal=causal, kpm=kpm, grads=_product_grads(i, prefix))
    for i, (prefix, causal, kpm) in enumerate(
        itertools.product(["none", "shared", "per_row", "bank"], [False, True], ["none", "left", "right"])
    )
]

ALL_CASES = HAND_CASES + LOW_PRECISION_CASES + PRODUCT_CASES


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in ALL_CASES])
def test_matches_reference(case, backend):
    x = make_inputs(case, device=device_for(backend))
    ours = run_attention(x, backend)
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, case)
    if case.kpm != "none":
        _check_padded_key_grads_are_zero(case, ours)
    if case.prefix == "bank":
        _check_unused_bank_entries_are_zero(case, ours)


def _check_padded_key_grads_are_zero(c, ours):
    """A padded key is invisible to every query: its dk and dv must be exactly 0."""
    lengths = padding_lengths(c)
    for name in ("k", "v"):
        g = ours.grads[name]
        if g is None:
            continue
        for b, n in enumerate(lengths):
            left = c.kpm in ("left", "int_left") or (c.kpm == "allpad" and b % 2 == 1)
            padded = g[b, :, : c.Nk - n] if left else g[b, :, n:]
            assert torch.count_nonzero(padded) == 0, f"d{name} nonzero on padded keys of row {b}"


def _check_unused_bank_entries_are_zero(c, ours):
    used = set(bank_index(c).tolist())
    for name in ("prefix_k", "prefix_v"):
        g = ours.grads[name]
        if g is None:
            continue
        for t in range(c.n_bank):
            if t not in used:
                assert torch.count_nonzero(g[t]) == 0, f"d{name}[{t}] nonzero but entry {t} is unused"


# --------------------------------------------------------------------------- fully masked rows

MASKED_ROW_CASES = [
    C(B=2, Hq=4, Hkv=2, Nq=40, Nk=9, P=0, D=32, causal=True, prefix="none"),
    C(B=2, Hq=4, Hkv=2, Nq=40, Nk=9, P=0, D=32, causal=True, prefix="shared"),
    C(B=2, Hq=4, Hkv=2, Nq=40, Nk=9, P=0, D=32, causal=True, prefix="bank", dtype="bf16"),
    C(B=3, Hq=2, Hkv=2, Nq=21, Nk=30, P=0, D=64, kpm="allpad"),
    C(B=2, Hq=2, Hkv=1, Nq=30, Nk=30, P=0, D=64, prefix="none", mask="bool-Nq1", dtype="fp16"),
    C(B=2, Hq=2, Hkv=1, Nq=30, Nk=30, P=0, D=64, prefix="none", mask="float-Nq1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in MASKED_ROW_CASES])
def test_fully_masked_rows(case, backend):
    """P == 0 and every key hidden: out is exactly 0, lse is -inf, nothing is NaN, and
    those queries get dq == 0."""
    x = make_inputs(case, device=device_for(backend))
    if case.mask.startswith("float"):
        # make the masked rows fully -inf (a random float mask rarely masks a whole row)
        x.attn_mask = torch.where(
            torch.arange(case.Nq, device=x.attn_mask.device).view(-1, 1) % 3 == 0,
            torch.full_like(x.attn_mask, -math.inf),
            x.attn_mask,
        )
    ours = run_attention(x, backend)
    lo, hi = reference_pair(x)
    masked = torch.isneginf(hi.lse)
    assert masked.any(), "test setup: no fully masked row"
    assert not masked.all(), "test setup: every row masked"
    out_masked = ours.out.masked_select(masked.unsqueeze(-1))
    assert torch.equal(out_masked, torch.zeros_like(out_masked)), "out of a fully masked row is not exactly 0"
    assert torch.equal(torch.isneginf(ours.lse), masked), "lse is -inf exactly on the fully masked rows"
    for name, g in ours.grads.items():
        if g is not None:
            assert torch.isfinite(g).all(), f"d{name} not finite"
    dq = ours.grads["q"]
    dq_masked = dq.masked_select(masked.unsqueeze(-1))
    assert torch.count_nonzero(dq_masked) == 0, "dq of a fully masked query is not 0"
    check_against_reference(ours, lo, hi, case)


# --------------------------------------------------------------------------- odd head dims and dtypes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [8, 59, 512])
def test_unusual_head_dim_is_right_or_refused(D, backend):
    """A head dim a backend cannot run must be refused with a message naming the head
    dim; one it accepts must be right."""
    c = C(B=1, Hq=2, Hkv=1, Nq=13, Nk=21, P=5, D=D, causal=True)
    x = make_inputs(c, device=device_for(backend))
    try:
        ours = run_attention(x, backend)
    except (ValueError, TypeError, NotImplementedError) as e:
        msg = str(e).lower()
        assert "head" in msg or "dim" in msg or str(D) in msg, f"refusal does not name the head dim: {e}"
        return
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_right_or_refused(backend):
    c = C(B=2, Hq=2, Hkv=1, Nq=13, Nk=21, P=5, D=32, causal=True, dtype="fp64")
    x = make_inputs(c, device=device_for(backend))
    try:
        ours = run_attention(x, backend)
    except (ValueError, TypeError, NotImplementedError) as e:
        assert "dtype" in str(e) or "float64" in str(e), f"refusal does not name the dtype: {e}"
        return
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, c)


# --------------------------------------------------------------------------- gradient consistency


def _prefix_grads(x, backend):
    r = run_attention(x, backend)
    return r, r.grads["prefix_k"], r.grads["prefix_v"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_shared_prefix_grad_is_sum_of_per_row_grads(causal, backend):
    """The kernel's in-kernel reduction of a shared prefix's gradient must equal the
    per-row gradients summed over the batch (independent of the reference)."""
    c = C(B=3, Hq=4, Hkv=1, Nq=37, Nk=45, P=19, D=64, causal=causal, kpm="left")
    shared = make_inputs(c, device=device_for(backend))
    rows = dataclasses_replace_prefix(shared, "per_row")
    r_shared, gk_shared, gv_shared = _prefix_grads(shared, backend)
    r_rows, gk_rows, gv_rows = _prefix_grads(rows, backend)
    torch.testing.assert_close(r_shared.out, r_rows.out, rtol=1e-6, atol=1e-6)
    for name, got, per_row in (("prefix_k", gk_shared, gk_rows), ("prefix_v", gv_shared, gv_rows)):
        assert got.shape == (c.Hkv, c.P, c.D), f"d{name} shape {tuple(got.shape)}"
        scale = per_row.abs().max().item()
        torch.testing.assert_close(got, per_row.sum(0), rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_grad_is_scatter_of_per_row_grads(backend):
    """A bank's gradient is the per-row gradients added into the entries the rows
    used, and exactly zero in the entries no row used."""
    c = C(B=5, Hq=4, Hkv=2, Nq=29, Nk=37, P=11, D=32, causal=True, prefix="bank", T=7)
    bank = make_inputs(c, device=device_for(backend))
    index = torch.tensor([4, 1, 4, 4, 1], device=bank.prefix_index.device)
    bank.prefix_index = index
    rows = dataclasses_replace_prefix(bank, "per_row", gather=index)
    r_bank, gk_bank, gv_bank = _prefix_grads(bank, backend)
    r_rows, gk_rows, gv_rows = _prefix_grads(rows, backend)
    torch.testing.assert_close(r_bank.out, r_rows.out, rtol=1e-6, atol=1e-6)
    for name, got, per_row in (("prefix_k", gk_bank, gk_rows), ("prefix_v", gv_bank, gv_rows)):
        want = torch.zeros_like(got).index_add_(0, index, per_row)
        scale = per_row.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"d{name}: {m}")
        for t in (0, 2, 3, 5, 6):
            assert torch.count_nonzero(got[t]) == 0, f"d{name}[{t}] nonzero for an unused entry"


def dataclasses_replace_prefix(x, mode, gather=None):
    """The same problem with the prefix given one per row: a shared prefix repeated
    B times, or the bank entries each row uses gathered."""
    import dataclasses

    c = dataclasses.replace(x.case, prefix=mode)
    leaves = dict(x.leaves)
    for name in ("prefix_k", "prefix_v"):
        p = x.view[name](x.leaves[name]).detach()
        p = p[gather] if gather is not None else p.unsqueeze(0).expand(c.B, *p.shape)
        leaves[name] = p.contiguous().requires_grad_(c.requires_grad(name))
    for name in ("q", "k", "v"):
        leaves[name] = x.leaves[name].detach().clone().requires_grad_(c.requires_grad(name))
    view = dict(x.view, prefix_k=lambda t: t, prefix_v=lambda t: t)
    return dataclasses.replace(x, case=c, leaves=leaves, view=view, prefix_index=None)


# --------------------------------------------------------------------------- work not done


def _kernel_calls(log, op):
    return log.named(f"prefix_attn.{op}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
@pytest.mark.parametrize("grads", ["none", "prefix", "q", "kv", "all"])
def test_only_requested_grads_are_computed(grads, backend):
    """With only the prefix trainable (frozen model) the backward must not compute dq,
    dk or dv at all: the bwd op is asked for exactly the grads that are needed, and
    hands back empty tensors for the others."""
    c = C(B=2, Hq=4, Hkv=2, Nq=19, Nk=23, P=5, D=32, causal=True, grads=grads)
    x = make_inputs(c, device=device_for(backend))
    with OpLog() as log:
        run_attention(x, backend)
    fwd = _kernel_calls(log, "fwd")
    bwd = _kernel_calls(log, "bwd")
    assert len(fwd) == 1, f"expected one prefix_attn.fwd call, got {len(fwd)}"
    if grads == "none":
        assert bwd == [], "backward ran although nothing requires grad"
        return
    assert len(bwd) == 1, f"expected one prefix_attn.bwd call, got {len(bwd)}"
    flags = {k: bool(bwd[0][k]) for k in ("need_dq", "need_dkv", "need_dprefix")}
    want = {
        "need_dq": c.requires_grad("q"),
        "need_dkv": c.requires_grad("k") or c.requires_grad("v"),
        "need_dprefix": c.requires_grad("prefix_k") or c.requires_grad("prefix_v"),
    }
    assert flags == want, f"bwd asked for {flags}, needed {want}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_shared_prefix_grad_never_materialized_per_row(backend):
    """No [B, Hkv, P, D] tensor is ever allocated for a shared prefix (its gradient is
    reduced inside the kernels)."""
    c = C(B=3, Hq=4, Hkv=2, Nq=7, Nk=11, P=5, D=16, causal=True)
    x = make_inputs(c, device=device_for(backend))
    with OpLog() as log:
        run_attention(x, backend)
    per_row = (c.B, c.Hkv, c.P, c.D)
    offenders = [
        name
        for name, _, shapes in log.calls
        for shape, stride in shapes
        if shape == per_row and stride[0] != 0
    ]
    assert offenders == [], f"ops produced a per-row prefix tensor {per_row}: {offenders}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_strided_inputs_are_not_copied(backend):
    """A transposed [B, N, H, D] q and sliced k / v reach the kernel as views: no
    Python-side copy (clone / contiguous / copy_) of them."""
    c = C(B=2, Hq=4, Hkv=2, Nq=19, Nk=23, P=5, D=32, causal=True, layout="qT+kvslice", grads="all")
    x = make_inputs(c, device=device_for(backend))
    storages = {
        x.leaves[n].untyped_storage().data_ptr(): n for n in ("q", "k", "v")
    }
    with OpLog() as log:
        run_attention(x, backend)
    copied = []
    for name, bound, _ in log.calls:
        if any(op in name for op in ("clone", "copy_", "_to_copy", "contiguous")):
            for value in bound.values():
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in storages:
                    copied.append((name, storages[value.untyped_storage().data_ptr()]))
    assert copied == [], f"strided inputs were copied: {copied}"
