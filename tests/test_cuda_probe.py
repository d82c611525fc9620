"""The cuda backend's availability probe (prefix_attn/backends.py): `cuda` is listed
only where a real call works and passes a self-check against the reference (on the tensor-core
path), the probe runs once, and when it fails the reason ("cuda backend failed its self-check:
...", with the worst error) reaches `unavailable_reason`, the error of an explicit request, and
the reference fallback's warning.

The CUDA parts are faked (torch.cuda.*, the extension's _has_cuda_kernels, the probe call), so
this runs on CPU; the probe's own call runs for real through the CPU kernels. On a GPU the last
test checks that the real probe passes."""

import re
import warnings

import pytest
import torch

import prefix_attn
from prefix_attn import _ops, backends

needs_extension = pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="compiled ops not built")


@pytest.fixture
def fresh_registry(monkeypatch):
    """Empty availability caches for the test; the process's own come back afterwards."""
    monkeypatch.setattr(backends, "_availability", {})
    monkeypatch.setattr(backends, "_unavailable", {})
    monkeypatch.setattr(backends, "_warned_reference", False)
    monkeypatch.delenv("PREFIX_ATTN_BACKEND", raising=False)


@pytest.fixture
def fake_gpu(monkeypatch, fresh_registry):
    """A machine whose torch sees one GPU and whose extension has CUDA kernels. Returns the calls
    the (faked) probe received; set `probe.result` to what it should return or raise."""
    if not _ops.HAS_EXTENSION:
        pytest.skip("compiled ops not built")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(_ops._C, "_has_cuda_kernels", lambda: True)

    class Probe:
        calls = []
        result = None

        def __call__(self, device):
            self.calls.append(device)
            if isinstance(self.result, BaseException):
                raise self.result
            return self.result

    probe = Probe()
    probe.calls = []
    monkeypatch.setattr(backends, "_cuda_probe", probe)
    return probe


def test_a_failing_probe_leaves_cuda_out_and_says_why(fake_gpu):
    fake_gpu.result = RuntimeError("CUDA error: no kernel image is available for execution on the device")
    for _ in range(3):
        assert "cuda" not in prefix_attn.available_backends()
    assert fake_gpu.calls == [torch.device("cuda", 0)], "the probe must run once per process"
    reason = backends.unavailable_reason("cuda")
    assert "cuda backend failed its self-check on cuda:0: the call raised RuntimeError" in reason
    assert "no kernel image" in reason
    with pytest.raises(NotImplementedError) as excinfo:
        prefix_attn.select_backend(torch.zeros(1, 1, 1, 16), backend="cuda")
    assert "not available here" in str(excinfo.value) and "no kernel image" in str(excinfo.value)


def test_the_h200_failure_is_caught_by_the_probe(fake_gpu):
    """What every call raised on the first H200 run now keeps cuda out of the list."""
    fake_gpu.result = RuntimeError("prefix_attn: this torch exports no aoti_torch_get_current_cuda_stream; "
                                   "the cuda backend needs torch built with CUDA")
    assert "cuda" not in prefix_attn.available_backends()
    assert "aoti_torch_get_current_cuda_stream" in backends.unavailable_reason("cuda")


def test_wrong_results_leave_cuda_out(fake_gpu):
    fake_gpu.result = "max |out - reference| = 0.5 (tolerance 0.06)"
    assert "cuda" not in prefix_attn.available_backends()
    assert backends.unavailable_reason("cuda") == ("cuda backend failed its self-check on cuda:0: "
                                                   "max |out - reference| = 0.5 (tolerance 0.06)")


def test_a_passing_probe_lists_cuda(fake_gpu):
    assert prefix_attn.available_backends().index("cuda") < prefix_attn.available_backends().index("cpu")
    assert backends.unavailable_reason("cuda") is None
    assert len(fake_gpu.calls) == 1


@needs_extension
def test_a_call_on_cpu_never_probes_cuda(fake_gpu):
    """The probe initialises CUDA and runs kernels: "auto" on CPU tensors must not pay for it."""
    q = torch.zeros(1, 2, 3, 16)
    assert prefix_attn.select_backend(q) == "cpu"
    prefix_attn.prefix_attention(q, q, q, causal=True)
    assert fake_gpu.calls == [] and "cuda" not in backends._availability


def test_no_cuda_kernels_no_probe(fake_gpu, monkeypatch):
    monkeypatch.setattr(_ops._C, "_has_cuda_kernels", lambda: False)
    assert "cuda" not in prefix_attn.available_backends()
    assert "no CUDA kernels" in backends.unavailable_reason("cuda")
    assert fake_gpu.calls == []


def test_no_gpu_no_probe(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in prefix_attn.available_backends()
    assert "torch.cuda.is_available() is False" in backends.unavailable_reason("cuda")
    assert fake_gpu.calls == []


def test_no_extension(fresh_registry, monkeypatch):
    monkeypatch.setattr(_ops, "HAS_EXTENSION", False)
    monkeypatch.setattr(_ops, "EXTENSION_ERROR", ImportError("libc10_cuda.so: cannot open shared object file"))
    assert "cuda" not in prefix_attn.available_backends()
    assert "did not load: libc10_cuda.so" in backends.unavailable_reason("cuda")


def test_capture_defers_the_probe(fake_gpu, monkeypatch):
    """During CUDA graph capture a probe's kernels and synchronisation would break the capture: the
    backend counts as available unchecked, and the probe runs at the first call outside capture."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert "cuda" in prefix_attn.available_backends()
    assert fake_gpu.calls == []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fake_gpu.result = RuntimeError("boom")
    assert "cuda" not in prefix_attn.available_backends()
    assert len(fake_gpu.calls) == 1


def test_reference_fallback_warning_names_what_is_missing(fresh_registry, monkeypatch):
    """On a device whose kernel backends are all missing, the fallback's warning says why."""
    monkeypatch.setattr(backends, "_availability", {"cpu": False})
    monkeypatch.setattr(backends, "_unavailable", {"cpu": "a reason the test made up"})
    q = torch.zeros(1, 2, 3, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prefix_attn.prefix_attention(q, q, q)
    messages = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert messages and "not available here: cpu (a reason the test made up)" in messages[0]


@needs_extension
def test_the_probe_call_itself_on_cpu():
    """The real probe call, through the CPU kernels: it accepts a correct backend and draws no
    random numbers."""
    state = torch.random.get_rng_state()
    assert backends._cuda_probe(torch.device("cpu")) is None
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.inference_mode():  # a first call may come from inference code
        assert backends._cuda_probe(torch.device("cpu")) is None


@needs_extension
@pytest.mark.parametrize("wrong", ["dprefix_v", "nan"])
def test_the_probe_call_reports_the_worst_error(monkeypatch, wrong):
    """A kernel that computes the wrong thing fails the self-check, which names the worst output
    (relative to its tolerance): here one gradient off by 1, or a NaN in dq."""
    real_bwd = torch.ops.prefix_attn.bwd

    class Ops:  # torch.ops.prefix_attn with one gradient spoiled
        fwd = torch.ops.prefix_attn.fwd

        @staticmethod
        def bwd(*args):
            dq, dk, dv, dpk, dpv = real_bwd(*args)
            if wrong == "nan":
                dq = dq.clone()
                dq[1, 2, 3, 4] = float("nan")
            return dq, dk, dv, dpk, dpv + 1.0 if wrong == "dprefix_v" else dpv

    monkeypatch.setattr(torch.ops, "prefix_attn", Ops)
    error = backends._cuda_probe(torch.device("cpu"))
    want = {"dprefix_v": r"max \|dprefix_v - reference\| = 1(\.0\d*)? \(tolerance [0-9.]+\)",
            "nan": r"max \|dq - reference\| = nan \(tolerance [0-9.]+\)"}[wrong]
    assert error is not None and re.fullmatch(want, error), error


@needs_extension
def test_compile_traces_past_an_unprobed_registry(fresh_registry):
    """torch.compile(fullgraph=True) as the first call of a process: the probes run at trace time,
    outside the graph (a probe's pybind calls and synchronisation cannot be traced), and one that
    says no still records why."""
    def fn(q, k, v, prefix_k, prefix_v):
        return prefix_attn.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True)

    def listed(q):  # every probe, the turned-down ones too
        return q * len(prefix_attn.available_backends())

    q, pk = torch.randn(1, 2, 4, 16), torch.randn(2, 3, 16)
    torch._dynamo.reset()
    try:
        out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, q, q, pk, pk)
        assert set(backends._availability) == {"cpu"}, "auto on CPU probed a backend for another device"
        torch.compile(listed, fullgraph=True, backend="aot_eager")(q)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, fn(q, q, q, pk, pk))
    assert set(backends._availability) == {"triton", "cuda", "cpu", "reference"}
    if not backends._availability["cuda"]:
        assert backends._unavailable["cuda"]


@pytest.mark.gpu_tier
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_extension
def test_the_real_probe_passes_on_a_gpu():
    """On a GPU with a CUDA build of the extension, the probe's real call must work; if it does
    not, its reason is the first thing to read."""
    if not _ops._C._has_cuda_kernels():
        pytest.skip("the extension was built without CUDA kernels")
    assert backends.unavailable_reason("cuda") is None
    assert "cuda" in prefix_attn.available_backends()
