"""Host synchronisations per call on the CUDA paths: there must be none.

On CUDA, reading a device value on the host (item, bool(t), int(t), tolist, .cpu()) waits for
the stream: latency on every call of every layer, and a training step that cannot be captured
in a CUDA graph. The SPEC asks for prefix_index's range to be checked "on CUDA without a host
synchronisation"; it is a device-side assert (`torch._assert_async`), as torch's index ops do.

On a GPU, torch.cuda.set_sync_debug_mode("error") checks the real calls (skipped without one).
On CPU, `HostReads` counts the host reads while the code takes its CUDA path on CPU tensors:
the range checks decide by device in one place each (`_inputs._host_reads_are_free`, and the
C++ check's on_device flag, which the test aid `_C._check_prefix_index_range` exposes), and the
tests force that decision. On CPU itself a host read is free, and the checks stay exact: a
ValueError naming prefix_index, its range and the values seen.
The Triton launchers are counted the same way in test_triton.py (the interpreter's process).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import prefix_attn
from prefix_attn import _inputs, _ops
from attn_testing import HostReads, assert_no_cuda_sync, kernel_backends

B, HQ, HKV, NQ, NK, P, D, T = 2, 4, 2, 5, 7, 3, 16, 4


def _randn(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _bank_inputs(device="cpu", requires_grad=True):
    x = dict(q=_randn(B, HQ, NQ, D, seed=1), k=_randn(B, HKV, NK, D, seed=2), v=_randn(B, HKV, NK, D, seed=3),
             prefix_k=_randn(T, HKV, P, D, seed=4), prefix_v=_randn(T, HKV, P, D, seed=5))
    x = {n: t.to(device).requires_grad_(requires_grad) for n, t in x.items()}
    x["prefix_index"] = torch.tensor([3, 1], device=device)
    x["attn_mask"] = _randn(NQ, NK, seed=6, device=device)  # a float mask with a prefix
    return x


@pytest.fixture
def cuda_path(monkeypatch):
    """The range checks take their CUDA path (a device assert) on CPU tensors."""
    monkeypatch.setattr(_inputs, "_host_reads_are_free", lambda t: False)


# --------------------------------------------------------------------------- the check itself


def test_range_check_cuda_path_reads_nothing_back(cuda_path):
    bank = torch.zeros(T, HKV, P, D)
    with HostReads() as counter:
        _inputs.check_prefix_index_range(torch.tensor([0, T - 1, 2]), bank)
    assert counter.reads == [] and counter.asserts == 1
    # The device assert carries the message (on CPU, torch's _assert_async raises at once).
    with pytest.raises(RuntimeError, match=rf"prefix_index values must lie in \[0, {T}\)"):
        _inputs.check_prefix_index_range(torch.tensor([0, T]), bank)


def test_range_check_cpu_path_is_exact():
    bank = torch.zeros(T, HKV, P, D)
    with pytest.raises(ValueError, match=rf"prefix_index values must lie in \[0, {T}\).*got values in \[-1, 0\]"):
        _inputs.check_prefix_index_range(torch.tensor([-1, 0]), bank)


@pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="compiled ops not built")
def test_compiled_ops_range_check_cuda_path_reads_nothing_back():
    """The check the C++ ops run (csrc/prefix_attn_api.cpp), on its CUDA branch. Its calls into
    ATen are visible to the counter because it is called here directly, not inside an op."""
    bank = torch.zeros(T, HKV, P, D)
    with HostReads() as counter:
        _ops._C._check_prefix_index_range(torch.tensor([0, T - 1]), bank, True)
    assert counter.reads == [] and counter.asserts == 1
    with pytest.raises(RuntimeError, match=rf"prefix_index values must lie in \[0, {T}\)"):
        _ops._C._check_prefix_index_range(torch.tensor([T, 0]), bank, True)
    with HostReads() as counter:  # on CPU: exact, and the host reads are free
        with pytest.raises(ValueError, match=rf"\[0, {T}\).*got values in \[0, {T}\]"):
            _ops._C._check_prefix_index_range(torch.tensor([T, 0]), bank, False)
    assert counter.asserts == 0


# --------------------------------------------------------------------------- whole calls


def test_prefix_attention_cuda_path_reads_nothing_back(cuda_path):
    """prefix_attention forward and backward, argument checks included, on the Python backend
    (whose every op the counter sees), with a bank, prefix_index and a float mask."""
    x = _bank_inputs()
    dout = torch.ones(B, HQ, NQ, D)
    with HostReads() as counter:
        out = prefix_attn.prefix_attention(**x, causal=True, backend="reference")
        out.backward(dout)
    assert counter.reads == [], f"host reads: {counter.reads}"
    assert counter.asserts == 1  # the reference backend's range check


def test_cpu_path_reads_min_and_max_once():
    """On CPU, where a host read is free and the check stays exact: the counter sees its two
    reads (min and max), once per call, and nothing else (the argument checks read nothing)."""
    x = _bank_inputs(requires_grad=False)
    with HostReads() as counter:
        prefix_attn.prefix_attention(**x, causal=True, backend="reference")
    assert len(counter.reads) == 2 and counter.asserts == 0


# --------------------------------------------------------------------------- on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA_BACKENDS = [b for b in kernel_backends() if b in ("triton", "cuda")]


@pytest.mark.gpu_tier
@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS or [pytest.param("triton", marks=pytest.mark.skip("no CUDA backend"))])
@pytest.mark.parametrize("prefix", ["bank", "shared", "per_row"])
def test_cuda_call_never_synchronises(backend, prefix):
    x = _bank_inputs("cuda")
    if prefix != "bank":
        del x["prefix_index"]
        n = 1 if prefix == "shared" else B
        x["prefix_k"] = x["prefix_k"][:n].detach().requires_grad_()
        x["prefix_v"] = x["prefix_v"][:n].detach().requires_grad_()
    dout = torch.ones(B, HQ, NQ, D, device="cuda")

    def step():
        out = prefix_attn.prefix_attention(**x, causal=True, backend=backend)
        out.backward(dout)

    assert_no_cuda_sync(step)
    torch.cuda.synchronize()


@pytest.mark.gpu_tier
@needs_cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS or [pytest.param("triton", marks=pytest.mark.skip("no CUDA backend"))])
def test_cuda_out_of_range_index_asserts_on_the_device(backend):
    """Out of range on CUDA: a device-side assert (the process's CUDA context is lost, so it
    runs in a process of its own); never a result, never a read out of bounds."""
    script = textwrap.dedent(f"""
        import torch, prefix_attn
        q = torch.randn(2, 4, 5, 16, device="cuda")
        k = torch.randn(2, 2, 7, 16, device="cuda")
        bank = torch.randn(3, 2, 3, 16, device="cuda")
        out = prefix_attn.prefix_attention(q, k, k, bank, bank, prefix_index=torch.tensor([0, 3], device="cuda"),
                                           backend={backend!r})
        torch.cuda.synchronize()
        print("NO ERROR", out.sum().item())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "NO ERROR" not in run.stdout, run.stdout + run.stderr
    assert "device-side assert" in run.stderr or "prefix_index values must lie in" in run.stderr, run.stderr
