"""The reference backend is the oracle for every kernel, so it is itself checked here
against two oracles written independently in this file:

- ``naive_attention``: per (batch row, head) float64 math, with the concatenation, the
  visibility mask and the softmax each written out;
- ``sdpa_attention``: torch's scaled_dot_product_attention in float64 on keys and values
  concatenated (and gathered from the bank, and repeated for GQA) explicitly, with an
  explicit [B, Hq, Nq, P + Nk] mask.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from attn_testing import Case, make_inputs, max_abs_err, run_attention

C = Case


def _row_prefix(pk, prefix_index, b):
    """The [Hkv, P, D] prefix batch row b sees, or None."""
    if pk is None:
        return None
    if pk.dim() == 3:
        return pk
    if prefix_index is not None:
        return pk[int(prefix_index[b])]
    return pk[b]


def naive_attention(q, k, v, pk=None, pv=None, *, prefix_index=None, causal=False, scale=None,
                    key_padding_mask=None, attn_mask=None):
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if attn_mask is not None:
        attn_mask = attn_mask.expand(B, Hq, Nq, Nk)
    i = torch.arange(Nq).view(-1, 1)
    j = torch.arange(Nk).view(1, -1)
    outs, lses = [], []
    for b in range(B):
        pkb, pvb = _row_prefix(pk, prefix_index, b), _row_prefix(pv, prefix_index, b)
        for h in range(Hq):
            g = h // group
            keys, values = k[b, g], v[b, g]
            P = 0
            if pkb is not None:
                P = pkb.shape[1]
                keys = torch.cat([pkb[g], keys])
                values = torch.cat([pvb[g], values])
            scores = (q[b, h] @ keys.T) * scale  # [Nq, P + Nk]
            # visibility of the sequence keys; the prefix columns are always visible
            visible = torch.ones(Nq, Nk, dtype=torch.bool)
            if causal:
                visible &= j <= i + (Nk - Nq)
            if key_padding_mask is not None:
                visible &= key_padding_mask[b].bool().view(1, -1)
            bias = torch.zeros(Nq, Nk, dtype=q.dtype)
            if attn_mask is not None:
                m = attn_mask[b, h]
                if m.dtype == torch.bool:
                    visible &= m
                else:
                    visible &= m != -math.inf
                    bias = torch.where(visible, m.to(q.dtype), bias)
            seq_scores = (scores[:, P:] + bias).masked_fill(~visible, -math.inf)
            scores = torch.cat([scores[:, :P], seq_scores], dim=1)
            row_max = scores.max(dim=1, keepdim=True).values
            has_key = torch.isfinite(row_max)
            row_max = torch.where(has_key, row_max, torch.zeros_like(row_max))
            weights = torch.exp(scores - row_max)
            denom = weights.sum(dim=1, keepdim=True)
            denom = torch.where(has_key, denom, torch.ones_like(denom))
            outs.append((weights @ values) / denom)
            lses.append(torch.where(has_key, row_max + torch.log(denom), torch.full_like(denom, -math.inf)).squeeze(1))
    out = torch.stack(outs).view(B, Hq, Nq, -1)
    lse = torch.stack(lses).view(B, Hq, Nq)
    return out, lse


def sdpa_attention(q, k, v, pk=None, pv=None, *, prefix_index=None, causal=False, scale=None,
                   key_padding_mask=None, attn_mask=None):
    """Returns (out, lse, visible-row mask [B, Hq, Nq])."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if pk is None:
        pk = pv = k.new_zeros(B, Hkv, 0, D)
    elif pk.dim() == 3:
        pk, pv = pk.expand(B, *pk.shape), pv.expand(B, *pv.shape)
    elif prefix_index is not None:
        pk, pv = pk[prefix_index], pv[prefix_index]
    P = pk.shape[2]
    keys = torch.cat([pk, k], dim=2).repeat_interleave(Hq // Hkv, dim=1)
    values = torch.cat([pv, v], dim=2).repeat_interleave(Hq // Hkv, dim=1)

    seq_visible = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool)
    if causal:
        seq_visible &= torch.ones(Nq, Nk, dtype=torch.bool).tril(diagonal=Nk - Nq)
    if key_padding_mask is not None:
        seq_visible &= key_padding_mask.bool()[:, None, None, :]
    seq_bias = torch.zeros(B, Hq, Nq, Nk, dtype=q.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            seq_visible &= attn_mask
        else:
            seq_bias = seq_bias + attn_mask.to(q.dtype)
    seq_bias = seq_bias.masked_fill(~seq_visible, -math.inf)
    bias = torch.cat([torch.zeros(B, Hq, Nq, P, dtype=q.dtype), seq_bias], dim=3)

    scale_ = 1.0 / math.sqrt(D) if scale is None else scale
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale_)
    lse = torch.logsumexp(q @ keys.transpose(-1, -2) * scale_ + bias, dim=-1)
    return out, lse, torch.isfinite(lse)


CASES = [
    C(B=1, Hq=1, Hkv=1, Nq=1, Nk=1, P=0, D=16, prefix="none"),
    C(B=2, Hq=4, Hkv=4, Nq=9, Nk=13, P=5, D=16),
    C(B=2, Hq=4, Hkv=1, Nq=9, Nk=13, P=5, D=32, causal=True),  # MQA
    C(B=2, Hq=6, Hkv=2, Nq=13, Nk=29, P=7, D=16, causal=True, prefix="per_row", kpm="left"),
    C(B=3, Hq=4, Hkv=2, Nq=13, Nk=29, P=7, D=16, prefix="bank", kpm="right"),
    C(B=3, Hq=4, Hkv=2, Nq=13, Nk=13, P=3, D=16, causal=True, prefix="bank", kpm="int_left"),
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=8, P=4, D=16, causal=True),  # Nk < Nq: rows see prefix only
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=8, P=0, D=16, causal=True, prefix="none"),  # ... or nothing
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=8, P=0, D=16, causal=True),  # P == 0 given as a tensor
    C(B=2, Hq=2, Hkv=2, Nq=1, Nk=40, P=3, D=16, causal=True, kpm="left"),  # decode
    C(B=2, Hq=4, Hkv=2, Nq=11, Nk=17, P=6, D=16, mask="bool-NqNk"),
    C(B=2, Hq=4, Hkv=2, Nq=11, Nk=17, P=6, D=16, causal=True, mask="float-B1NqNk", prefix="bank"),
    C(B=2, Hq=4, Hkv=2, Nq=11, Nk=17, P=6, D=16, mask="bool-1HNqNk", kpm="int_right"),
    C(B=2, Hq=4, Hkv=2, Nq=11, Nk=17, P=6, D=16, mask="float-HNqNk", scale=0.3),
    C(B=2, Hq=4, Hkv=2, Nq=11, Nk=17, P=0, D=16, mask="bool-Nq1"),  # some rows fully masked
    C(B=3, Hq=2, Hkv=1, Nq=11, Nk=17, P=0, D=16, kpm="allpad"),  # one row has no keys
    C(B=2, Hq=4, Hkv=2, Nq=11, Nk=17, P=6, D=16, causal=True, layout="qT+kvslice"),
]


def _args(x):
    t = x.tensors()
    return (t["q"], t["k"], t["v"], t.get("prefix_k"), t.get("prefix_v")), dict(
        prefix_index=x.prefix_index,
        causal=x.case.causal,
        scale=x.case.scale,
        key_padding_mask=x.key_padding_mask,
        attn_mask=x.attn_mask,
    )


def _oracle_grads(x, fn):
    args, kwargs = _args(x)
    out = fn(*args, **kwargs)[0]
    out.backward(x.dout())
    return {name: (x.view[name](leaf.grad) if leaf.grad is not None else None) for name, leaf in x.leaves.items()}


def _tight(name, got, want):
    """float64 against float64: agreement to ~1e-10 relative. lse is float32 by
    contract, so it can only agree to float32 rounding."""
    err = max_abs_err(got, want)
    scale = max(want[torch.isfinite(want)].abs().max().item() if want.numel() else 0.0, 1.0)
    rel = 1e-10 if got.dtype == torch.float64 else 3e-7
    assert err <= rel * scale, f"{name}: max abs err {err:.3e} (scale {scale:.3e}, dtype {got.dtype})"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in CASES])
def test_reference_matches_naive_float64(case):
    c = Case(**{**case.__dict__, "dtype": "fp64"})
    x = make_inputs(c)
    ours = run_attention(x, "reference")
    naive = x.cast(torch.float64)
    args, kwargs = _args(naive)
    out, lse = naive_attention(*args, **kwargs)
    _tight("out", ours.out, out)
    _tight("lse", ours.lse, lse)
    want = _oracle_grads(x.cast(torch.float64), naive_attention)
    for name, g in ours.grads.items():
        if g is not None:
            _tight(f"d{name}", g, want[name])


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in CASES])
def test_reference_matches_torch_sdpa_float64(case):
    c = Case(**{**case.__dict__, "dtype": "fp64"})
    x = make_inputs(c)
    ours = run_attention(x, "reference")
    args, kwargs = _args(x.cast(torch.float64))
    out, lse, has_key = sdpa_attention(*args, **kwargs)
    rows = has_key.unsqueeze(-1).expand_as(out)
    _tight("out", ours.out[rows], out[rows])
    _tight("lse", ours.lse, lse)
    if not has_key.all():
        return  # SDPA's gradient through a row with no visible key is not defined
    want = _oracle_grads(x.cast(torch.float64), sdpa_attention)
    for name, g in ours.grads.items():
        if g is not None:
            _tight(f"d{name}", g, want[name])


@pytest.mark.parametrize(
    "dtype,tol", [("fp32", 1e-5), ("fp16", 2e-2), ("bf16", 6e-2)], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in CASES[3:7] + CASES[11:12]])
def test_reference_low_precision_is_close(case, dtype, tol):
    """Sanity bound on the reference in the kernel dtypes (it computes matmuls in the
    input dtype, softmax in float32): relative to the float64 naive oracle."""
    c = Case(**{**case.__dict__, "dtype": dtype})
    x = make_inputs(c)
    ours = run_attention(x, "reference")
    assert ours.out.dtype == c.torch_dtype
    assert ours.lse.dtype == torch.float32
    args, kwargs = _args(x.cast(torch.float64))
    out, lse = naive_attention(*args, **kwargs)
    scale = out.abs().max().item()
    assert max_abs_err(ours.out, out) <= tol * scale
    assert max_abs_err(ours.lse, lse) <= tol * max(1.0, lse[torch.isfinite(lse)].abs().max().item())


@pytest.mark.parametrize("dtype", ["fp64", "fp32", "bf16"])
def test_reference_fully_masked_rows(dtype):
    c = C(B=2, Hq=2, Hkv=1, Nq=12, Nk=5, P=0, D=16, causal=True, prefix="none", dtype=dtype)
    r = run_attention(make_inputs(c), "reference")
    masked = torch.arange(c.Nq) < c.Nq - c.Nk  # rows before Nq - Nk see no key
    assert torch.equal(r.out[:, :, masked], torch.zeros_like(r.out[:, :, masked]))
    assert torch.isneginf(r.lse[:, :, masked]).all()
    assert torch.isfinite(r.lse[:, :, ~masked]).all()
    assert not torch.isnan(r.out).any()
    for name, g in r.grads.items():
        assert torch.isfinite(g).all(), f"d{name}"
    assert torch.count_nonzero(r.grads["q"][:, :, masked]) == 0


def test_reference_prefix_is_always_visible():
    """A query whose every sequence key is masked attends to the prefix alone: its
    output is softmax over the prefix only (checked by hand, no concatenation)."""
    c = C(B=1, Hq=1, Hkv=1, Nq=4, Nk=6, P=3, D=16, mask="bool-NqNk", dtype="fp64")
    x = make_inputs(c)
    x.attn_mask = torch.zeros(c.Nq, c.Nk, dtype=torch.bool)
    r = run_attention(x, "reference")
    t = x.tensors()
    s = t["q"][0, 0] @ t["prefix_k"][0].T / math.sqrt(c.D)
    want = torch.softmax(s, dim=-1) @ t["prefix_v"][0]
    _tight("out", r.out[0, 0], want)
    _tight("lse", r.lse[0, 0], torch.logsumexp(s, dim=-1))
