"""Shared helpers for the prefix_attn test suite (hooks and fixtures are re-exported by conftest.py).

The suite checks every kernel backend against the plain PyTorch reference
(``backend="reference"``), and checks the reference itself against oracles written
in the tests (``test_reference.py``).

Tolerance rule (taken from FlashAttention's tests): for every output and gradient,

    err(kernel) <= 2 * err(reference in the kernel's dtype) + floor

where ``err(x)`` is the largest absolute difference to the reference run in float64 on
the same (already rounded) inputs. The bound adapts to dtype, shape and head dim, so no
per-case tolerances are needed. The floor has two parts: ``FLOOR_REL`` (sums reordered)
and, for gradients, ``recompute_rel_error``, which grows with the scores (a flash-style backward rebuilds
the probabilities from scores it recomputes; the reference keeps them). test_tolerance.py
checks that the bound still rejects small bugs.

Environment knobs:

- ``PREFIX_ATTN_TEST_BACKENDS=cpu,reference`` overrides the list of backends under test
  (``reference`` is useful to check the tests themselves: it must pass trivially).
- ``--run-slow`` also runs the tests marked ``slow``.

Tiers (all on the backends above):

- ``pytest tests`` (default): the hostile grid, minus ``slow``; on a GPU machine (three
  backends) about 1,500 tests run, each new shape a Triton JIT compile: far more than one
  10-minute GPU command.
- ``pytest -m gpu_tier tests``: what ``make gpu-check`` runs on a GPU (with
  ``PREFIX_ATTN_TEST_BACKENDS`` set to the GPU backends present): every kernel path once per
  backend at a small set of Triton specialisations (see ``GPU_TIER_CASES`` in
  test_correctness.py), in about two minutes on one GPU.
- ``pytest --run-slow tests``: everything.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Dict, List, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefix_attn

# --------------------------------------------------------------------------- options


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="also run the tests marked slow (several hundred more random correctness cases)",
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: large or long test; runs only with --run-slow")
    config.addinivalue_line(
        "markers", "gpu_tier: in the short GPU tier (`-m gpu_tier`): every kernel path, few Triton specialisations")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow; run with --run-slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)


# --------------------------------------------------------------------------- backends

#: Kernel backends, in the order they would be preferred. The reference is the oracle,
#: never a backend under test (comparing it with itself could not fail).
KERNEL_BACKENDS = ("cpu", "triton", "cuda")


def kernel_backends() -> List[str]:
    """Backends the kernel tests run on: those available here, or the env override."""
    override = os.environ.get("PREFIX_ATTN_TEST_BACKENDS")
    if override:
        return [name.strip() for name in override.split(",") if name.strip()]
    available = prefix_attn.available_backends()
    return [name for name in KERNEL_BACKENDS if name in available]


def device_for(backend: str) -> str:
    if backend == "cuda":
        return "cuda"
    if backend == "triton":
        # Triton runs on CPU tensors only under TRITON_INTERPRET=1; the backend is listed
        # as available only where it can run.
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def backend_params() -> list:
    """``pytest.param`` per kernel backend. With none available, one param that skips,
    so that a missing build shows up as a visible skip, not an empty collection."""
    names = kernel_backends()
    if not names:
        return [
            pytest.param(
                "cpu",
                marks=pytest.mark.skip(
                    reason=f"no kernel backend available (available_backends() = "
                    f"{prefix_attn.available_backends()})"
                ),
            )
        ]
    return [pytest.param(name, id=name) for name in names]


# --------------------------------------------------------------------------- dtypes

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

#: Floor of the tolerance, relative to the largest magnitude of the float64 result, or to
#: 1 when that is smaller: inputs are standard normal, so 1 is the natural magnitude of
#: every output and gradient, and a tensor that is exactly 0 by cancellation (dk when each
#: query sees a single key, so dS = P * (dP - Delta) = 0) must not demand exact zeros
#: from a kernel that, like FlashAttention, computes Delta = rowsum(dout * out) from the
#: rounded out.
#: fp32: the kernel and the reference accumulate over up to ~1300 keys in different
#: orders; 1e-5 is ~80 ulps, above any such reordering, far below any real bug (a wrong
#: mask or a missed block moves results by O(1e-2) or more).
#: fp16/bf16: the kernel rounds its fp32 result to the output dtype once, which may cost
#: up to one unit roundoff u of the largest element (fp16 u = 4.9e-4, bf16 u = 3.9e-3);
#: the same-precision reference may by luck not show that much error on a small tensor,
#: so the floor is ~2u.
FLOOR_REL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}

#: Unit roundoff of the arithmetic the kernels accumulate scores in: float32 for every input
#: dtype (SPEC: softmax and accumulation in float32), float64 only for the float64 reference.
ACC_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24, torch.float64: 2.0**-53}


def recompute_rel_error(x: "Inputs") -> float:
    """The relative error a flash-style backward may add by recomputing probabilities.

    The reference's backward differentiates the softmax it computed; a kernel's backward
    rebuilds p = exp(s - lse) from scores s it computes again, in another order (dK/dV work
    on transposed tiles), with another BLAS kernel on another machine. A score
    s = scale * sum_d q_d k_d computed in precision u has an error of about
    sqrt(D) * u * a, with a = scale * sum_d |q_d| |k_d| (the probabilistic dot-product bound
    of Higham and Mary, 2019). The forward's and the backward's errors differ, so each
    rebuilt p carries a relative error of that size, and so does every gradient made from p:
        rel_err <= sqrt(D) * u * max_ij a_ij.
    It grows with the scores: with amp = 30 (|s| up to ~250) and D = 64 in float32 it is
    1.2e-4, above FLOOR_REL; with unit-variance inputs it is ~4e-6, below it. Measured
    errors stay under a third of it (OPENBLAS_CORETYPE Haswell / SkylakeX, 8 seeds, see
    tests/test_tolerance.py). Additive float masks are left out: a finite bias of a few
    units adds ~u to a score, far below FLOOR_REL, and finfo.min entries are hidden keys.
    """
    c = x.case
    t = {name: v.detach().double() for name, v in x.tensors().items()}
    q = t["q"].abs()  # [B, Hq, Nq, D]
    group = c.Hq // c.Hkv
    keys = [t["k"].abs()]  # [B, Hkv, Nk, D]
    if c.prefix != "none":
        pk = t["prefix_k"].abs()
        if c.prefix == "shared":
            pk = pk.expand(c.B, *pk.shape)
        elif c.prefix == "bank":
            pk = pk[x.prefix_index.long().cpu()]
        keys.append(pk)
    a = 0.0
    for kk in keys:
        if kk.numel() == 0 or q.numel() == 0:
            continue
        kk = kk.cpu().repeat_interleave(group, dim=1)  # [B, Hq, n, D]
        a = max(a, (q.cpu() @ kk.transpose(-1, -2)).max().item())
    scale = c.scale if c.scale is not None else 1.0 / math.sqrt(c.D)
    return math.sqrt(c.D) * ACC_UNIT_ROUNDOFF[c.torch_dtype] * abs(scale) * a


# --------------------------------------------------------------------------- NaN poisoning

_NAN_FILLED = ("empty", "empty_like", "empty_strided")


@pytest.fixture
def nan_poison(monkeypatch):
    """Make every uninitialised float buffer NaN, so an output element a kernel forgets
    to write shows up as NaN instead of as a plausible leftover value.

    - C++ kernels: ``prefix_attn._debug.poison_outputs(True)`` fills what they allocate.
    - Python: ``torch.empty`` / ``empty_like`` / ``empty_strided`` / ``Tensor.new_empty``
      return NaN-filled float tensors.
    """
    from prefix_attn import _debug

    def nan_filled(factory):
        def wrapper(*args, **kwargs):
            out = factory(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                with torch.no_grad():
                    out.fill_(float("nan"))
            return out

        wrapper.__wrapped__ = factory
        return wrapper

    for name in _NAN_FILLED:
        monkeypatch.setattr(torch, name, nan_filled(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_filled(torch.Tensor.new_empty))
    _debug.poison_outputs(True)
    try:
        yield
    finally:
        _debug.poison_outputs(False)


# --------------------------------------------------------------------------- error metric


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| in float64. Equal infinities count as 0; a NaN in
    either tensor counts as infinite error (NaN must never be an answer)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    diff = (a - e).abs()
    diff = torch.where(a == e, torch.zeros_like(diff), diff)  # -inf == -inf
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    return diff.max().item()


def finite_scale(t: torch.Tensor) -> float:
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return t.abs().max().item() if t.numel() else 0.0


def assert_within_ref_tol(
    name: str,
    ours: torch.Tensor,
    ref_lo: torch.Tensor,
    ref_hi: torch.Tensor,
    dtype: torch.dtype,
    min_scale: float = 1.0,
    zero_scale: float = 1.0,
    recompute_rel: float = 0.0,
    recompute_scale: Optional[float] = None,
):
    """The FlashAttention-style bound: err(ours) <= 2 * err(ref_lo) + floor, with
    floor = FLOOR_REL[dtype] * scale + recompute_rel * recompute_scale (see
    ``recompute_rel_error``). recompute_scale defaults to the result's scale; lse passes 1,
    as an error in the scores moves lse by the same absolute amount, whatever lse's size.

    ``zero_scale`` replaces the scale when the float64 result is exactly zero everywhere:
    a gradient that cancels exactly (every query sees one key: softmax is 1, dS = 0) is
    the sum of many roundoff terms whose size follows the case's other gradients, not 1.
    """
    assert ours.shape == ref_hi.shape, f"{name}: shape {tuple(ours.shape)}, expected {tuple(ref_hi.shape)}"
    assert not torch.isnan(ours).any(), (
        f"{name}: {int(torch.isnan(ours).sum())} NaN of {ours.numel()} "
        f"(unwritten output or NaN math)"
    )
    err_ours = max_abs_err(ours, ref_hi)
    err_lo = max_abs_err(ref_lo, ref_hi)
    assert math.isfinite(err_lo), f"{name}: the same-precision reference itself is non-finite"
    scale = finite_scale(ref_hi)
    scale = max(scale, min_scale) if scale > 0 else max(zero_scale, min_scale)
    floor = FLOOR_REL[dtype] * scale + recompute_rel * (scale if recompute_scale is None else recompute_scale)
    bound = 2 * err_lo + floor
    assert err_ours <= bound, (
        f"{name}: err(ours)={err_ours:.3e} > 2*err(ref {dtype})={2 * err_lo:.3e} + floor={floor:.3e} "
        f"(scale {scale:.3e})"
    )


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem. Defaults are small; every field shows in the test id."""

    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    Nq: int = 17
    Nk: int = 33
    P: int = 7
    D: int = 64
    causal: bool = False
    #: none | shared | per_row | bank
    prefix: str = "shared"
    #: number of bank entries (bank mode); 0 = B + 3, so some entries are never used
    T: int = 0
    #: none | left | right | int_left | int_right | allpad (last row has no keys at all)
    kpm: str = "none"
    #: none, or "<kind>-<shape>": kind bool (True = attend), float (additive, with -inf)
    #: or fmin (additive, finfo.min where masked, as Hugging Face builds masks); shape
    #: one of those in mask_shape()
    mask: str = "none"
    #: contig | qT (q is a [B,N,H,D] tensor transposed) | kvslice (k, v, prefix are
    #: slices of bigger tensors) | qT+kvslice | qstride2 (q's last dim has stride 2)
    layout: str = "contig"
    #: which inputs require grad: all | none | q | kv | k | v | prefix | prefix_k | qkv
    grads: str = "all"
    dtype: str = "fp32"
    scale: Optional[float] = None
    #: q is drawn with this standard deviation: large values give large scores, which a
    #: softmax without max-subtraction (or with a stale running max) gets wrong
    amp: float = 1.0

    @property
    def n_bank(self) -> int:
        return self.T or self.B + 3

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def id(self) -> str:
        parts = [
            f"B{self.B}",
            f"Hq{self.Hq}",
            f"Hkv{self.Hkv}",
            f"Nq{self.Nq}",
            f"Nk{self.Nk}",
            f"P{self.P}" if self.prefix != "none" else "noprefix",
            f"D{self.D}",
        ]
        if self.causal:
            parts.append("causal")
        if self.prefix != "none":
            parts.append(self.prefix if self.prefix != "bank" else f"bank{self.n_bank}")
        if self.kpm != "none":
            parts.append(f"kpm_{self.kpm}")
        if self.mask != "none":
            parts.append(f"mask_{self.mask}")
        if self.layout != "contig":
            parts.append(self.layout)
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.amp != 1.0:
            parts.append(f"amp{self.amp:g}")
        parts.append(f"grad_{self.grads}")
        parts.append(self.dtype)
        return "-".join(parts)

    def requires_grad(self, name: str) -> bool:
        pattern = {
            "all": {"q", "k", "v", "prefix_k", "prefix_v"},
            "none": set(),
            "q": {"q"},
            "kv": {"k", "v"},
            "k": {"k"},
            "v": {"v"},
            "prefix": {"prefix_k", "prefix_v"},
            "prefix_k": {"prefix_k"},
            "qkv": {"q", "k", "v"},  # a frozen prefix in a trained model
        }[self.grads]
        if name.startswith("prefix") and self.prefix == "none":
            return False
        return name in pattern


def mask_shape(tag: str, c: Case) -> tuple:
    return {
        "NqNk": (c.Nq, c.Nk),
        "Nk": (c.Nk,),
        "Nq1": (c.Nq, 1),
        "B1NqNk": (c.B, 1, c.Nq, c.Nk),
        "BHNqNk": (c.B, c.Hq, c.Nq, c.Nk),
        "1HNqNk": (1, c.Hq, c.Nq, c.Nk),
        "HNqNk": (c.Hq, c.Nq, c.Nk),
        "B11Nk": (c.B, 1, 1, c.Nk),
    }[tag]


def padding_lengths(c: Case) -> List[int]:
    """Number of real (unpadded) keys per row: row 0 is full, later rows shorter."""
    lengths = [max(1, c.Nk - (b * c.Nk) // (c.B + 1)) for b in range(c.B)]
    if c.B == 1 and c.Nk > 1:
        lengths = [c.Nk - c.Nk // 3]
    if c.kpm == "allpad":
        lengths[-1] = 0
    return lengths


def bank_index(c: Case) -> torch.Tensor:
    """With T >= 4 (the default), even rows share entry T-2 and odd rows use entry 0:
    entries repeat, and 1 and T-1 are never used. Small banks count down from T-1."""
    T = c.n_bank
    if T < 4:
        return torch.tensor([(T - 1 - b) % T for b in range(c.B)], dtype=torch.int64)
    return torch.tensor([T - 2 if b % 2 == 0 else 0 for b in range(c.B)], dtype=torch.int64)


@dataclasses.dataclass
class Inputs:
    """Leaf tensors and the views the attention call sees.

    ``leaves`` hold the storage (and receive ``.grad``); ``view[name](leaf)`` turns a
    leaf into the (possibly strided) tensor passed to the function. Both the kernel run
    and the float64 oracle apply the same views to leaves holding the same values.
    """

    case: Case
    leaves: Dict[str, torch.Tensor]
    view: Dict[str, Callable[[torch.Tensor], torch.Tensor]]
    key_padding_mask: Optional[torch.Tensor]
    attn_mask: Optional[torch.Tensor]
    prefix_index: Optional[torch.Tensor]
    dout_leaf: torch.Tensor
    dout_view: Callable[[torch.Tensor], torch.Tensor]

    def cast(self, dtype: torch.dtype) -> "Inputs":
        """Same values in another dtype; fresh leaves with requires_grad per the case."""
        leaves = {}
        for name, t in self.leaves.items():
            leaf = t.detach().to(dtype)
            leaf.requires_grad_(self.case.requires_grad(name))
            leaves[name] = leaf
        attn_mask = self.attn_mask
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
        return dataclasses.replace(
            self, leaves=leaves, attn_mask=attn_mask, dout_leaf=self.dout_leaf.to(dtype)
        )

    def tensors(self) -> Dict[str, Optional[torch.Tensor]]:
        return {name: self.view[name](leaf) for name, leaf in self.leaves.items()}

    def dout(self) -> torch.Tensor:
        return self.dout_view(self.dout_leaf)


def make_inputs(c: Case, device: str = "cpu", seed: int = 0) -> Inputs:
    """Random inputs for a case, rounded to the case dtype (values exactly representable
    in it, so the float64 oracle sees the same numbers as the kernel)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = c.torch_dtype

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(device)

    kvslice = "kvslice" in c.layout
    leaves, view = {}, {}
    # q
    if "qT" in c.layout:
        leaves["q"] = randn(c.B, c.Nq, c.Hq, c.D, std=c.amp)
        view["q"] = lambda t: t.transpose(1, 2)
    elif c.layout == "qstride2":
        leaves["q"] = randn(c.B, c.Hq, c.Nq, 2 * c.D, std=c.amp)
        view["q"] = lambda t: t[..., ::2]
    else:
        leaves["q"] = randn(c.B, c.Hq, c.Nq, c.D, std=c.amp)
        view["q"] = lambda t: t
    # k, v: slices of [B, Nk+3, Hkv, D+8] (offset storage, every stride odd-looking)
    for name in ("k", "v"):
        if kvslice:
            leaves[name] = randn(c.B, c.Nk + 3, c.Hkv, c.D + 8)
            view[name] = lambda t, Nk=c.Nk, D=c.D: t[:, 2 : Nk + 2, :, 3 : D + 3].transpose(1, 2)
        else:
            leaves[name] = randn(c.B, c.Hkv, c.Nk, c.D)
            view[name] = lambda t: t
    # prefix
    if c.prefix != "none":
        lead = {"shared": (), "per_row": (c.B,), "bank": (c.n_bank,)}[c.prefix]
        for name in ("prefix_k", "prefix_v"):
            if kvslice:
                leaves[name] = randn(*lead, c.Hkv, c.P + 1, c.D + 4)
                view[name] = lambda t, D=c.D: t[..., 1:, 2 : D + 2]
            else:
                leaves[name] = randn(*lead, c.Hkv, c.P, c.D)
                view[name] = lambda t: t
    # masks
    key_padding_mask = None
    if c.kpm != "none":
        lengths = padding_lengths(c)
        pos = torch.arange(c.Nk)
        rows = []
        for b, n in enumerate(lengths):
            left = c.kpm in ("left", "int_left") or (c.kpm == "allpad" and b % 2 == 1)
            rows.append(pos >= c.Nk - n if left else pos < n)
        key_padding_mask = torch.stack(rows)
        if c.kpm == "int_left":
            key_padding_mask = key_padding_mask.to(torch.int64)
        elif c.kpm == "int_right":
            key_padding_mask = key_padding_mask.to(torch.int32)
        if kvslice:  # column-major: strides (1, B)
            key_padding_mask = key_padding_mask.t().contiguous().t()
        key_padding_mask = key_padding_mask.to(device)
    attn_mask = None
    if c.mask != "none":
        kind, tag = c.mask.split("-")
        shape = mask_shape(tag, c)
        u = torch.rand(*shape, generator=gen)
        if kind == "bool":
            attn_mask = u < 0.7
        elif kind == "fmin":
            attn_mask = torch.zeros(shape).masked_fill(u >= 0.7, torch.finfo(dtype).min).to(dtype)
        else:
            attn_mask = (torch.rand(*shape, generator=gen) * 6 - 3).to(dtype)
            attn_mask = attn_mask.masked_fill(u > 0.8, -math.inf)
        if kvslice and attn_mask.dim() >= 2:  # a transposed view
            attn_mask = attn_mask.transpose(-1, -2).contiguous().transpose(-1, -2)
        attn_mask = attn_mask.to(device)
    prefix_index = bank_index(c).to(device) if c.prefix == "bank" else None
    if prefix_index is not None and kvslice:  # int32, and a strided view
        prefix_index = torch.stack([prefix_index, prefix_index], dim=1).to(torch.int32)[:, 0]
    # upstream gradient; transposed like q when q is, to test a strided dout
    if "qT" in c.layout:
        dout_leaf = randn(c.B, c.Nq, c.Hq, c.D)
        dout_view = lambda t: t.transpose(1, 2)
    else:
        dout_leaf = randn(c.B, c.Hq, c.Nq, c.D)
        dout_view = lambda t: t
    inputs = Inputs(c, leaves, view, key_padding_mask, attn_mask, prefix_index, dout_leaf, dout_view)
    return inputs.cast(dtype)


@dataclasses.dataclass
class Result:
    out: torch.Tensor
    lse: torch.Tensor
    #: gradient of each input, in the shape the function saw (the view), or None when
    #: the input did not require grad
    grads: Dict[str, Optional[torch.Tensor]]
    #: ``.grad`` of the leaves as autograd left it
    leaf_grads: Dict[str, Optional[torch.Tensor]]
    #: for the float64 reference only: recompute_rel_error of the inputs (0 elsewhere)
    recompute_rel: float = 0.0


def run_attention(x: Inputs, backend: str, deterministic: bool = False, lse_grad: bool = False, **extra) -> Result:
    """prefix_attention forward (with lse) and, if anything requires grad, backward of
    <out, dout> (plus <lse, dlse> with lse_grad=True, dlse random but fixed)."""
    c = x.case
    t = x.tensors()
    out, lse = prefix_attn.prefix_attention(
        t["q"],
        t["k"],
        t["v"],
        t.get("prefix_k"),
        t.get("prefix_v"),
        causal=c.causal,
        softmax_scale=c.scale,
        key_padding_mask=x.key_padding_mask,
        attn_mask=x.attn_mask,
        prefix_index=x.prefix_index,
        return_lse=True,
        deterministic=deterministic,
        backend=backend,
        **extra,
    )
    if out.requires_grad:
        if lse_grad:
            gen = torch.Generator().manual_seed(1234)
            dlse = torch.randn(lse.shape, generator=gen).to(device=lse.device, dtype=lse.dtype)
            torch.autograd.backward([out, lse], [x.dout(), dlse])
        else:
            out.backward(x.dout())
    leaf_grads = {name: leaf.grad for name, leaf in x.leaves.items()}
    grads = {
        name: (x.view[name](g) if g is not None else None) for name, g in leaf_grads.items()
    }
    return Result(out.detach(), lse.detach(), grads, leaf_grads)


def reference_pair(x: Inputs):
    """(same-precision reference, float64 reference) on the values of ``x``."""
    lo = run_attention(x.cast(x.case.torch_dtype), "reference")
    hi = run_attention(x.cast(torch.float64), "reference")
    hi.recompute_rel = recompute_rel_error(x)
    return lo, hi


def check_against_reference(ours: Result, lo: Result, hi: Result, c: Case, what: str = ""):
    dtype = c.torch_dtype
    assert ours.out.dtype == dtype, f"out dtype {ours.out.dtype}, expected {dtype}"
    lse_dtypes = (torch.float32, torch.float64) if dtype == torch.float64 else (torch.float32,)
    assert ours.lse.dtype in lse_dtypes, f"lse dtype {ours.lse.dtype}, expected float32"
    assert ours.lse.shape == (c.B, c.Hq, c.Nq), f"lse shape {tuple(ours.lse.shape)}"
    # The forward computes each score once, as the reference does (2 * err_lo covers its
    # rounding); only gradients come from recomputed scores.
    assert_within_ref_tol(f"{what}out", ours.out, lo.out, hi.out, dtype)
    assert_within_ref_tol(f"{what}lse", ours.lse, lo.lse, hi.lse, dtype)
    tol = dict(recompute_rel=hi.recompute_rel)
    grad_scale = max([finite_scale(g) for g in hi.grads.values() if g is not None] + [1.0])
    for name, g in ours.grads.items():
        want = c.requires_grad(name)
        assert (ours.leaf_grads[name] is not None) == want, (
            f"{what}{name}.grad is {'None' if ours.leaf_grads[name] is None else 'set'}, "
            f"but requires_grad={want}"
        )
        if want:
            assert_within_ref_tol(f"{what}d{name}", g, lo.grads[name], hi.grads[name], dtype, zero_scale=grad_scale,
                                  **tol)


# --------------------------------------------------------------------------- op logging


class OpLog(TorchDispatchMode):
    """Records every op that reaches the dispatcher from Python (including the
    compiled custom ops and the autograd backward), with arguments bound by name."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        bound = {}
        try:
            for arg, value in zip(func._schema.arguments, args):
                bound[arg.name] = value
        except Exception:
            pass
        bound.update(kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        shapes = [
            (tuple(o.shape), tuple(o.stride())) for o in outs if isinstance(o, torch.Tensor)
        ]
        self.calls.append((str(func), bound, shapes))
        return out

    def named(self, op_name: str):
        return [bound for name, bound, _ in self.calls if name.startswith(op_name)]


def assert_no_cuda_sync(step) -> None:
    """Runs step() once to compile, tune and cache (Triton kernels, autotuning, device
    properties), then again under torch.cuda.set_sync_debug_mode("error"): any host
    synchronisation in the second run raises."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values: item(), bool(t), int(t), float(t), torch.equal, which
    on CUDA each wait for the stream (a synchronisation). Every one reaches the dispatcher as
    aten._local_scalar_dense, or as aten.item / is_nonzero / equal when called inside a Python
    op's implementation; `reads` names the ops seen. A TorchDispatchMode sees the ops called from
    Python, not those a C++ op calls inside itself. `asserts` counts aten._assert_async calls:
    device-side checks, which read nothing back."""

    READS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal")

    def __init__(self):
        super().__init__()
        self.reads = []
        self.asserts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in self.READS:
            self.reads.append(name)
        elif name == "aten._assert_async":
            self.asserts += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------- raw ops


def op_kwargs(op, **given):
    """Keyword arguments for a raw op (torch.ops.prefix_attn.*), by schema name, so the
    tests do not depend on argument order: optional tensors default to None, scale to
    0.25, need_* flags to True, other flags to False, and arguments with a schema default
    (dropout's) to that default."""
    kwargs = {}
    for arg in op._schema.arguments:
        if arg.name in given:
            kwargs[arg.name] = given[arg.name]
        elif str(arg.type).startswith("Optional"):
            kwargs[arg.name] = None
        elif arg.name == "scale":
            kwargs[arg.name] = 0.25
        elif str(arg.type) == "bool":
            kwargs[arg.name] = arg.name.startswith("need_")
        elif arg.has_default_value():
            kwargs[arg.name] = arg.default_value
        else:
            raise KeyError(f"no value for {arg.name} ({arg.type})")
    unknown = set(given) - {arg.name for arg in op._schema.arguments}
    assert not unknown, f"{op} has no argument(s) {sorted(unknown)}"
    return kwargs


def op_args(op, **given):
    """The same, as a positional tuple in schema order."""
    return tuple(op_kwargs(op, **given).values())


# --------------------------------------------------------------------------- dropout


def run_with_dropout(x: Inputs, backend: str, dropout_p: float, seed: int, deterministic: bool = False,
                     lse_grad: bool = False):
    """run_attention with attention dropout after torch.manual_seed(seed): (Result, the
    _dropout.DropoutCall the call recorded). The same seed gives every backend the same stream."""
    from prefix_attn import _dropout

    torch.manual_seed(seed)
    with _dropout.record_masks() as calls:
        result = run_attention(x, backend, deterministic, lse_grad, dropout_p=dropout_p)
    assert len(calls) == 1, f"{len(calls)} dropout calls recorded, expected 1"
    return result, calls[0]


def check_dropout_against_reference(c: Case, backend: str, dropout_p: float, device: str, deterministic: bool = False,
                                    lse_grad: bool = False, seed: int = 7) -> None:
    """out, lse and every gradient of `backend` with dropout against the references run on the
    same stream: the float64 oracle and the same-precision reference apply the mask that
    prefix_attn/_dropout.py computes, the kernels compute theirs, so any difference in the
    mask, or a backward that drops differently from its forward, moves results by O(1)."""
    x = make_inputs(c, device=device)
    ours, call = run_with_dropout(x, backend, dropout_p, seed, deterministic, lse_grad)
    lo, _ = run_with_dropout(x.cast(c.torch_dtype), "reference", dropout_p, seed, lse_grad=lse_grad)
    hi, hi_call = run_with_dropout(x.cast(torch.float64), "reference", dropout_p, seed, lse_grad=lse_grad)
    assert (call.seed, call.offset) == (hi_call.seed, hi_call.offset), "the same seed gave different streams"
    hi.recompute_rel = recompute_rel_error(x)
    kept = call.mask().float().mean().item()
    assert 0.0 < kept < 1.0, f"the mask keeps {kept:.3f} of the probabilities: the test would prove nothing"
    check_against_reference(ours, lo, hi, c, what=f"dropout {dropout_p} ({backend}): ")


def kernel_keep_mask(backend: str, device: str, B: int, Hq: int, Hkv: int, Nq: int, P: int, Nk: int,
                     dropout_p: float, seed: int):
    """The keep mask a backend's forward applies, read from its output: with q = 0 every visible
    probability is 1 / L (L = P + Nk), and with one-hot values (prefix key p has value e_p,
    sequence key n has e_(P+n)) out[..., j] = keep_j / ((1 - p) L). Returns (bool mask
    [B, Hq, Nq, L], the recorded DropoutCall)."""
    from prefix_attn import _dropout

    L = P + Nk
    eye = torch.eye(L, device=device)
    q = torch.zeros(B, Hq, Nq, L, device=device)
    k = torch.randn(B, Hkv, Nk, L, device=device)  # irrelevant: q = 0 makes every score 0
    v = eye[P:].expand(B, Hkv, Nk, L)
    pk = torch.randn(Hkv, P, L, device=device)
    pv = eye[:P].expand(Hkv, P, L)
    torch.manual_seed(seed)
    with _dropout.record_masks() as calls:
        out = prefix_attn.prefix_attention(q, k, v, pk, pv, dropout_p=dropout_p, backend=backend)
    units = out.double() * (1.0 - dropout_p) * L  # 1 where kept, 0 where dropped
    assert torch.all((units - units.round()).abs() < 1e-3), "output is not keep / ((1 - p) L)"
    return units.round() == 1, calls[0]
