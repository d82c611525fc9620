"""The compiled ops, torch.ops.prefix_attn.fwd / bwd: their fake kernels and their autograd.

Schemas and the CPU / CUDA kernels are registered in C++ (csrc/prefix_attn_api.cpp) when
prefix_attn._C loads. Here they gain what torch.compile and autograd need:
  - fake kernels, which give output shapes and strides without running anything;
  - an autograd formula that asks bwd only for the gradients autograd needs;
  - a bwd autograd formula that refuses double backward.

Op forms (the normalised arguments of `_inputs.AttnInputs`):
  fwd(q, k, v, prefix_k?, prefix_v?, prefix_index?, key_padding_mask?, attn_mask?,
      scale, causal, deterministic, dropout_p=0, dropout_seed=0, dropout_offset=0) -> (out, lse)
  bwd(dout, q, k, v, prefix_k?, prefix_v?, prefix_index?, key_padding_mask?, attn_mask?,
      out, lse, dlse?, scale, causal, deterministic, need_dq, need_dkv, need_dprefix,
      dropout_p=0, dropout_seed=0, dropout_offset=0)
      -> (dq, dk, dv, dprefix_k, dprefix_v)   gradients not asked for are empty tensors
The dropout arguments are the call's stream (_dropout.py); the backward gets the forward's, so
it regenerates the same mask.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import sys
import threading
from typing import Optional

import torch

from . import _build
from ._version import __version__

_log = logging.getLogger("prefix_attn")


class FirstUseBuildError(ImportError):
    """The extension is not installed, and compiling it here at first use did not work; the
    message says why in one line, and what to do."""


# The extension is either installed (compiled ahead, by setup.py) or compiled for this machine at
# the first call that needs it (`load()`): a pure-Python install, as pip's build isolation makes.
# BUILD says which ("installed" / "first use"), EXTENSION_ERROR why neither worked.
_C = None
HAS_EXTENSION = False
EXTENSION_ERROR: Optional[BaseException] = None
BUILD: Optional[str] = None
_NOT_INSTALLED = False  # no prefix_attn/_C*.so: load() may compile one (never over a broken one)
_first_use_tried = False
_load_lock = threading.Lock()

if importlib.util.find_spec(f"{__package__}._C") is None:  # not installed: load() compiles it at first use
    _NOT_INSTALLED = True
else:
    try:
        from . import _C  # noqa: F401  (registers the ops)
        HAS_EXTENSION, BUILD = True, "installed"
    except ImportError as exc:  # installed and broken (another torch, a missing CUDA library): the real error
        _C, EXTENSION_ERROR = None, exc


def _source_dir() -> Optional[str]:
    """csrc/ as shipped in the package (wheels and sdist installs), else the source checkout's."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(candidate, "prefix_attn_api.cpp")):
            return candidate
    return None


def first_use_level() -> str:
    """The one ISA level a build at first use compiles: PREFIX_ATTN_CPU_ISA, else the best this CPU
    runs, as ATen's own dispatch sees it (cpuid: right under an emulator too, unlike /proc/cpuinfo)."""
    forced = os.environ.get("PREFIX_ATTN_CPU_ISA", "").strip()
    if forced:
        return forced
    if not _build.is_x86_64():
        return "baseline"
    capability = torch.backends.cpu.get_cpu_capability()
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "baseline")


def cache_dir() -> str:
    """Where builds at first use go: PREFIX_ATTN_CACHE_DIR, else $XDG_CACHE_HOME/prefix_attn."""
    root = os.environ.get("PREFIX_ATTN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "prefix_attn")
    return root


def _build_first_use():
    """Compiles the extension's CPU part for this machine's level (one level: ~40 s on 2 cores),
    into a cache directory per prefix_attn version, torch version, Python and level; a second
    process finds it there. Raises FirstUseBuildError, one line, on any failure."""
    sources = _source_dir()
    if sources is None:
        raise FirstUseBuildError("its C++ sources are not in this install (no prefix_attn/_csrc): reinstall "
                                 "prefix_attn from its sdist or source tree")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0] if cxx.split() else cxx) is None:
        raise FirstUseBuildError(
            f"it is compiled at first use, and there is no C++ compiler ({cxx!r}: the CXX variable, else c++, "
            f"is not on PATH); install one (Debian/Ubuntu: apt install g++; conda: conda install -c conda-forge "
            f"gxx) and start a new process, or install a prefix_attn wheel built with its extension")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise FirstUseBuildError("it is compiled at first use, which needs ninja: pip install ninja")
    level = first_use_level()
    flags = (_build.X86_LEVELS if _build.is_x86_64() else {"baseline": []}).get(level)
    if flags is None:
        raise FirstUseBuildError(f"PREFIX_ATTN_CPU_ISA={level!r} is not a level; levels: "
                                 f"{', '.join(_build.X86_LEVELS)}")
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{__version__}-torch{torch.__version__}-py{sys.version_info.major}"
                                          f"{sys.version_info.minor}-{level}")
    build_dir = os.path.join(cache_dir(), tag)
    os.makedirs(build_dir, exist_ok=True)
    _log.warning("prefix_attn: compiling the CPU kernels for this machine (%s level, once per torch version; "
                 "about a minute) into %s", level, build_dir)
    try:
        return cpp_extension.load(
            name="prefix_attn_C",
            sources=[os.path.join(sources, s) for s in _build.COMMON_SOURCES + [_build.level_source(level)]],
            extra_cflags=_build.CXX_FLAGS + flags + [f"-D{_build.level_define(level)}"],
            extra_ldflags=_build.LINK_FLAGS, build_directory=build_dir, verbose=False)
    except Exception as exc:  # noqa: BLE001  (compiler errors, a broken toolchain, a locked cache...)
        log = os.path.join(build_dir, "build-error.log")
        with open(log, "w") as f:
            f.write(f"{type(exc).__name__}: {exc}\n")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # the compiler's first "error:" line says more than torch's "Error building extension"
        first = next((line for line in lines if re.search(r"\berror:", line)), lines[0] if lines else "")
        raise FirstUseBuildError(f"compiling it at first use failed: {first[:300]} (the whole log: {log})") from exc


def load() -> bool:
    """Makes the compiled ops available: the installed extension, else one compiled here now (the
    first call of a process that needs it; later processes take it from the cache). False, with
    EXTENSION_ERROR saying why, where neither works. Tried once per process."""
    if HAS_EXTENSION:
        return True
    with _load_lock:  # a second thread waits for the first one's build rather than report failure
        return _load_locked()


def _load_locked() -> bool:
    global _C, HAS_EXTENSION, EXTENSION_ERROR, BUILD, _first_use_tried
    if HAS_EXTENSION:
        return True
    if not _NOT_INSTALLED or _first_use_tried:
        return False
    _first_use_tried = True
    try:
        module = _build_first_use()
    except FirstUseBuildError as exc:
        EXTENSION_ERROR = exc
        return False
    except ImportError as exc:  # compiled, and the result does not load
        EXTENSION_ERROR = FirstUseBuildError(f"the extension compiled at first use did not load: {exc}")
        return False
    sys.modules[f"{__package__}._C"] = module
    _C, HAS_EXTENSION, BUILD, EXTENSION_ERROR = module, True, "first use", None
    register_attention_op(torch.ops.prefix_attn.fwd.default, torch.ops.prefix_attn.bwd.default)
    return True


def why_unavailable() -> str:
    """One line: why the compiled ops are missing, and what to do."""
    if not _NOT_INSTALLED:
        error = " ".join(str(EXTENSION_ERROR).split())
        return (f"the installed extension prefix_attn._C did not load: {error} (built against another torch, "
                f"or with CUDA kernels next to a CPU-only torch? Reinstall prefix_attn against this torch: "
                f"README, Install)")
    return f"the compiled extension prefix_attn._C is not installed, and {EXTENSION_ERROR or 'not compiled yet'}"


def _fwd_fake(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale, causal,
              deterministic, dropout_p=0.0, dropout_seed=0, dropout_offset=0):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse, dlse,
              scale, causal, deterministic, need_dq, need_dkv, need_dprefix, dropout_p=0.0, dropout_seed=0,
              dropout_offset=0):
    def like(t, needed):
        return torch.empty_like(t) if needed else q.new_empty(0)

    need_dprefix = need_dprefix and prefix_k is not None
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv),
            like(prefix_k, need_dprefix), like(prefix_v, need_dprefix))


def register_attention_op(fwd, bwd) -> None:
    """Gives a (fwd, bwd) op pair with the schemas above its fake kernels and autograd. Used for
    the compiled ops here and for the Triton ops in triton_backend/ops.py."""

    def setup_context(ctx, inputs, output):
        (q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, scale, causal, deterministic,
         *dropout) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse)
        ctx.scale, ctx.causal, ctx.deterministic = scale, causal, deterministic
        ctx.dropout = tuple(dropout)  # (dropout_p, seed, offset), or () when the defaults were used
        ctx.n_inputs = len(inputs)

    def backward(ctx, dout, dlse):
        q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask, out, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_dq, need_dkv, need_dprefix = needs[0], needs[1] or needs[2], needs[3] or needs[4]
        if not (need_dq or need_dkv or need_dprefix):
            return (None,) * ctx.n_inputs
        dq, dk, dv, dpk, dpv = bwd(dout, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, attn_mask,
                                   out, lse, dlse, ctx.scale, ctx.causal, ctx.deterministic, need_dq, need_dkv,
                                   need_dprefix, *ctx.dropout)
        return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
                dpk if needs[3] else None, dpv if needs[4] else None) + (None,) * (ctx.n_inputs - 5)

    def no_double_backward(ctx, *grads):
        raise NotImplementedError("prefix_attn: double backward (gradients of gradients) is not supported")

    torch.library.register_fake(fwd)(_fwd_fake)
    torch.library.register_fake(bwd)(_bwd_fake)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)
    torch.library.register_autograd(bwd, no_double_backward, setup_context=lambda ctx, inputs, output: None)


if HAS_EXTENSION:
    register_attention_op(torch.ops.prefix_attn.fwd.default, torch.ops.prefix_attn.bwd.default)


def set_poison_outputs(on: bool) -> None:
    """Make the compiled kernels fill their outputs with NaN before computing (a test aid)."""
    if HAS_EXTENSION:
        _C._set_poison_outputs(bool(on))
