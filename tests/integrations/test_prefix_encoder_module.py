"""prefix_attn.PrefixEncoder: shapes, parametrizations, merge, banks; and that `import
prefix_attn` never needs transformers."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import prefix_attn
from prefix_attn import PrefixEncoder

L, H, P, D = 3, 2, 5, 16


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
@pytest.mark.parametrize("tasks", [1, 3], ids=["T1", "T3"])
def test_shapes(projection, tasks):
    enc = PrefixEncoder(L, H, D, P, prefix_projection=projection, num_tasks=tasks, encoder_hidden_size=24)
    layers = enc()
    assert len(layers) == L
    expected = (H, P, D) if tasks == 1 else (tasks, H, P, D)
    for k, v in layers:
        assert tuple(k.shape) == expected and tuple(v.shape) == expected
        assert k.is_contiguous() and v.is_contiguous()
    assert tuple(enc.table().shape) == (L, 2, tasks, H, P, D)


def test_table_is_the_parameter():
    enc = PrefixEncoder(L, H, D, P)
    assert [n for n, _ in enc.named_parameters()] == ["weight"]
    for layer, (k, v) in enumerate(enc()):
        assert k.data_ptr() == enc.weight[layer, 0, 0].data_ptr()  # views, no copy
        assert torch.equal(v, enc.weight[layer, 1, 0])


def test_gradient_reaches_only_used_entries():
    enc = PrefixEncoder(L, H, D, P, num_tasks=3)
    k, v = enc()[1]
    (k[2].sum() + 2 * v[0].sum()).backward()
    grad = enc.weight.grad
    assert torch.equal(grad[1, 0, 2], torch.ones(H, P, D))
    assert torch.equal(grad[1, 1, 0], torch.full((H, P, D), 2.0))
    assert grad.abs().sum() == H * P * D * 3


def test_projection_runs_once_per_call_on_the_virtual_tokens():
    """The MLP runs on the T * P virtual tokens once per call, whatever the batch."""
    enc = PrefixEncoder(L, H, D, P, prefix_projection=True, num_tasks=2, encoder_hidden_size=24)
    rows = []
    enc.transform.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    enc()
    assert rows == [2 * P]
    # PEFT's layout of one virtual token's output vector is [L, 2, Hkv, D]
    out = enc.transform(enc.embedding.weight).view(2, P, L, 2, H, D)
    k, v = enc()[1]
    torch.testing.assert_close(k[1, :, 3], out[1, 3, 1, 0], rtol=0, atol=0)
    torch.testing.assert_close(v[0, :, 4], out[0, 4, 1, 1], rtol=0, atol=0)


def test_merge_folds_the_mlp():
    torch.manual_seed(0)
    enc = PrefixEncoder(L, H, D, P, prefix_projection=True, encoder_hidden_size=24)
    before = [tuple(t.detach().clone() for t in kv) for kv in enc()]
    assert enc.merge() is enc
    assert not enc.prefix_projection and [n for n, _ in enc.named_parameters()] == ["weight"]
    assert enc.weight.requires_grad
    for (k0, v0), (k1, v1) in zip(before, enc()):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert enc.merge() is enc  # a no-op now


def test_dropout_only_in_training():
    enc = PrefixEncoder(L, H, D, P, dropout=0.5)
    enc.eval()
    assert torch.equal(enc()[0][0], enc.weight[0, 0, 0])
    enc.train()
    k = enc()[0][0]
    zeros = (k == 0).float().mean().item()
    assert 0.3 < zeros < 0.7


def test_load_table():
    enc = PrefixEncoder(L, H, D, P, num_tasks=2)
    table = torch.randn(L, 2, H, P, D)
    enc.load_table(table, task=1)
    assert torch.equal(enc.weight[:, :, 1], table)
    with pytest.raises(ValueError, match=r"expected a table of shape \[3, 2, 2, 5, 16\]"):
        enc.load_table(torch.randn(L, 2, H, P + 1, D), task=0)
    with pytest.raises(ValueError, match="task must be an int in"):
        enc.load_table(table, task=2)
    with pytest.raises(ValueError, match="prefix_projection"):
        PrefixEncoder(L, H, D, P, prefix_projection=True).load_table(table)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=0), "num_layers"), (dict(num_virtual_tokens=-1), "num_virtual_tokens"),
    (dict(num_tasks=0), "num_tasks"), (dict(dropout=1.0), "dropout"), (dict(head_dim=2.5), "head_dim"),
])
def test_bad_arguments(kwargs, match):
    args = dict(num_layers=L, num_kv_heads=H, head_dim=D, num_virtual_tokens=P)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k in ("num_tasks", "dropout")}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PrefixEncoder(**args, **extra)


def test_feeds_prefix_attention():
    """The encoder's pairs go straight into the kernel, shared or as a bank."""
    enc = PrefixEncoder(L, H, D, P, num_tasks=3)
    q, k, v = torch.randn(2, 4, 7, D), torch.randn(2, H, 7, D), torch.randn(2, H, 7, D)
    pk, pv = enc()[0]
    index = torch.tensor([2, 0])
    out = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, prefix_index=index)
    ref = prefix_attn.prefix_attention(q, k, v, pk, pv, causal=True, prefix_index=index, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_import_never_needs_transformers():
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
            "import prefix_attn, prefix_attn.integrations\n"
            "enc = prefix_attn.PrefixEncoder(2, 1, 16, 4); assert len(enc()) == 2\n"
            "try:\n    import prefix_attn.integrations.transformers\nexcept ImportError: print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
