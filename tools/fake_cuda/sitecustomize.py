"""A pretend CUDA device on CPU, to smoke-test `make gpu-check` (tools/gpu_check.sh) without a GPU.

    PYTHONPATH=tools/fake_cuda PREFIX_ATTN_FAKE_CUDA=1 GPU_PYTHON=.venv/bin/python \\
        tools/gpu_check.sh --seconds 120 --tier-timeout 30 --mirror /tmp/fake-out

Every python process that the driver starts imports this module first (it is a sitecustomize on
PYTHONPATH). With PREFIX_ATTN_FAKE_CUDA=1 it makes torch report one CUDA device ("Fake CUDA
(CPU)", sm_90, CUDA 13.0), puts tensors asked for on "cuda" on the CPU, times CUDA events with
perf_counter, reports zero memory, and runs Triton under its interpreter. Enough for the driver's
control flow (probe, logs, commit, tier, deadline, mirror), not for numbers: the build fails (no
nvcc; its failure path is what is exercised), the cuda backend is absent, and the suite's shapes
are far too big for the CPU, so its deadline and the driver's hard stop are what get exercised.
"""
import os

if os.environ.get("PREFIX_ATTN_FAKE_CUDA") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import functools
    import time
    import types

    import torch

    def _cpu(device):
        if device is None:
            return None
        if isinstance(device, int) or torch.device(device).type == "cuda":
            return torch.device("cpu")
        return device

    def _route(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return fn(*args, **kwargs)
        return wrapper

    for _name in ("randn", "rand", "randint", "zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor",
                  "empty_strided", "randn_like", "rand_like", "zeros_like", "ones_like", "empty_like", "full_like",
                  "linspace", "eye"):
        setattr(torch, _name, _route(getattr(torch, _name)))

    _to = torch.Tensor.to

    def _tensor_to(self, *args, **kwargs):
        if args and isinstance(args[0], (str, torch.device, int)) and not isinstance(args[0], bool):
            try:
                args = (_cpu(args[0]),) + args[1:]
            except (RuntimeError, TypeError):
                pass
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return _to(self, *args, **kwargs)

    torch.Tensor.to = _tensor_to
    torch.Tensor.cuda = lambda self, *a, **k: self

    class _Event:
        def __init__(self, enable_timing=False, **_):
            self.t = None

        def record(self, stream=None):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    _props = types.SimpleNamespace(name="Fake CUDA (CPU)", major=9, minor=0, multi_processor_count=132,
                                   total_memory=141 * 2**30)
    torch.version.cuda = "13.0"
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_name = lambda device=None: _props.name
    torch.cuda.get_device_capability = lambda device=None: (_props.major, _props.minor)
    torch.cuda.get_device_properties = lambda device=None: _props
    torch.cuda.Event = _Event
    for _name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "set_device", "manual_seed",
                  "manual_seed_all"):
        setattr(torch.cuda, _name, lambda *a, **k: None)
    for _name in ("memory_allocated", "max_memory_allocated", "memory_reserved"):
        setattr(torch.cuda, _name, lambda *a, **k: 0)
    torch.cuda.mem_get_info = lambda device=None: (_props.total_memory, _props.total_memory)
