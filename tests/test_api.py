"""The public surface: the SDPA drop-in, the backend registry, and the errors the SPEC
promises (type, and a message that names the argument and the shape it got)."""

import math
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import prefix_attn
from attn_testing import OpLog, assert_within_ref_tol, device_for, kernel_backends, op_kwargs

# --------------------------------------------------------------------------- helpers


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _shape_pattern(shape):
    """A regex matching a shape printed as [2, 5, 16], (2, 5, 16) or torch.Size([...])."""
    inner = r",\s*".join(str(s) for s in shape)
    if len(shape) == 1:
        inner += r",?"
    return r"[\[\(]" + inner + r"[\]\)]"


def _names(message, names):
    return any(re.search(r"(?<![A-Za-z_])" + re.escape(n) + r"(?![A-Za-z_])", message) for n in names)


def assert_error_message(excinfo, names, shape=None, extra=None):
    msg = str(excinfo.value)
    assert _names(msg, names), f"message does not name any of {names}: {msg!r}"
    if shape is not None:
        assert re.search(_shape_pattern(shape), msg), f"message does not give the shape {list(shape)}: {msg!r}"
    if extra is not None:
        assert extra in msg, f"message does not mention {extra!r}: {msg!r}"


B, HQ, HKV, NQ, NK, P, D, T = 2, 4, 2, 5, 7, 3, 16, 5


def base_inputs(dtype=torch.float32):
    return dict(
        q=_randn(B, HQ, NQ, D, dtype=dtype, seed=1),
        k=_randn(B, HKV, NK, D, dtype=dtype, seed=2),
        v=_randn(B, HKV, NK, D, dtype=dtype, seed=3),
        prefix_k=_randn(HKV, P, D, dtype=dtype, seed=4),
        prefix_v=_randn(HKV, P, D, dtype=dtype, seed=5),
    )


def call(**overrides):
    args = base_inputs()
    args.update(overrides)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    pk, pv = args.pop("prefix_k"), args.pop("prefix_v")
    return prefix_attn.prefix_attention(q, k, v, pk, pv, **args)


# --------------------------------------------------------------------------- the SDPA drop-in

SDPA_CASES = {
    "nomask": dict(),
    "bool_NqNk": dict(mask=("bool", (17, 23))),
    "bool_B1NqNk": dict(mask=("bool", (2, 1, 17, 23))),
    "float_BHNqNk": dict(mask=("float", (2, 4, 17, 23))),
    "float_1Nk": dict(mask=("float", (1, 23))),
    "causal_square": dict(Nk=17, is_causal=True),
    "causal_square_bool": dict(Nk=17, is_causal=True, mask=("bool", (17, 17))),
    "scale": dict(scale=0.3),
    "gqa": dict(Hkv=2, enable_gqa=True),
    "mqa_float_causal": dict(Hkv=1, enable_gqa=True, Nk=17, is_causal=True, mask=("float", (1, 4, 17, 17))),
    "decode": dict(Nq=1, Nk=40, mask=("bool", (2, 1, 1, 40))),
    "D80": dict(D=80),
}


def _sdpa_inputs(Nq=17, Nk=23, D=64, Hkv=4, mask=None, dtype=torch.float32, **_):
    q = _randn(2, 4, Nq, D, dtype=dtype, seed=10)
    k = _randn(2, Hkv, Nk, D, dtype=dtype, seed=11)
    v = _randn(2, Hkv, Nk, D, dtype=dtype, seed=12)
    m = None
    if mask is not None:
        kind, shape = mask
        u = torch.rand(*shape, generator=torch.Generator().manual_seed(13))
        if kind == "bool":
            m = u < 0.75
            m[..., 0] = True  # torch's result for a row with no visible key is not ours to compare
        else:
            m = (u * 4 - 2).to(dtype)
    return q, k, v, m


@pytest.mark.parametrize("name", list(SDPA_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_matches_torch_without_prefix(name, dtype):
    if dtype != torch.float32 and name not in ("nomask", "gqa", "causal_square_bool"):
        pytest.skip("low precision on a subset")
    case = SDPA_CASES[name]
    opts = dict(is_causal=case.get("is_causal", False), scale=case.get("scale"), enable_gqa=case.get("enable_gqa", False))
    q, k, v, m = _sdpa_inputs(dtype=dtype, **case)
    dout = _randn(*q.shape, dtype=dtype, seed=14)

    def run(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        mask = m.to(dt) if m is not None and m.is_floating_point() else m
        out = fn(*leaves, attn_mask=mask, **opts)
        out.backward(dout.to(dt))
        return [out.detach()] + [t.grad for t in leaves]

    ours = run(prefix_attn.scaled_dot_product_attention, dtype)
    torch_lo = run(F.scaled_dot_product_attention, dtype)
    torch_hi = run(F.scaled_dot_product_attention, torch.float64)
    for what, o, lo, hi in zip(["out", "dq", "dk", "dv"], ours, torch_lo, torch_hi):
        assert o.dtype == dtype
        assert_within_ref_tol(what, o, lo, hi, dtype)


def test_sdpa_with_prefix_equals_prefix_attention():
    x = base_inputs()
    mask = _randn(NQ, NK, seed=20) > -0.5
    ours = prefix_attn.scaled_dot_product_attention(
        x["q"], x["k"], x["v"], attn_mask=mask, scale=0.2, enable_gqa=True,
        prefix_key=x["prefix_k"], prefix_value=x["prefix_v"],
    )
    want = prefix_attn.prefix_attention(
        x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], attn_mask=mask, softmax_scale=0.2
    )
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
    # and the prefix made a difference (the comparison could fail)
    plain = prefix_attn.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=mask, scale=0.2, enable_gqa=True)
    assert (plain - ours).abs().max() > 1e-2


def test_sdpa_with_prefix_causal_square():
    x = base_inputs()
    k, v = x["k"][:, :, :NQ], x["v"][:, :, :NQ]
    ours = prefix_attn.scaled_dot_product_attention(
        x["q"], k, v, is_causal=True, enable_gqa=True, prefix_key=x["prefix_k"], prefix_value=x["prefix_v"]
    )
    want = prefix_attn.prefix_attention(x["q"], k, v, x["prefix_k"], x["prefix_v"], causal=True)
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:.*falling back to the slow reference backend")
def test_sdpa_float64_float_mask_with_prefix_matches_torch_on_the_concatenation():
    """float64 runs on the reference, the oracle: an additive float64 mask keeps float64 (once
    rounded to float32, the result was off by ~5e-8 relative)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    q, k, v = randn(B, HQ, NQ, D), randn(B, HKV, NK, D), randn(B, HKV, NK, D)
    pk, pv = randn(HKV, P, D), randn(HKV, P, D)
    mask = randn(B, 1, NQ, NK, std=3.0)  # values float32 cannot hold exactly
    ours = prefix_attn.scaled_dot_product_attention(q, k, v, attn_mask=mask, prefix_key=pk, prefix_value=pv,
                                                    enable_gqa=True)
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], dim=2)
    values = torch.cat([pv.expand(B, -1, -1, -1), v], dim=2)
    full_mask = torch.cat([mask.new_zeros(B, 1, NQ, P), mask], dim=-1)  # the prefix always visible
    want = F.scaled_dot_product_attention(q, keys, values, attn_mask=full_mask, enable_gqa=True)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("Nq,Nk", [(5, 7), (7, 5), (1, 7)])
def test_sdpa_is_causal_with_unequal_lengths_raises(Nq, Nk):
    q, k, v = _randn(2, 4, Nq, 16), _randn(2, 4, Nk, 16), _randn(2, 4, Nk, 16)
    with pytest.raises(ValueError) as excinfo:
        prefix_attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert "is_causal" in str(excinfo.value)


def test_sdpa_gqa_needs_enable_gqa_like_torch():
    q, k, v = _randn(2, 4, 5, 16), _randn(2, 2, 5, 16), _randn(2, 2, 5, 16)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)  # torch refuses too
    with pytest.raises((ValueError, RuntimeError)) as excinfo:
        prefix_attn.scaled_dot_product_attention(q, k, v)
    assert "enable_gqa" in str(excinfo.value)


# --------------------------------------------------------------------------- backends


def test_cpu_backend_is_built():
    """The compiled CPU backend must be importable; otherwise every kernel test skips."""
    from prefix_attn import _ops

    assert "cpu" in prefix_attn.available_backends(), (
        f"cpu backend missing: available_backends() = {prefix_attn.available_backends()}; "
        f"extension import error: {getattr(_ops, 'EXTENSION_ERROR', None)}"
    )


@pytest.mark.gpu_tier
def test_available_backends():
    names = prefix_attn.available_backends()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert "reference" in names
    assert len(set(names)) == len(names)
    if not torch.cuda.is_available():
        assert "cuda" not in names


def test_select_backend_auto_and_explicit(monkeypatch):
    monkeypatch.delenv("PREFIX_ATTN_BACKEND", raising=False)
    q = _randn(2, 4, 5, 16)
    auto = prefix_attn.select_backend(q)
    assert auto in prefix_attn.available_backends()
    if "cpu" in prefix_attn.available_backends():
        assert auto == "cpu"
    assert prefix_attn.select_backend(q, backend="reference") == "reference"
    with pytest.raises(ValueError) as excinfo:
        prefix_attn.select_backend(q, backend="no-such-backend")
    assert "no-such-backend" in str(excinfo.value)


@pytest.mark.skipif("cpu" not in prefix_attn.available_backends(), reason="needs the cpu backend")
def test_auto_runs_the_selected_backend(monkeypatch):
    monkeypatch.delenv("PREFIX_ATTN_BACKEND", raising=False)
    with OpLog() as log:
        call(causal=True)
    assert len(log.named("prefix_attn.fwd")) == 1, "auto on CPU did not run the compiled kernel"


@pytest.mark.skipif("cpu" not in prefix_attn.available_backends(), reason="needs the cpu backend")
def test_env_var_overrides_auto(monkeypatch):
    q = _randn(2, 4, 5, 16)
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "reference")
    assert prefix_attn.select_backend(q) == "reference"
    with OpLog() as log:
        out = call(causal=True)
    assert log.named("prefix_attn.fwd") == [], "PREFIX_ATTN_BACKEND=reference still ran the kernel"
    assert torch.equal(out, call(causal=True, backend="reference"))
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "cpu")
    assert prefix_attn.select_backend(q) == "cpu"


def test_reference_fallback_warns_once():
    """float64 has no kernel: auto falls back to the reference and says so, once."""
    script = textwrap.dedent(
        """
        import warnings, torch, prefix_attn
        q = torch.randn(1, 2, 3, 16, dtype=torch.float64)
        k = torch.randn(1, 2, 4, 16, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                prefix_attn.prefix_attention(q, k, k)
        print(sum("reference" in str(w.message) for w in caught))
        """
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFIX_ATTN_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    if prefix_attn.select_backend(torch.zeros(1, 1, 1, 16, dtype=torch.float64)) != "reference":
        pytest.skip("a kernel backend runs float64 here: no fallback")
    assert done.stdout.strip() == "1", f"expected one fallback warning, got {done.stdout.strip()}"


# --------------------------------------------------------------------------- errors (SPEC "Errors")


def _f16(*shape):
    return _randn(*shape, dtype=torch.float16)


ERRORS = {
    # name: (overrides, exception, names the message must use one of, shape it must give)
    "q_rank3": (dict(q=_randn(B, NQ, D)), ValueError, ["q"], (B, NQ, D)),
    "q_rank5": (dict(q=_randn(B, HQ, NQ, D, 1)), ValueError, ["q"], (B, HQ, NQ, D, 1)),
    "k_rank3": (dict(k=_randn(B, NK, D)), ValueError, ["k"], (B, NK, D)),
    "v_shape": (dict(v=_randn(B, HKV, NK + 1, D)), ValueError, ["v"], (B, HKV, NK + 1, D)),
    "batch_mismatch": (dict(k=_randn(B + 1, HKV, NK, D), v=_randn(B + 1, HKV, NK, D)), ValueError, ["k", "B"], (B + 1, HKV, NK, D)),
    "head_dim_mismatch": (dict(k=_randn(B, HKV, NK, 2 * D), v=_randn(B, HKV, NK, 2 * D)), ValueError, ["k", "D"], (B, HKV, NK, 2 * D)),
    "hq_not_multiple_of_hkv": (dict(k=_randn(B, 3, NK, D), v=_randn(B, 3, NK, D)), ValueError, ["q", "k", "Hq", "Hkv"], (B, 3, NK, D)),
    "k_dtype": (dict(k=_f16(B, HKV, NK, D)), TypeError, ["k"], None),
    "q_int_dtype": (dict(q=torch.ones(B, HQ, NQ, D, dtype=torch.int32)), TypeError, ["q"], None),
    "prefix_dtype": (dict(prefix_k=_f16(HKV, P, D), prefix_v=_f16(HKV, P, D)), TypeError, ["prefix_k"], None),
    "prefix_k_without_prefix_v": (dict(prefix_v=None), ValueError, ["prefix_v"], None),
    "prefix_v_without_prefix_k": (dict(prefix_k=None), ValueError, ["prefix_k"], None),
    "prefix_v_shape": (dict(prefix_v=_randn(HKV, P + 1, D)), ValueError, ["prefix_v"], (HKV, P + 1, D)),
    "prefix_heads": (dict(prefix_k=_randn(HKV + 1, P, D), prefix_v=_randn(HKV + 1, P, D)), ValueError, ["prefix_k"], (HKV + 1, P, D)),
    "prefix_head_dim": (dict(prefix_k=_randn(HKV, P, D // 2), prefix_v=_randn(HKV, P, D // 2)), ValueError, ["prefix_k"], (HKV, P, D // 2)),
    "prefix_rank2": (dict(prefix_k=_randn(P, D), prefix_v=_randn(P, D)), ValueError, ["prefix_k"], (P, D)),
    "prefix_rank5": (dict(prefix_k=_randn(1, B, HKV, P, D), prefix_v=_randn(1, B, HKV, P, D)), ValueError, ["prefix_k"], (1, B, HKV, P, D)),
    "per_row_prefix_wrong_batch": (dict(prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D)), ValueError, ["prefix_k", "prefix_index"], (T, HKV, P, D)),
    "prefix_index_with_shared_prefix": (dict(prefix_index=torch.zeros(B, dtype=torch.int64)), ValueError, ["prefix_index"], (HKV, P, D)),
    "prefix_index_without_prefix": (dict(prefix_k=None, prefix_v=None, prefix_index=torch.zeros(B, dtype=torch.int64)), ValueError, ["prefix_index"], None),
    "prefix_index_too_big": (dict(prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D), prefix_index=torch.tensor([0, T])), ValueError, ["prefix_index"], None),
    "prefix_index_negative": (dict(prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D), prefix_index=torch.tensor([-1, 0])), ValueError, ["prefix_index"], None),
    "prefix_index_float": (dict(prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D), prefix_index=torch.tensor([0.0, 1.0])), TypeError, ["prefix_index"], None),
    "prefix_index_bool": (dict(prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D), prefix_index=torch.tensor([True, False])), TypeError, ["prefix_index"], None),
    "prefix_index_shape": (dict(prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D), prefix_index=torch.tensor([0, 1, 2])), ValueError, ["prefix_index"], (3,)),
    "prefix_index_2d": (dict(prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D), prefix_index=torch.tensor([[0, 1]])), ValueError, ["prefix_index"], (1, 2)),
    "key_padding_mask_float": (dict(key_padding_mask=torch.ones(B, NK)), TypeError, ["key_padding_mask"], None),
    "key_padding_mask_shape": (dict(key_padding_mask=torch.ones(B, NK + 1, dtype=torch.bool)), ValueError, ["key_padding_mask"], (B, NK + 1)),
    "key_padding_mask_3d": (dict(key_padding_mask=torch.ones(B, 1, NK, dtype=torch.bool)), ValueError, ["key_padding_mask"], (B, 1, NK)),
    "attn_mask_not_broadcastable": (dict(attn_mask=torch.ones(NQ, NK + 1, dtype=torch.bool)), ValueError, ["attn_mask"], (NQ, NK + 1)),
    "attn_mask_includes_prefix": (dict(attn_mask=torch.ones(NQ, P + NK, dtype=torch.bool)), ValueError, ["attn_mask"], (NQ, P + NK)),
    "attn_mask_rank5": (dict(attn_mask=torch.ones(1, B, HQ, NQ, NK, dtype=torch.bool)), ValueError, ["attn_mask"], (1, B, HQ, NQ, NK)),
    "attn_mask_wrong_heads": (dict(attn_mask=torch.ones(B, HKV + 1, NQ, NK, dtype=torch.bool)), ValueError, ["attn_mask"], (B, HKV + 1, NQ, NK)),
    "attn_mask_int": (dict(attn_mask=torch.ones(NQ, NK, dtype=torch.int64)), TypeError, ["attn_mask"], None),
    "unknown_backend": (dict(backend="nonesuch"), ValueError, ["backend", "nonesuch"], None),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_invalid_arguments_raise(name):
    overrides, exc, names, shape = ERRORS[name]
    with pytest.raises(exc) as excinfo:
        call(**overrides)
    assert_error_message(excinfo, names, shape)


@pytest.mark.parametrize("bad", ["k", "prefix_k", "key_padding_mask", "attn_mask", "prefix_index"])
def test_device_mismatch_raises(bad):
    """Another device than q's: 'meta' stands in for a GPU on a CPU-only machine."""
    overrides = {
        "k": dict(k=torch.empty(B, HKV, NK, D, device="meta")),
        "prefix_k": dict(prefix_k=torch.empty(HKV, P, D, device="meta")),
        "key_padding_mask": dict(key_padding_mask=torch.ones(B, NK, dtype=torch.bool, device="meta")),
        "attn_mask": dict(attn_mask=torch.ones(NQ, NK, dtype=torch.bool, device="meta")),
        "prefix_index": dict(
            prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D),
            prefix_index=torch.zeros(B, dtype=torch.int64, device="meta"),
        ),
    }[bad]
    with pytest.raises((ValueError, TypeError, RuntimeError)) as excinfo:
        call(**overrides)
    assert excinfo.type is not RuntimeError or "meta" in str(excinfo.value), str(excinfo.value)
    assert_error_message(excinfo, [bad, "device"])


@pytest.mark.parametrize("kpm_dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_key_padding_mask_is_like_bool(kpm_dtype):
    """Hugging Face's attention_mask (1 = attend, 0 = padding) is accepted as it is."""
    mask = torch.ones(B, NK, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, -2:] = False
    want = call(key_padding_mask=mask, causal=True)
    got = call(key_padding_mask=mask.to(kpm_dtype), causal=True)
    assert torch.equal(got, want)
    assert not torch.equal(call(causal=True), want)  # the mask mattered


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_double_backward_not_supported(backend):
    if backend == "reference":
        pytest.skip("the reference is plain autograd: double backward works there")
    x = {n: t.to(device_for(backend)).requires_grad_() for n, t in base_inputs().items()}
    out = prefix_attn.prefix_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], backend=backend)
    (dq,) = torch.autograd.grad(out.sum(), x["q"], create_graph=True)
    with pytest.raises((NotImplementedError, RuntimeError)) as excinfo:
        dq.sum().backward()
    assert "double backward" in str(excinfo.value)


def test_float_attn_mask_requiring_grad_is_refused_or_right():
    """A trainable additive mask (e.g. a learned bias): either a NotImplementedError that
    names attn_mask, or the right gradient."""
    x = base_inputs()
    bias = _randn(NQ, NK, seed=30).requires_grad_()
    try:
        out = prefix_attn.prefix_attention(x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"], attn_mask=bias)
    except NotImplementedError as e:
        assert "attn_mask" in str(e)
        return
    out.sum().backward()
    bias_ref = bias.detach().double().requires_grad_()
    xd = {n: t.double() for n, t in x.items()}
    ref = prefix_attn.prefix_attention(xd["q"], xd["k"], xd["v"], xd["prefix_k"], xd["prefix_v"], attn_mask=bias_ref,
                                       backend="reference")
    ref.sum().backward()
    torch.testing.assert_close(bias.grad.double(), bias_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_no_grad_and_inference_mode(backend):
    x = {n: t.to(device_for(backend)).requires_grad_() for n, t in base_inputs().items()}
    args = (x["q"], x["k"], x["v"], x["prefix_k"], x["prefix_v"])
    want = prefix_attn.prefix_attention(*args, causal=True, backend=backend).detach()
    with torch.no_grad():
        out = prefix_attn.prefix_attention(*args, causal=True, backend=backend)
    assert not out.requires_grad
    assert torch.equal(out, want)
    with torch.inference_mode():
        plain = [t.detach() for t in args]
        out = prefix_attn.prefix_attention(*plain, causal=True, backend=backend)
    assert torch.equal(out, want)


# --------------------------------------------------------------------------- the raw ops validate too


def _op_base():
    x = base_inputs()
    return dict(q=x["q"], k=x["k"], v=x["v"], prefix_k=x["prefix_k"].unsqueeze(0), prefix_v=x["prefix_v"].unsqueeze(0))


def _bank():
    return dict(prefix_k=_randn(T, HKV, P, D), prefix_v=_randn(T, HKV, P, D))


RAW_FWD_ERRORS = {
    "q_rank3": (dict(q=_randn(B, NQ, D)), ["q"]),
    "k_head_dim": (dict(k=_randn(B, HKV, NK, D + 1), v=_randn(B, HKV, NK, D + 1)), ["k"]),
    "v_shape": (dict(v=_randn(B, HKV, NK - 1, D)), ["v"]),
    "k_batch": (dict(k=_randn(B + 1, HKV, NK, D), v=_randn(B + 1, HKV, NK, D)), ["k"]),
    "heads_not_multiple": (dict(k=_randn(B, 3, NK, D), v=_randn(B, 3, NK, D)), ["q", "k"]),
    "k_dtype": (dict(k=_f16(B, HKV, NK, D)), ["k"]),
    "q_float64": (dict(q=_randn(B, HQ, NQ, D, dtype=torch.float64)), ["q", "k"]),
    "prefix_k_3d": (dict(prefix_k=_randn(HKV, P, D), prefix_v=_randn(HKV, P, D)), ["prefix_k"]),
    "prefix_v_missing": (dict(prefix_v=None), ["prefix_v", "prefix_k"]),
    "prefix_v_shape": (dict(prefix_v=_randn(1, HKV, P + 2, D)), ["prefix_v"]),
    "prefix_heads": (dict(prefix_k=_randn(1, HKV * 2, P, D), prefix_v=_randn(1, HKV * 2, P, D)), ["prefix_k"]),
    "bank_without_index_wrong_T": (_bank(), ["prefix_k", "prefix_index"]),
    "prefix_index_out_of_range": (dict(_bank(), prefix_index=torch.tensor([0, T])), ["prefix_index"]),
    "prefix_index_negative": (dict(_bank(), prefix_index=torch.tensor([-3, 0])), ["prefix_index"]),
    "prefix_index_float": (dict(_bank(), prefix_index=torch.tensor([0.0, 1.0])), ["prefix_index"]),
    "prefix_index_short": (dict(_bank(), prefix_index=torch.tensor([0])), ["prefix_index"]),
    "prefix_index_no_prefix": (dict(prefix_k=None, prefix_v=None, prefix_index=torch.tensor([0, 0])), ["prefix_index"]),
    "kpm_float": (dict(key_padding_mask=torch.ones(B, NK)), ["key_padding_mask"]),
    "kpm_shape": (dict(key_padding_mask=torch.ones(B, NK - 1, dtype=torch.bool)), ["key_padding_mask"]),
    "attn_mask_not_expanded": (dict(attn_mask=torch.ones(NQ, NK, dtype=torch.bool)), ["attn_mask"]),
    "attn_mask_wrong_Nk": (dict(attn_mask=torch.ones(B, HQ, NQ, NK + 1, dtype=torch.bool)), ["attn_mask"]),
    "attn_mask_fp16": (dict(attn_mask=torch.zeros(B, HQ, NQ, NK, dtype=torch.float16)), ["attn_mask"]),
    "scale_nan": (dict(scale=math.nan), ["scale"]),
}

_RAW_EXC = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)
_needs_ops = pytest.mark.skipif("cpu" not in prefix_attn.available_backends(), reason="compiled ops not built")


@_needs_ops
@pytest.mark.parametrize("name", list(RAW_FWD_ERRORS))
def test_raw_fwd_op_validates(name):
    """torch.ops.prefix_attn.fwd may be called directly, past the Python checks: the C++
    glue must refuse bad input with an exception (never crash, never read out of bounds)."""
    assert_fwd_op_refuses(torch.ops.prefix_attn.fwd.default, name)


def assert_fwd_op_refuses(op, name):
    """op, a forward op, refuses RAW_FWD_ERRORS[name] naming the arguments (shared with the
    Triton ops' test)."""
    overrides, names = RAW_FWD_ERRORS[name]
    with pytest.raises(_RAW_EXC) as excinfo:
        op(**op_kwargs(op, **dict(_op_base(), **overrides)))
    assert_error_message(excinfo, names)


def _bwd_good():
    x = _op_base()
    fwd = torch.ops.prefix_attn.fwd.default
    out, lse = fwd(**op_kwargs(fwd, **x))
    return dict(x, dout=torch.ones_like(out), out=out, lse=lse)


RAW_BWD_ERRORS = {
    "dout_shape": (lambda g: dict(dout=g["dout"][:, :, :-1]), ["dout"]),
    "dout_dtype": (lambda g: dict(dout=g["dout"].half()), ["dout"]),
    "out_shape": (lambda g: dict(out=g["out"][..., :-1]), ["out"]),
    "lse_shape": (lambda g: dict(lse=g["lse"][:, :, :-1]), ["lse"]),
    "lse_dtype": (lambda g: dict(lse=g["lse"].double()), ["lse"]),
    "q_rank3": (lambda g: dict(q=g["q"][0]), ["q"]),
    "prefix_index_out_of_range": (lambda g: dict(_bank(), prefix_index=torch.tensor([T, 0])), ["prefix_index"]),
}


@_needs_ops
@pytest.mark.parametrize("name", list(RAW_BWD_ERRORS))
def test_raw_bwd_op_validates(name):
    assert_bwd_op_refuses(torch.ops.prefix_attn.bwd.default, name)


def assert_bwd_op_refuses(op, name):
    make, names = RAW_BWD_ERRORS[name]
    good = _bwd_good()
    with pytest.raises(_RAW_EXC) as excinfo:
        op(**op_kwargs(op, **dict(good, **make(good))))
    assert_error_message(excinfo, names)


@_needs_ops
def test_raw_ops_accept_the_good_arguments():
    """The error tests above start from arguments that work."""
    good = _bwd_good()
    op = torch.ops.prefix_attn.bwd.default
    grads = op(**op_kwargs(op, **good))
    assert [tuple(g.shape) for g in grads] == [
        tuple(good[n].shape) for n in ("q", "k", "v", "prefix_k", "prefix_v")
    ]


@_needs_ops
def test_raw_bwd_returns_empty_for_grads_not_asked():
    good = _bwd_good()
    op = torch.ops.prefix_attn.bwd.default
    kwargs = op_kwargs(op, **good)
    kwargs.update(need_dq=False, need_dkv=False, need_dprefix=True)
    dq, dk, dv, dpk, dpv = op(**kwargs)
    assert dq.numel() == dk.numel() == dv.numel() == 0
    assert dpk.shape == good["prefix_k"].shape and dpv.shape == good["prefix_v"].shape
