"""prefix_attention and the SDPA drop-in inside torch.autocast: the semantics of torch's SDPA.

Inside autocast, q, k, v, the prefix and a float attn_mask are cast to autocast's dtype (floating
tensors, float64 excepted), the output comes back in it, and each input's gradient in its own
dtype. The oracle is the float64 reference run on the inputs cast as autocast casts them
(`Inputs.cast`: a plain round to bfloat16), by the tolerance rule of attn_testing.py; the SDPA
drop-in is held to torch's own SDPA under the same autocast as well.

Inputs come in float32 with values that bfloat16 does not represent (so the cast must round
them), except v, a bfloat16 tensor: the mix a Llama layer hands its attention under autocast
(rotary embedding promotes q and k to float32). The forward runs inside autocast, the backward
outside it, as in a training step.

Triton runs here under TRITON_INTERPRET=1 only: `make test` runs this file with -k triton in the
Triton process as well.
"""
import dataclasses

import pytest
import torch

import prefix_attn
from attn_testing import Case as C
from attn_testing import (Result, assert_within_ref_tol, backend_params, check_against_reference, device_for,
                          make_inputs, max_abs_err, reference_pair)

AUTOCAST = torch.bfloat16  # CPU autocast's dtype (torch.get_autocast_dtype("cpu"))

CASES = [
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=33, P=7, D=64, causal=True, prefix="shared"),
    C(B=3, Hq=4, Hkv=1, Nq=29, Nk=41, P=5, D=32, causal=True, prefix="bank", kpm="right"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=33, P=7, D=64, prefix="per_row", kpm="left", mask="float-B1NqNk"),
    C(B=2, Hq=2, Hkv=1, Nq=1, Nk=40, P=9, D=80, kpm="left", layout="qT"),
    C(B=2, Hq=4, Hkv=2, Nq=21, Nk=21, P=15, D=32, causal=True, grads="prefix"),
    C(B=2, Hq=2, Hkv=2, Nq=17, Nk=17, P=0, D=16, causal=True, prefix="none", mask="bool-NqNk"),
]

#: the dtype each input lives in before autocast (its "master" dtype)
MASTER = {"q": torch.float32, "k": torch.float32, "v": torch.bfloat16, "prefix_k": torch.float32,
          "prefix_v": torch.float32}


def _mixed_inputs(case, device):
    """float32 inputs (unrounded), v in bfloat16; the case's dtype says the autocast dtype."""
    x = make_inputs(dataclasses.replace(case, dtype="fp32"), device=device)
    leaves = {}
    for name, t in x.leaves.items():
        leaf = t.detach().to(MASTER[name])
        leaf.requires_grad_(case.requires_grad(name))
        leaves[name] = leaf
    return dataclasses.replace(x, case=case, leaves=leaves)


def _run_autocast(x, backend, sdpa=False):
    """Forward under CPU autocast (or the device's), backward outside it."""
    t = x.tensors()
    device_type = t["q"].device.type
    with torch.autocast(device_type, dtype=AUTOCAST):
        if sdpa:
            out = prefix_attn.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=x.attn_mask,
                                                           is_causal=x.case.causal, enable_gqa=True,
                                                           prefix_key=t.get("prefix_k"), prefix_value=t.get("prefix_v"))
            lse = None
        else:
            out, lse = prefix_attn.prefix_attention(
                t["q"], t["k"], t["v"], t.get("prefix_k"), t.get("prefix_v"), causal=x.case.causal,
                softmax_scale=x.case.scale, key_padding_mask=x.key_padding_mask, attn_mask=x.attn_mask,
                prefix_index=x.prefix_index, return_lse=True, backend=backend)
    assert not torch.is_autocast_enabled(device_type)
    if out.requires_grad:
        out.backward(x.dout().to(out.dtype))
    leaf_grads = {name: leaf.grad for name, leaf in x.leaves.items()}
    grads = {name: (x.view[name](g) if g is not None else None) for name, g in leaf_grads.items()}
    return Result(out.detach(), None if lse is None else lse.detach(), grads, leaf_grads)


def _oracle(x):
    """(bfloat16 reference, float64 reference) on the inputs as autocast casts them: every
    floating input and a float attn_mask rounded to bfloat16, outside autocast."""
    return reference_pair(x.cast(AUTOCAST))


@pytest.mark.parametrize("backend", backend_params() + ["reference"])
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id())
                                  for c in (dataclasses.replace(c, dtype="bf16") for c in CASES)])
def test_autocast_matches_float64_oracle_on_cast_inputs(backend, case):
    x = _mixed_inputs(case, device_for(backend))
    ours = _run_autocast(x, backend)
    lo, hi = _oracle(x)
    check_against_reference(ours, lo, hi, case)  # out in bfloat16, lse float32, gradients by the rule
    for name, leaf in x.leaves.items():  # each gradient in its input's dtype: float32 masters stay float32
        if leaf.grad is not None:
            assert leaf.grad.dtype == leaf.dtype, f"{name}.grad is {leaf.grad.dtype}, {name} is {leaf.dtype}"


def test_autocast_casts_as_torch_sdpa_does():
    """The drop-in against torch's own SDPA under the same autocast: the same output dtype, and
    no farther from the float64 oracle than twice torch's error (plus the floor)."""
    case = C(B=2, Hq=4, Hkv=4, Nq=19, Nk=19, P=0, D=32, prefix="none", mask="float-1HNqNk", dtype="bf16")
    x = _mixed_inputs(case, "cpu")
    ours = _run_autocast(x, "auto", sdpa=True)
    t = x.cast(torch.float32).tensors()  # the same values (v round-trips through float32 exactly)
    q, k, v = (t[n].detach().to(MASTER[n]).requires_grad_() for n in ("q", "k", "v"))
    with torch.autocast("cpu", dtype=AUTOCAST):
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=x.attn_mask)
    theirs.backward(x.dout().to(theirs.dtype))
    _, hi = _oracle(x)
    assert ours.out.dtype == theirs.dtype == AUTOCAST
    assert_within_ref_tol("out", ours.out, theirs.detach(), hi.out, AUTOCAST)
    for name, g in (("q", q.grad), ("k", k.grad), ("v", v.grad)):
        assert ours.grads[name].dtype == g.dtype == MASTER[name]
        assert_within_ref_tol(f"d{name}", ours.grads[name], g, hi.grads[name], AUTOCAST,
                              recompute_rel=hi.recompute_rel)


def test_autocast_prefix_equals_torch_sdpa_on_concatenated_keys():
    """With a prefix: torch's SDPA under autocast over [prefix ; k] (the mask widened with always
    visible prefix columns) is an independent same-precision oracle; the float32 prefix gets a
    float32 gradient equal to the slice of torch's."""
    case = C(B=2, Hq=2, Hkv=2, Nq=13, Nk=13, P=6, D=32, causal=True, dtype="bf16")
    x = _mixed_inputs(case, "cpu")
    ours = _run_autocast(x, "auto", sdpa=True)
    t = {n: leaf.detach().clone().requires_grad_() for n, leaf in x.leaves.items()}
    causal = torch.ones(13, 13, dtype=torch.bool).tril()
    mask = torch.cat([torch.ones(13, 6, dtype=torch.bool), causal], dim=1)
    with torch.autocast("cpu", dtype=AUTOCAST):
        keys = torch.cat([t["prefix_k"].expand(2, -1, -1, -1).to(AUTOCAST), t["k"].to(AUTOCAST)], dim=2)
        values = torch.cat([t["prefix_v"].expand(2, -1, -1, -1).to(AUTOCAST), t["v"]], dim=2)
        theirs = torch.nn.functional.scaled_dot_product_attention(t["q"], keys, values, attn_mask=mask)
    theirs.backward(x.dout().to(theirs.dtype))
    _, hi = _oracle(x)
    assert_within_ref_tol("out", ours.out, theirs.detach(), hi.out, AUTOCAST)
    for name in MASTER:
        assert ours.grads[name].dtype == t[name].grad.dtype == MASTER[name]
        assert_within_ref_tol(f"d{name}", ours.grads[name], t[name].grad, hi.grads[name], AUTOCAST,
                              recompute_rel=hi.recompute_rel)


def test_mixed_dtypes_outside_autocast_still_raise():
    x = _mixed_inputs(C(dtype="bf16"), "cpu")
    t = x.tensors()
    with pytest.raises(TypeError, match="v has dtype torch.bfloat16 but q has torch.float32"):
        prefix_attn.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"])
    with torch.autocast("cpu", dtype=AUTOCAST, enabled=False), pytest.raises(TypeError, match="all inputs must match"):
        prefix_attn.scaled_dot_product_attention(t["q"], t["k"], t["v"], enable_gqa=True)


def test_float64_is_not_cast():
    """Autocast leaves float64 alone (torch's SDPA then fails on the mix): all-float64 inputs run
    in float64 inside autocast, and float64 mixed with float32 is the dtype TypeError."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    with torch.autocast("cpu", dtype=AUTOCAST):
        out = prefix_attn.prefix_attention(q, k, v, backend="reference")
        assert out.dtype == torch.float64
        with pytest.raises(TypeError, match="k has dtype torch.bfloat16 but q has torch.float64"):
            prefix_attn.prefix_attention(q, k.float(), v, backend="reference")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_backend_runs_with_autocast_off(monkeypatch):
    """The backend sees the cast inputs with autocast switched off, so that the reference's own
    float32 ops are not re-cast (and the result equals the reference on the cast inputs)."""
    from prefix_attn import backends

    seen = []
    reference = backends._REGISTRY["reference"]

    def run(inputs, deterministic):
        seen.append((torch.is_autocast_enabled("cpu"), inputs.q.dtype, inputs.k.dtype, inputs.v.dtype,
                     inputs.prefix_k.dtype, inputs.attn_mask.dtype))
        return reference.run(inputs, deterministic)

    monkeypatch.setitem(backends._REGISTRY, "reference", dataclasses.replace(reference, run=run))
    x = _mixed_inputs(C(B=2, Hq=2, Hkv=2, Nq=9, Nk=9, P=3, D=16, mask="float-NqNk", grads="none", dtype="bf16"), "cpu")
    ours = _run_autocast(x, "reference")
    # the float mask is cast to bfloat16 (as autocast casts torch's SDPA's), then widened to the
    # float32 the backends take: bfloat16 values
    assert seen == [(False, AUTOCAST, AUTOCAST, AUTOCAST, AUTOCAST, torch.float32)]
    t = x.cast(AUTOCAST).tensors()
    plain = prefix_attn.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"],
                                         attn_mask=x.attn_mask.to(AUTOCAST), backend="reference")
    assert max_abs_err(ours.out, plain) == 0.0
    unrounded = prefix_attn.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"],
                                             attn_mask=x.attn_mask, backend="reference")
    assert max_abs_err(ours.out, unrounded) > 0.0, "the test's mask is exactly representable: it shows nothing"


@pytest.mark.parametrize("where", ["inside", "around"])
def test_autocast_under_compile_fullgraph(where):
    """torch.compile(fullgraph=True) with autocast entered inside the compiled function or around
    the call: the same output and gradients as eager, dtypes included."""
    torch._dynamo.reset()
    case = C(B=2, Hq=4, Hkv=2, Nq=11, Nk=11, P=5, D=32, causal=True, dtype="bf16")

    def attend(q, k, v, prefix_k, prefix_v):
        return prefix_attn.prefix_attention(q * 1.5, k, v, prefix_k, prefix_v, causal=True)

    def inside(*args):
        with torch.autocast("cpu", dtype=AUTOCAST):
            return attend(*args)

    fn = inside if where == "inside" else attend
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        x = _mixed_inputs(case, "cpu")
        t = x.tensors()
        args = [t[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
        with torch.autocast("cpu", dtype=AUTOCAST, enabled=where == "around"):
            out = f(*args)
        out.backward(x.dout().to(out.dtype))
        results.append((out.detach(), {n: leaf.grad for n, leaf in x.leaves.items()}))
    torch._dynamo.reset()
    (eo, eg), (co, cg) = results
    assert co.dtype == eo.dtype == AUTOCAST
    torch.testing.assert_close(co, eo, rtol=0, atol=0)
    for n in eg:
        assert cg[n].dtype == eg[n].dtype == MASTER[n]
        torch.testing.assert_close(cg[n], eg[n], rtol=0, atol=0)


@pytest.mark.skipif("cpu" not in prefix_attn.available_backends(), reason="compiled ops not built")
def test_raw_op_is_not_cast():
    """The cast lives in prefix_attention, not in an autocast kernel of the ops (see the comment
    there): the raw op under autocast runs matching bfloat16 inputs as they are, and refuses mixed
    ones with its dtype error rather than casting them."""
    from attn_testing import op_kwargs

    fwd = torch.ops.prefix_attn.fwd.default
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g).to(AUTOCAST) for _ in range(3))
    with torch.autocast("cpu", dtype=AUTOCAST):
        out, lse = fwd(**op_kwargs(fwd, q=q, k=k, v=v))
        assert out.dtype == AUTOCAST and lse.dtype == torch.float32
        with pytest.raises(TypeError, match="k must have dtype"):
            fwd(**op_kwargs(fwd, q=q, k=k.float(), v=v))
    expected = prefix_attn.prefix_attention(q, k, v, softmax_scale=0.25, backend="cpu")
    assert max_abs_err(out, expected) == 0.0
