"""Attention dropout on every kernel backend, against the float64 oracle run on the
same random stream, and the stream itself: its definition, its keep rate, its seeding.

The stream is a pure function of (seed, offset, row-head, query, key) (prefix_attn/_dropout.py,
csrc/prefix_attn_dropout.h). The reference applies the mask that _dropout.py computes; the
kernels compute their own. So `check_dropout_against_reference` fails if a kernel's mask differs
from the definition anywhere, or if a backward regenerates a different mask from its forward.
The Triton kernels get the same checks under the interpreter in test_triton.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import prefix_attn
from attn_testing import Case as C
from attn_testing import (assert_no_cuda_sync, backend_params, check_dropout_against_reference, device_for,
                          kernel_keep_mask)
from prefix_attn import _dropout
from prefix_attn.backends import _REGISTRY
from prefix_attn._inputs import check_inputs

pytestmark = pytest.mark.usefixtures("nan_poison")


def _skip_without_dropout(backend: str) -> None:
    q = torch.zeros(1, 1, 1, 16, device=device_for(backend))
    inputs = check_inputs(q, q, q)
    inputs.dropout_p = 0.1
    why = _REGISTRY[backend].unsupported(inputs)
    if why is not None:
        pytest.skip(f"{backend}: {why}")


# --------------------------------------------------------------------------- the stream


def test_philox_matches_random123_known_answers():
    # Known-answer vectors of Random123's kat_vectors for philox4x32_10.
    z, f = torch.tensor(0), torch.tensor(0xFFFFFFFF)
    assert [int(w) for w in _dropout.philox4x32_10(z, z, z, z, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(w) for w in _dropout.philox4x32_10(f, f, f, f, 2 ** 64 - 1)] == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = [torch.tensor(x) for x in (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344)]
    assert [int(w) for w in _dropout.philox4x32_10(*pi, 0xA4093822 | (0x299F31D0 << 32))] == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_keep_mask_follows_the_definition():
    """Element by element from the definition in prefix_attn_dropout.h, scalar Philox calls."""
    seed, offset, p = 0x1234_5678_9ABC_DEF, 77, 0.3
    B, Hq, Nq, P, Nk = 2, 3, 5, 6, 9
    mask = _dropout.keep_mask(seed, offset, p, B, Hq, Nq, P, Nk)
    assert mask.shape == (B, Hq, Nq, P + Nk) and mask.dtype == torch.bool
    thr = math.floor(p * 2 ** 32)
    for b, h, i, col in [(0, 0, 0, 0), (1, 2, 4, 14), (0, 1, 3, 5), (1, 0, 2, 6), (1, 1, 1, 11)]:
        is_prefix = col < P
        j = col if is_prefix else col - P
        counter = [(j >> 2) | (is_prefix << 31), i, b * Hq + h, offset]
        words = _dropout.philox4x32_10(*(torch.tensor(c) for c in counter), seed)
        assert bool(mask[b, h, i, col]) == (int(words[j & 3]) >= thr), (b, h, i, col)


def test_threshold_and_scale():
    assert _dropout.threshold(0.0) == 0
    assert _dropout.threshold(0.5) == 2 ** 31
    assert _dropout.threshold(0.1) == math.floor(0.1 * 2 ** 32)
    assert _dropout.threshold(1 - 2 ** -40) == 2 ** 32 - 1
    assert _dropout.keep_scale(0.2) == pytest.approx(1.25)


# --------------------------------------------------------------------------- every backend

CASES = [
    C(B=2, Hq=4, Hkv=2, Nq=37, Nk=50, P=13, D=32, causal=True),
    C(B=3, Hq=4, Hkv=1, Nq=29, Nk=41, P=7, D=64, prefix="bank", kpm="right", mask="bool-B1NqNk"),
    C(B=2, Hq=2, Hkv=2, Nq=17, Nk=300, P=270, D=16, prefix="per_row", layout="qT+kvslice"),
    C(B=2, Hq=2, Hkv=1, Nq=1, Nk=70, P=9, D=64, kpm="left", mask="float-B1NqNk"),
    C(B=2, Hq=2, Hkv=2, Nq=19, Nk=19, P=0, D=32, prefix="none", causal=True),
    C(B=3, Hq=4, Hkv=2, Nq=21, Nk=21, P=15, D=32, causal=True, grads="prefix"),
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, grads="q"),
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=30, P=15, D=32, grads="kv", causal=True),
    C(B=2, Hq=4, Hkv=2, Nq=37, Nk=50, P=33, D=64, causal=True, prefix="bank", dtype="bf16"),
    C(B=2, Hq=4, Hkv=2, Nq=37, Nk=50, P=33, D=64, dtype="fp16", grads="prefix"),
]


@pytest.mark.parametrize("backend", backend_params())
# the 16-bit cases join the GPU tier: they take the cuda backend's tensor-core kernels
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id(), marks=[pytest.mark.gpu_tier] * (c.dtype != "fp32"))
                                  for c in CASES])
def test_dropout_matches_reference_on_the_same_stream(backend, case):
    _skip_without_dropout(backend)
    check_dropout_against_reference(case, backend, 0.25, device_for(backend))


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_dropout_backward_paths_and_lse_grad(backend, deterministic):
    _skip_without_dropout(backend)
    case = C(B=3, Hq=4, Hkv=2, Nq=29, Nk=41, P=11, D=32, causal=True, prefix="bank", kpm="left")
    check_dropout_against_reference(case, backend, 0.4, device_for(backend), deterministic=deterministic,
                                    lse_grad=True)


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", backend_params())
def test_kernel_applies_the_recorded_mask_at_the_stated_rate(backend):
    """The mask read back from the kernel's own output is the one record_masks reports, and its
    keep rate is 1 - p within 5 standard deviations, for prefix and sequence keys apart."""
    _skip_without_dropout(backend)
    p = 0.3
    B, Hq, Hkv, Nq, P, Nk = 3, 4, 2, 40, 20, 44
    mask, call = kernel_keep_mask(backend, device_for(backend), B, Hq, Hkv, Nq, P, Nk, p, seed=11)
    assert torch.equal(mask.cpu(), call.mask().cpu())
    for part in (mask[..., :P], mask[..., P:]):
        n = part.numel()
        rate = part.double().mean().item()
        assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate:.4f} over {n}, p = {p}"
    # neighbours in one Philox call are not tied together: adjacent keys agree at the rate of
    # independent draws, p^2 + (1 - p)^2
    same = (mask[..., 1:] == mask[..., :-1]).double().mean().item()
    n = mask[..., 1:].numel()
    want = p * p + (1 - p) * (1 - p)
    assert abs(same - want) <= 5 * math.sqrt(want * (1 - want) / n)


@pytest.mark.parametrize("backend", backend_params())
def test_dropout_seeding(backend):
    """torch.manual_seed makes a run reproducible; each call draws a new mask; seeds differ."""
    _skip_without_dropout(backend)
    dev = device_for(backend)
    shape = dict(B=2, Hq=2, Hkv=1, Nq=16, P=8, Nk=24)
    a, ca = kernel_keep_mask(backend, dev, **shape, dropout_p=0.5, seed=3)
    b, cb = kernel_keep_mask(backend, dev, **shape, dropout_p=0.5, seed=3)
    c, _ = kernel_keep_mask(backend, dev, **shape, dropout_p=0.5, seed=4)
    assert (ca.seed, ca.offset) == (cb.seed, cb.offset)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    q = torch.randn(1, 2, 8, 16, device=dev)
    with _dropout.record_masks() as calls:
        first = prefix_attn.prefix_attention(q, q, q, dropout_p=0.5, backend=backend)
        second = prefix_attn.prefix_attention(q, q, q, dropout_p=0.5, backend=backend)
    assert (calls[0].seed, calls[0].offset) != (calls[1].seed, calls[1].offset)
    assert not torch.equal(first, second)


@pytest.mark.gpu_tier
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", backend_params())
def test_dropout_step_makes_no_host_sync(backend):
    """The stream comes from the CUDA generator's seed and offset, host-side values: drawing it,
    and the forward and backward with dropout, never wait for the GPU."""
    _skip_without_dropout(backend)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 64, 64, generator=gen).cuda().bfloat16().requires_grad_()
    k, v = (torch.randn(2, 2, 64, 64, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(2))
    pk, pv = (torch.randn(2, 16, 64, generator=gen).cuda().bfloat16().requires_grad_() for _ in range(2))

    def step():
        out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=0.1, backend=backend)
        out.sum().backward()

    assert_no_cuda_sync(step)


@pytest.mark.parametrize("backend", backend_params())
def test_zero_dropout_is_no_dropout(backend):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=gen).to(dev) for _ in range(3))
    pk, pv = (torch.randn(2, 5, 16, generator=gen).to(dev) for _ in range(2))
    state = torch.get_rng_state()
    with _dropout.record_masks() as calls:
        out = prefix_attn.prefix_attention(q, k, v, pk, pv, dropout_p=0.0, backend=backend)
    assert calls == [], "dropout_p = 0 drew a stream"
    assert torch.equal(torch.get_rng_state(), state), "dropout_p = 0 advanced the generator"
    assert torch.equal(out, prefix_attn.prefix_attention(q, k, v, pk, pv, backend=backend))


# --------------------------------------------------------------------------- the API


@pytest.mark.parametrize("bad,error", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                       ("0.1", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_dropout_p_names_the_argument(bad, error):
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(error, match="dropout_p"):
        prefix_attn.prefix_attention(q, q, q, dropout_p=bad)


@pytest.mark.parametrize("kwargs,match", [(dict(dropout_p=1.5), "dropout_p"), (dict(dropout_p=0.1, dropout_seed=-1),
                                          "dropout_seed"), (dict(dropout_p=0.1, dropout_offset=2 ** 32),
                                                            "dropout_offset")])
def test_raw_op_validates_dropout_arguments(kwargs, match):
    from attn_testing import op_kwargs

    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match=match):
        torch.ops.prefix_attn.fwd(**op_kwargs(torch.ops.prefix_attn.fwd.default, q=q, k=q, v=q, **kwargs))


def test_sdpa_dropout_is_unbiased_like_torch():
    """The drop-in takes dropout_p as torch's SDPA does: kept probabilities scaled by 1 / (1 - p),
    so the output's expectation is the undropped output. Averaged over many calls, ours and
    torch's both approach it (the two streams differ, so only expectations compare)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 16) for _ in range(3))
    pk, pv = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    p, n = 0.5, 600
    exact = prefix_attn.scaled_dot_product_attention(q, k, v, prefix_key=pk, prefix_value=pv)
    ours = torch.stack([prefix_attn.scaled_dot_product_attention(q, k, v, dropout_p=p, prefix_key=pk, prefix_value=pv)
                        for _ in range(n)])
    keys, values = torch.cat([pk.expand(2, -1, -1, -1), k], 2), torch.cat([pv.expand(2, -1, -1, -1), v], 2)
    theirs = torch.stack([F.scaled_dot_product_attention(q, keys, values, dropout_p=p) for _ in range(n)])
    for name, runs in (("ours", ours), ("torch", theirs)):
        sem = runs.std(0) / math.sqrt(n)
        z = ((runs.mean(0) - exact).abs() / sem.clamp_min(1e-6)).max().item()
        assert z < 5.5, f"{name}: the mean over {n} calls is {z:.1f} standard errors from the undropped output"
    # and the spread matches: the same keep rate and scale give the same variance
    ratio = (ours.var(0).mean() / theirs.var(0).mean()).item()
    assert 0.85 < ratio < 1.15, f"variance of ours / torch's = {ratio:.3f}"


def test_dropout_gradcheck_with_a_fixed_mask():
    """Autograd of the dropped attention is the derivative of the function with the mask held
    fixed (float64 reference: gradcheck against finite differences of that same function)."""
    from prefix_attn.reference import reference_forward

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 6, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(1, 1, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def f(q, k, v, pk, pv):
        return reference_forward(q, k, v, pk, pv, None, None, None, 0.35, True, 0.3, 99, 5)[0]

    assert torch.autograd.gradcheck(f, (q, k, v, pk, pv))


def test_compiled_drops_as_eager():
    """Under torch.compile the stream is drawn eagerly (one graph break, at the draw), so a
    compiled function drops exactly what the eager one does under the same seed."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 8, 16, generator=gen, requires_grad=True)
    pk = torch.randn(2, 4, 16, generator=gen, requires_grad=True)

    def f(q, pk):
        return prefix_attn.prefix_attention(q, q, q, pk, pk, causal=True, dropout_p=0.3).square().sum()

    results = []
    for fn in (f, torch.compile(f, backend="aot_eager")):
        torch.manual_seed(1)
        loss = fn(q, pk)
        grads = torch.autograd.grad(loss, (q, pk))
        results.append((loss.detach(), *grads))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
