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
"reference" warns once. `select_backend(q)` tells which backend a call would use, and
`unavailable_reason(name)` why a backend is missing (asking for it by name says so too).
"""
from __future__ import annotations

import importlib.util
import math
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
    _unavailable.pop(backend.name, None)


class BackendUnavailable(Exception):
    """Raised by an availability probe: the backend is not available, and the message says why."""


class _ProbeDeferred(Exception):
    """Raised by an availability probe that cannot run now (a CUDA graph is being captured): the
    backend counts as available, unchecked, and is probed again at the next call."""


_availability: Dict[str, bool] = {}
_unavailable: Dict[str, str] = {}  # name -> why, for the backends a probe turned down


def _is_available(backend: Backend) -> bool:
    return _available(backend.name)


# torch.compile calls it while tracing and takes the answer as a constant: a probe may run kernels
# and synchronise, which must not land in a graph.
@torch.compiler.assume_constant_result
def _available(name: str) -> bool:
    # Probed once per process: the probes (find_spec, torch.cuda.is_available) cost ~60 us, as
    # much as a small attention call, and their answer cannot change while the process runs.
    if name not in _availability:
        try:
            _availability[name] = bool(_REGISTRY[name].is_available())
        except BackendUnavailable as exc:
            _availability[name] = False
            _unavailable[name] = str(exc)
        except _ProbeDeferred:
            return True
    return _availability[name]


def unavailable_reason(name: str) -> Optional[str]:
    """Why backend `name` is not available here (probing it first), or None when it is. Backends
    whose probe gives no reason (triton: not installed, or no GPU) get a generic one."""
    backend = _REGISTRY.get(name)
    if backend is None:
        raise ValueError(f"prefix_attn: unknown backend {name!r}; known: {sorted(_REGISTRY)}")
    if _is_available(backend):
        return None
    return _unavailable.get(name, "its availability check returned False")


def available_backends() -> List[str]:
    """Names of the backends usable on this machine, fastest first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority) if _is_available(b)]


def _get(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"prefix_attn: unknown backend {name!r}; known: {sorted(_REGISTRY)} or 'auto'")
    backend = _REGISTRY[name]
    if not _is_available(backend):
        raise NotImplementedError(f"prefix_attn: backend {name!r} is not available here ({unavailable_reason(name)}); "
                                  f"available: {available_backends()}")
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
    # Device and dtype before availability: a backend for another device is never probed (the
    # cuda probe initialises CUDA, which a call on CPU tensors must not do).
    for candidate in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
        auto_ok = candidate.auto_device_types is None or q.device.type in candidate.auto_device_types
        if (auto_ok and candidate.why_not(q, None) is None and _is_available(candidate)
                and candidate.why_not(q, inputs) is None):
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
        missing = [f"{name} ({why})" for name, why in _unavailable.items()
                   if inputs.q.device.type in _REGISTRY[name].device_types]
        warnings.warn(
            f"prefix_attn: no fused backend runs this call (q: {inputs.q.dtype} on {inputs.q.device}, "
            f"head dim {inputs.q.shape[-1]}); falling back to the slow reference backend"
            + (f"; not available here: {'; '.join(missing)}" if missing else ""),
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
        inputs.key_padding_mask, inputs.attn_mask, inputs.scale, inputs.causal, deterministic,
        inputs.dropout_p, inputs.dropout_seed, inputs.dropout_offset)


def _run_reference(inputs: AttnInputs, deterministic: bool) -> Tuple[Tensor, Tensor]:
    if inputs.prefix_index is not None:  # torch's indexing would check too, with no word of prefix_index
        check_prefix_index_range(inputs.prefix_index, inputs.prefix_k)
    return reference_forward(inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.prefix_index,
                             inputs.key_padding_mask, inputs.attn_mask, inputs.scale, inputs.causal,
                             inputs.dropout_p, inputs.dropout_seed, inputs.dropout_offset)


def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailable("triton is not installed (pip install 'prefix_attn[triton]'; it runs on CUDA GPUs)")
    if not (torch.cuda.is_available() or _TRITON_INTERPRET):
        raise BackendUnavailable(f"it runs on CUDA GPUs, and torch.cuda.is_available() is False "
                                 f"(torch {torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'})")
    return True


def _cpu_available() -> bool:
    """The extension's CPU kernels: installed, or compiled here at this first probe (`_ops.load`)."""
    if not _ops.load():
        raise BackendUnavailable(_ops.why_unavailable())
    return True


def _run_triton(inputs: AttnInputs, deterministic: bool) -> Tuple[Tensor, Tensor]:
    from . import triton_backend  # imports triton: only when the backend is used

    return triton_backend.triton_fwd(
        inputs.q, inputs.k, inputs.v, inputs.prefix_k, inputs.prefix_v, inputs.prefix_index,
        inputs.key_padding_mask, inputs.attn_mask, inputs.scale, inputs.causal, deterministic,
        inputs.dropout_p, inputs.dropout_seed, inputs.dropout_offset)


def _cuda_available() -> bool:
    """The cuda backend is listed only where a real call works: the extension has CUDA kernels,
    torch sees a GPU, and a self-check (one small forward and backward on the current device, on
    the tensor-core path) runs and matches the reference. Otherwise BackendUnavailable says which
    of these failed (the backend was once listed on an H200 where every call failed; its
    tensor-core kernels were then written on a machine without a GPU)."""
    if not _ops.HAS_EXTENSION:  # no build at first use here: it would compile the CPU kernels only
        if _ops.EXTENSION_ERROR is not None:
            raise BackendUnavailable(f"the compiled extension prefix_attn._C did not load: {_ops.EXTENSION_ERROR}")
        raise BackendUnavailable("prefix_attn was installed without its compiled extension (pip's build isolation "
                                 "makes a pure-Python install); the CUDA kernels need a build against this torch "
                                 "with nvcc: pip install --no-build-isolation (README: Install)")
    if not _ops._C._has_cuda_kernels():
        raise BackendUnavailable("prefix_attn._C has no CUDA kernels: it was built with PREFIX_ATTN_CUDA=0, or "
                                 "without a CUDA torch or nvcc, or compiled at first use (CPU kernels only)")
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"torch.cuda.is_available() is False (torch {torch.__version__})")
    if torch.cuda.is_current_stream_capturing():
        raise _ProbeDeferred()  # its kernels and synchronisation would break the capture
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        error = _cuda_probe(device)
    except Exception as exc:  # whatever a broken build, driver or GPU raises
        raise BackendUnavailable(f"cuda backend failed its self-check on {device}: the call raised "
                                 f"{type(exc).__name__}: {exc}") from exc
    if error is not None:
        raise BackendUnavailable(f"cuda backend failed its self-check on {device}: {error}")
    return True


def _cuda_probe(device: torch.device) -> Optional[str]:
    """The cuda backend's self-check: one causal, grouped-query call with a shared prefix through the
    compiled ops, forward and backward with every gradient, in bfloat16 on `device`, against the
    reference in float32. Its shape takes the tensor-core kernels (bfloat16, head dim 64) across
    more than one tile of queries and keys, with tails (70 queries, 77 keys, a prefix of 19).
    Returns the worst error relative to its tolerance, or None. The tolerance is loose (5% of the
    largest reference value, plus 0.01; bfloat16 rounding gives under 1%): it is there to catch a
    kernel that computes the wrong thing, not to grade precision. Draws no random numbers (a
    seeded run stays reproducible). Any device works, which lets the CPU tests run it through the
    CPU kernels."""
    B, Hq, Hkv, Nq, Nk, P, D = 2, 4, 2, 70, 77, 19, 64

    def values(*shape: int, phase: float) -> Tensor:
        x = torch.arange(math.prod(shape), device=device, dtype=torch.float32)
        return torch.sin(x * 0.37 + phase).reshape(shape)

    scale = D ** -0.5
    with torch.inference_mode(False), torch.enable_grad():  # the reference's gradients need autograd
        shapes = [(B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D), (1, Hkv, P, D), (1, Hkv, P, D), (B, Hq, Nq, D)]
        q, k, v, pk, pv, dout = (values(*shape, phase=0.1 * i).bfloat16() for i, shape in enumerate(shapes))
        out, lse = torch.ops.prefix_attn.fwd(q, k, v, pk, pv, None, None, None, scale, True, False)
        grads = torch.ops.prefix_attn.bwd(dout, q, k, v, pk, pv, None, None, None, out, lse, None, scale, True, False,
                                          True, True, True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a failed launch or a fault surfaces here, not at a later call
        leaves = [t.float().requires_grad_() for t in (q, k, v, pk, pv)]
        ref_out, ref_lse = reference_forward(*leaves, None, None, None, scale, True)
        ref_grads = torch.autograd.grad(ref_out, leaves, dout.float())
    checks = [("out", out, ref_out), ("lse", lse, ref_lse)]
    checks += [(f"d{n}", g, r) for n, g, r in zip(("q", "k", "v", "prefix_k", "prefix_v"), grads, ref_grads)]
    worst, worst_ratio = None, 1.0
    for name, got, want in checks:
        if got.shape != want.shape:
            return f"{name} has shape {tuple(got.shape)}, the reference {tuple(want.shape)}"
        err = (got.float() - want).abs().max().item()
        tol = 0.05 * want.abs().max().item() + 0.01
        ratio = err / tol if not math.isnan(err) else math.inf  # NaN is the worst
        if ratio > worst_ratio:
            worst, worst_ratio = f"max |{name} - reference| = {err:.3g} (tolerance {tol:.3g})", ratio
    return worst


register_backend(Backend("cpu", ("cpu",), _KERNEL_DTYPES, 10, _cpu_available,
                         _extension_unsupported, _run_extension))
register_backend(Backend("cuda", ("cuda",), _KERNEL_DTYPES, 20, _cuda_available,
                         _extension_unsupported, _run_extension))
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
register_backend(Backend("triton", ("cuda", "cpu") if _TRITON_INTERPRET else ("cuda",), _KERNEL_DTYPES, 30,
                         _triton_available, _extension_unsupported, _run_triton, auto_device_types=("cuda",)))
register_backend(Backend("reference", (), (), 0, lambda: True, lambda inputs: None, _run_reference))
