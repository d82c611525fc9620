"""The compiled ops as torch sees them: torch.library.opcheck (schema, fake kernel,
autograd registration, AOT dispatch with dynamic shapes) and torch.compile(fullgraph=True)
of forward and backward against eager."""

import pytest
import torch

import prefix_attn
from attn_testing import backend_params, device_for, op_args

pytestmark = pytest.mark.skipif(
    "cpu" not in prefix_attn.available_backends(), reason="compiled ops not built"
)


def _t(*shape, seed, requires_grad=False, dtype=torch.float32):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return t.requires_grad_(requires_grad)


def _on(x, device):
    """The same leaves on another device (tensors only; requires_grad kept)."""
    return {n: t.detach().to(device).requires_grad_(t.requires_grad) for n, t in x.items()}


B, HQ, HKV, NQ, NK, P, D = 2, 4, 2, 7, 11, 3, 16


def _fwd_inputs(kind, requires_grad):
    g = requires_grad
    x = dict(q=_t(B, HQ, NQ, D, seed=1, requires_grad=g), k=_t(B, HKV, NK, D, seed=2, requires_grad=g),
             v=_t(B, HKV, NK, D, seed=3, requires_grad=g), scale=0.3)
    if kind == "none":
        x["causal"] = True
        return x
    if kind == "shared":
        x.update(prefix_k=_t(1, HKV, P, D, seed=4, requires_grad=g), prefix_v=_t(1, HKV, P, D, seed=5, requires_grad=g),
                 causal=True)
    elif kind == "bank":
        x.update(prefix_k=_t(5, HKV, P, D, seed=4, requires_grad=g), prefix_v=_t(5, HKV, P, D, seed=5, requires_grad=g),
                 prefix_index=torch.tensor([3, 3]))
        kpm = torch.ones(B, NK, dtype=torch.bool)
        kpm[1, :4] = False
        x["key_padding_mask"] = kpm
    elif kind == "per_row_float_mask":
        x.update(prefix_k=_t(B, HKV, P, D, seed=4, requires_grad=g), prefix_v=_t(B, HKV, P, D, seed=5, requires_grad=g))
        x["attn_mask"] = _t(1, 1, NQ, NK, seed=6).expand(B, HQ, NQ, NK)  # stride-0 view, as the op allows
    elif kind == "shared_bool_mask":
        x.update(prefix_k=_t(1, HKV, P, D, seed=4, requires_grad=g), prefix_v=_t(1, HKV, P, D, seed=5, requires_grad=g),
                 causal=True)
        x["attn_mask"] = (_t(B, 1, NQ, NK, seed=6) > -0.5).expand(B, HQ, NQ, NK)
    return x


OP_CASES = ["none", "shared", "bank", "per_row_float_mask", "shared_bool_mask"]


@pytest.mark.parametrize("kind", OP_CASES)
def test_opcheck_fwd(kind):
    op = torch.ops.prefix_attn.fwd.default
    torch.library.opcheck(op, op_args(op, **_fwd_inputs(kind, requires_grad=True)))


@pytest.mark.parametrize("kind", OP_CASES)
@pytest.mark.parametrize("need", ["all", "dq", "dkv", "dprefix"])
def test_opcheck_bwd(kind, need):
    if need == "dprefix" and kind == "none":
        pytest.skip("no prefix")
    fwd = torch.ops.prefix_attn.fwd.default
    bwd = torch.ops.prefix_attn.bwd.default
    x = _fwd_inputs(kind, requires_grad=False)
    out, lse = fwd(*op_args(fwd, **x))
    x.update(dout=_t(*out.shape, seed=7), out=out, lse=lse)
    x.update(need_dq=need in ("all", "dq"), need_dkv=need in ("all", "dkv"), need_dprefix=need in ("all", "dprefix"))
    # the backward is not differentiable (double backward is refused), so no test there
    torch.library.opcheck(bwd, op_args(bwd, **x),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# --------------------------------------------------------------------------- torch.compile


@pytest.fixture
def fresh_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.delenv("PREFIX_ATTN_BACKEND", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _eager_and_compiled(fn, x, dout_seed=9, **compile_kwargs):
    """Runs fn(**tensors) eagerly and compiled; returns both (outputs, grads)."""
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, **compile_kwargs)):
        leaves = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in x.items()}
        out, lse = f(**leaves)
        dout = _t(*out.shape, seed=dout_seed).to(out.device)
        out.backward(dout)
        grads = {n: t.grad for n, t in leaves.items() if t.requires_grad}
        results.append((out.detach(), lse.detach(), grads))
    return results


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph_shared_prefix(backend, fresh_compile):
    def fn(q, k, v, prefix_k, prefix_v, key_padding_mask):
        out, lse = prefix_attn.prefix_attention(
            q * 1.5, k, v, prefix_k, prefix_v, causal=True, key_padding_mask=key_padding_mask,
            return_lse=True, backend=backend,
        )
        return torch.tanh(out) + 1, lse  # pointwise ops around the op, for inductor to fuse

    kpm = torch.ones(B, NK, dtype=torch.bool)
    kpm[0, :5] = False
    x = dict(q=_t(B, HQ, NQ, D, seed=1, requires_grad=True), k=_t(B, HKV, NK, D, seed=2, requires_grad=True),
             v=_t(B, HKV, NK, D, seed=3, requires_grad=True), prefix_k=_t(HKV, P, D, seed=4, requires_grad=True),
             prefix_v=_t(HKV, P, D, seed=5, requires_grad=True), key_padding_mask=kpm)
    (eo, el, eg), (co, cl, cg) = _eager_and_compiled(fn, _on(x, device_for(backend)))
    torch.testing.assert_close(co, eo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cl, el, rtol=1e-5, atol=1e-6)
    assert set(cg) == set(eg) == {"q", "k", "v", "prefix_k", "prefix_v"}
    for n in eg:
        torch.testing.assert_close(cg[n], eg[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"d{n}: {m}")


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph_bank_prefix_only_trainable(backend, fresh_compile):
    """The frozen-model case: only the bank trains; the index picks entries per row."""
    def fn(q, k, v, prefix_k, prefix_v, prefix_index, attn_mask):
        return prefix_attn.prefix_attention(
            q, k, v, prefix_k, prefix_v, prefix_index=prefix_index, attn_mask=attn_mask,
            return_lse=True, backend=backend,
        )

    x = dict(q=_t(B, HQ, NQ, D, seed=1), k=_t(B, HKV, NK, D, seed=2), v=_t(B, HKV, NK, D, seed=3),
             prefix_k=_t(4, HKV, P, D, seed=4, requires_grad=True), prefix_v=_t(4, HKV, P, D, seed=5, requires_grad=True),
             prefix_index=torch.tensor([2, 0]), attn_mask=_t(NQ, NK, seed=6))
    (eo, el, eg), (co, cl, cg) = _eager_and_compiled(fn, _on(x, device_for(backend)))
    torch.testing.assert_close(co, eo, rtol=1e-5, atol=1e-6)
    assert set(cg) == {"prefix_k", "prefix_v"}
    for n in eg:
        torch.testing.assert_close(cg[n], eg[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"d{n}: {m}")


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", backend_params())
def test_compile_dynamic_shapes(backend, fresh_compile):
    """One compiled graph, several sequence lengths: the fake kernels' shapes must be
    symbolic and right."""
    def fn(q, k, v, prefix_k, prefix_v):
        return prefix_attn.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, return_lse=True, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, dynamic=True, backend="aot_eager")
    for nq, nk in ((5, 9), (8, 13), (1, 20)):
        x = dict(q=_t(B, HQ, nq, D, seed=nq, requires_grad=True), k=_t(B, HKV, nk, D, seed=nk, requires_grad=True),
                 v=_t(B, HKV, nk, D, seed=nk + 1, requires_grad=True), prefix_k=_t(HKV, P, D, seed=4, requires_grad=True),
                 prefix_v=_t(HKV, P, D, seed=5, requires_grad=True))
        x = _on(x, device_for(backend))
        eager_out, eager_lse = fn(**x)
        eager_out.sum().backward()
        eager_grads = {n: t.grad.clone() for n, t in x.items()}
        for t in x.values():
            t.grad = None
        out, lse = compiled(**x)
        out.sum().backward()
        torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse, eager_lse, rtol=1e-5, atol=1e-6)
        for n, t in x.items():
            torch.testing.assert_close(t.grad, eager_grads[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{nq},{nk} d{n}: {m}")
