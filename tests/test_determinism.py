"""deterministic=True: bit-identical outputs and gradients, run after run.

The cases are where a kernel is tempted to use float atomics: many query heads and rows
adding into one KV head (MQA / GQA), a shared prefix summed over the batch, bank entries
used by several rows. Sizes span several blocks so that work is split across threads.
"""

import pytest
import torch

from attn_testing import Case, backend_params, device_for, make_inputs, run_attention

pytestmark = pytest.mark.usefixtures("nan_poison")

C = Case

CASES = [
    C(B=3, Hq=8, Hkv=1, Nq=200, Nk=300, P=64, D=64, causal=True, kpm="left"),  # MQA, shared prefix
    C(B=4, Hq=4, Hkv=2, Nq=150, Nk=150, P=33, D=80, causal=True, prefix="bank", T=3),  # entry 2 used twice
    C(B=2, Hq=8, Hkv=2, Nq=1, Nk=500, P=128, D=128, prefix="per_row"),  # decode
    C(B=4, Hq=8, Hkv=2, Nq=129, Nk=257, P=63, D=64, prefix="bank", mask="float-B1NqNk", dtype="bf16"),
    C(B=2, Hq=8, Hkv=2, Nq=150, Nk=150, P=33, D=128, causal=True, prefix="bank", T=3, dtype="fp16"),
]

REPEATS = 3


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in CASES])
def test_deterministic_is_bit_identical(case, backend):
    x = make_inputs(case, device=device_for(backend))
    runs = [run_attention(x.cast(case.torch_dtype), backend, deterministic=True) for _ in range(REPEATS)]
    first = runs[0]
    for i, r in enumerate(runs[1:], start=2):
        assert torch.equal(r.out, first.out), f"out differs on run {i}"
        assert torch.equal(r.lse, first.lse), f"lse differs on run {i}"
        for name, g in first.grads.items():
            if g is None:
                assert r.grads[name] is None
                continue
            assert not torch.isnan(g).any(), f"d{name} has NaN"
            diff = (r.grads[name].double() - g.double()).abs().max().item()
            assert torch.equal(r.grads[name], g), f"d{name} differs on run {i} (max abs diff {diff:.3e})"


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", backend_params())
def test_deterministic_and_default_agree(backend):
    """deterministic=True changes the reduction order, not the result."""
    case = CASES[0]
    x = make_inputs(case, device=device_for(backend))
    det = run_attention(x.cast(case.torch_dtype), backend, deterministic=True)
    fast = run_attention(x.cast(case.torch_dtype), backend, deterministic=False)
    torch.testing.assert_close(det.out, fast.out, rtol=1e-5, atol=1e-5)
    for name, g in det.grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(fast.grads[name], g, rtol=1e-5, atol=1e-5 * scale)
