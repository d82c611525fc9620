"""merge_attention_states: two attention results over disjoint key sets, merged, equal attention
over the union; rows that saw no key stay finite; the gradients are right."""
import math

import pytest
import torch

import prefix_attn
from attn_testing import assert_within_ref_tol, kernel_backends

BACKENDS = [b for b in kernel_backends() if b != "cuda"] + ["reference"]


def _attend(q, k, v, mask, backend):
    return prefix_attn.prefix_attention(q, k, v, attn_mask=mask, return_lse=True, backend=backend)


def _split_and_merge(q, k, v, mask, split, backend):
    out_a, lse_a = _attend(q, k[:, :, :split], v[:, :, :split], mask[..., :split], backend)
    out_b, lse_b = _attend(q, k[:, :, split:], v[:, :, split:], mask[..., split:], backend)
    return prefix_attn.merge_attention_states(out_a, lse_a, out_b, lse_b)


def _inputs(dtype, B=2, H=3, Nq=11, Nk=29, D=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=gen).to(dtype) for s in ((B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, D)))
    mask = torch.rand(B, H, Nq, Nk, generator=gen) < 0.6
    split = 12
    mask[0, 0, 0, :split] = False  # nothing visible in part a for this row
    mask[0, 0, 1, split:] = False  # nothing in part b
    mask[1, 2, 3, :] = False  # nothing at all
    return q, k, v, mask, split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_equals_attention_over_the_union(backend, dtype):
    q, k, v, mask, split = _inputs(dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    dlse = torch.randn(q.shape[:3], generator=torch.Generator().manual_seed(10))

    def run(dt, merged, backend):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        if merged:
            out, lse = _split_and_merge(*leaves, mask, split, backend)
        else:
            out, lse = _attend(*leaves, mask, backend)
        torch.autograd.backward([out, lse], [dout.to(dt), dlse.to(lse.dtype)])
        return out.detach(), lse.detach(), [t.grad for t in leaves]

    ours = run(dtype, True, backend)
    lo = run(dtype, False, "reference")
    hi = run(torch.float64, False, "reference")
    assert ours[0].dtype == dtype and ours[1].dtype == torch.float32
    assert_within_ref_tol("out", ours[0], lo[0], hi[0], dtype)
    assert_within_ref_tol("lse", ours[1], lo[1], hi[1], dtype)
    for name, g, g_lo, g_hi in zip("qkv", ours[2], lo[2], hi[2]):
        assert_within_ref_tol(f"d{name}", g, g_lo, g_hi, dtype)
    # the row that saw nothing: out 0, lse -inf, and no gradient through it
    assert torch.all(ours[0][1, 2, 3] == 0) and math.isinf(ours[1][1, 2, 3].item())


def test_merge_gradcheck_with_empty_rows():
    gen = torch.Generator().manual_seed(3)
    out_a, out_b = (torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    lse_a, lse_b = (torch.randn(2, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    lse_a[0, 1] = -math.inf
    lse_b[1, 2] = -math.inf
    lse_a[1, 4] = lse_b[1, 4] = -math.inf
    out_a[0, 1] = out_a[1, 4] = out_b[1, 2] = out_b[1, 4] = 0.0  # as attention returns for no key
    inputs = [t.requires_grad_() for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = prefix_attn.merge_attention_states(*inputs)
    assert torch.all(out[1, 4] == 0) and torch.isneginf(lse[1, 4])
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs)
    assert torch.all(inputs[1].grad[1, 4] == 0) and torch.all(inputs[0].grad[1, 4] == 0)

    def finite(*args):  # gradcheck perturbs values: keep only rows with a finite lse
        o, l_ = prefix_attn.merge_attention_states(*args)
        return o, torch.where(torch.isfinite(l_), l_, torch.zeros_like(l_))

    for t in inputs:
        t.grad = None
    assert torch.autograd.gradcheck(finite, inputs)


def test_merge_with_the_two_parts_swapped_is_the_same():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 7, 8, generator=gen), torch.randn(3, 7, 8, generator=gen)
    la, lb = torch.randn(3, 7, generator=gen) * 5, torch.randn(3, 7, generator=gen) * 5
    out1, lse1 = prefix_attn.merge_attention_states(a, la, b, lb)
    out2, lse2 = prefix_attn.merge_attention_states(b, lb, a, la)
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(lse1, lse2)
    torch.testing.assert_close(lse1, torch.logaddexp(la, lb))


@pytest.mark.parametrize("bad, words", [
    (dict(out_b=torch.zeros(2, 3, 5)), ["out_a", "out_b"]),
    (dict(lse_a=torch.zeros(2, 4)), ["lse_a"]),
    (dict(out_b=torch.zeros(2, 3, 4, dtype=torch.float16)), ["out_b", "dtype"]),
    (dict(lse_b=torch.zeros(2, 3, dtype=torch.int64)), ["lse_b"]),
    (dict(out_a=[0.0]), ["out_a"]),
])
def test_merge_refuses_bad_input_naming_it(bad, words):
    args = dict(out_a=torch.zeros(2, 3, 4), lse_a=torch.zeros(2, 3), out_b=torch.zeros(2, 3, 4),
                lse_b=torch.zeros(2, 3))
    args.update(bad)
    with pytest.raises((ValueError, TypeError)) as excinfo:
        prefix_attn.merge_attention_states(**args)
    for word in words:
        assert word in str(excinfo.value)
