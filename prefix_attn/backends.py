"""The backend registry: which implementation runs a call.

A backend is a name, the device types it runs on, a priority for "auto", an availability
probe, a `supports` check for one call, and a `run` that returns (out, lse) with autograd.
Adding a backend means registering one here; callers never change.

    backend   runs on                       role
    triton    CUDA (CPU under TRITON_INTERPRET=1, tests only)   the fast GPU path
    cuda      CUDA, compiled extension      fallback where Triton is missing
    cpu       CPU, compiled extension       the CPU path
    reference anywhere, plain PyTorch       the oracle

"auto" picks the available backend of highest priority that runs on the tensors' device and
supports the call; the environment variable PREFIX_ATTN_BACKEND overrides it. Landing on
"reference" warns once. `select_backend(q)` tells which backend a call would use.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _ops
from ._inputs import AttnInputs, check_prefix_index_range
from .reference import reference_forward

ENV_VAR = "PREFIX_ATTN_BACKEND"


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: Tuple[str, ...]  # empty: any device
    dtypes: Tuple[torch.dtype, ...]  # empty: any floating dtype
    priority: int
    is_available: Callable[[], bool]
    # Why this backend cannot run these inputs (beyond device and dtype), or None when it can.
    unsupported: Callable[[AttnInputs], Optional[str]]
    run: Callable[[AttnInputs, bool], Tuple[Tensor, Tensor]]  # (inputs, deterministic)

    # Devices on which "auto" may pick it (the Triton interpreter runs on CPU, but slowly).
    auto_device_types: Optional[Tuple[str, ...]] = None

    def why_not(self, q: Tensor, inputs: Optional[AttnInputs]) -> Optional[str]:
        if self.device_types and q.device.type not in self.device_types:
            return f"it runs on {'/'.join(self.device_types)} tensors, and q is on {q.device}"
        if self.dtypes and q.dtype not in self.dtypes:
            return f"it runs {', '.join(str(d) for d in self.dtypes)}, and q is {q.dtype}"
        return None if inputs is None else self.unsupported(inputs)


_REGISTRY: Dict[str, Backend] = {}
_warned_reference = False


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _availability.pop(backend.name, None)


_availability: Dict[str, bool] = {}


def _is_available(backend: Backend) -> bool:
    # Probed once per process: the probes (find_spec, torch.cuda.is_available) cost ~60 us, as
    # much as a small attention call, and their answer cannot change while the process runs.
    if backend.name not in _availability:
        _availability[backend.name] = bool(backend.is_available())
    return _availability[backend.name]


def available_backends() -> List[str]:
    """Names of the backends usable on this machine, fastest first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority) if _is_available(b)]


def _get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"prefix_attn: unknown backend {name!r}; known: {sorted(_REGISTRY)} or 'auto'")
    backend = _REGISTRY[name]
    if not _is_available(backend):
        raise NotImplementedError(f"prefix_attn: backend {name!r} is not available here; available: {available_backends()}")
    return backend


def _requested(backend: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"prefix_attn: backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        return os.environ.get(ENV_VAR, "auto") or "auto"
    return backend


def _resolve(q: Tensor, backend: str, inputs: Optional[AttnInputs]) -> Backend:
    backend = _requested(backend)
    if backend != "auto":
        chosen = _get(backend)
        reason = chosen.why_not(q, inputs)
        if reason is not None:
            raise NotImplementedError(f"prefix_attn: backend {backend!r} cannot run this call: {reason}")
        return chosen
    for name in available_backends():
        candidate = _REGISTRY[name]
        auto_ok = candidate.auto_device_types is None or q.device.type in candidate.auto_device_types
        if auto_ok and candidate.why_not(q, inputs) is None:
            return candidate
    raise NotImplementedError(f"prefix_attn: no backend runs {q.dtype} on {q.device}")


def select_backend(q: Tensor, backend: str = "auto") -> str:
    """The name of the backend `prefix_attention(q, ..., backend=backend)` would use for q's device
    and dtype (honouring PREFIX_ATTN_BACKEND)."""
    return _resolve(q, backend, None).name


def run(inputs: AttnInputs, backend: str, deterministic: bool) -> Tuple[Tensor, Tensor]:
    global _warned_reference
    chosen = _resolve(inputs.q, backend, inputs)
    if chosen.name == "reference" and _requested(backend) == "auto" and not _warned_reference:
        _warned_reference = True
        warnings.warn(
            f"prefix_attn: no fused backend runs this call (q: {inputs.q.dtype} on {inputs.q.device}, "
            f"head dim {inputs.q.shape[-1]}); falling back to the slow reference backend",
            stacklevel=3)
    return chosen.run(inputs, deterministic)


# ----------------------------------------------------------------------------------------------
# The backends

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _extension_unsupported(inputs: AttnInputs) -> Optional[str]:
    if inputs.attn_mask is not None and inputs.attn_mask.requires_grad:
        return "a float attn_mask that requires grad"
    return None


def _run_extension(inputs: AttnInputs, deterministic: bool) -> Tuple[Tensor, Tensor]:
    return torch.ops.prefix_attn.fwd(
        inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.prefix_index,
        inputs.key_padding_mask, inputs.attn_mask, inputs.scale, inputs.causal, deterministic)


def _run_reference(inputs: AttnInputs, deterministic: bool) -> Tuple[Tensor, Tensor]:
    if inputs.prefix_index is not None:  # torch's indexing would check too, with no word of prefix_index
        check_prefix_index_range(inputs.prefix_index, inputs.prefix_k)
    return reference_forward(inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.prefix_index,
                             inputs.key_padding_mask, inputs.attn_mask, inputs.scale, inputs.causal)


def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or _TRITON_INTERPRET


def _run_triton(inputs: AttnInputs, deterministic: bool) -> Tuple[Tensor, Tensor]:
    from . import triton_impl  # imports triton: only when the backend is used

    return triton_impl.triton_fwd(
        inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.prefix_index,
        inputs.key_padding_mask, inputs.attn_mask, inputs.scale, inputs.causal, deterministic)


def _cuda_kernels_built() -> bool:
    return _ops.HAS_EXTENSION and _ops._C._has_cuda_kernels() and torch.cuda.is_available()


register_backend(Backend("cpu", ("cpu",), _KERNEL_DTYPES, 10, lambda: _ops.HAS_EXTENSION,
                         _extension_unsupported, _run_extension))
register_backend(Backend("cuda", ("cuda",), _KERNEL_DTYPES, 20, _cuda_kernels_built,
                         _extension_unsupported, _run_extension))
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
register_backend(Backend("triton", ("cuda", "cpu") if _TRITON_INTERPRET else ("cuda",), _KERNEL_DTYPES, 30,
                         _triton_available, _extension_unsupported, _run_triton, auto_device_types=("cuda",)))
register_backend(Backend("reference", (), (), 0, lambda: True, lambda inputs: None, _run_reference))
