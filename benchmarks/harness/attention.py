"""The attention kernels' benchmark: shapes, passes, FLOP and byte counts, the incumbents, and
`measure`, which times one (shape, pass) for a set of implementations on any device.

bench_attention.py (a CPU or GPU sweep, ours against one incumbent), gpu_suite.py (the GPU suite,
ours against every incumbent, to a deadline), demo.py and dropout_cost.py are thin scripts over it,
so a figure means the same thing in each.

benchmarks/README.md ("What is measured") explains the passes, the FLOP and byte conventions
and the incumbents; here they are code:
    PASSES / TRAINABLE    fwd; train_step (every input requires grad: the prefix-tuning step of
                          every layer above the first); prefix_only_bwd (the backward alone, only
                          the prefix requires grad: the first layer). Peak memory is always that
                          of the whole step.
    flops / bytes_floor   visible (query, key) pairs only (a masked pair counts nothing); the
                          least memory traffic, each tensor once (FLOPS_CONVENTION, BYTES_CONVENTION)
    INCUMBENTS            what ours is compared with; masks, block masks, compiled wrappers and the
                          decoding cache are built once per shape, outside the timing
A compiled incumbent that does not run compiled is not measured as that incumbent: fullgraph=True
and `configure_dynamo` make a graph break or a hit recompile limit raise, and the compiled
function counts the calls that ran its Python body eagerly (`eager_calls`); such a row is flagged
`fell_back` and never counts as the best incumbent (`add_speedups`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import types
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5: the flex incumbents fail at build, with this reason
    create_block_mask = flex_attention = None

# --- passes --------------------------------------------------------------------------------------

PASSES = ("fwd", "train_step", "prefix_only_bwd")

# which inputs require grad in each pass
TRAINABLE = {
    "fwd": (),
    "train_step": ("q", "k", "v", "prefix_k", "prefix_v"),
    "prefix_only_bwd": ("prefix_k", "prefix_v"),
}

PASS_LABELS = {
    "fwd": "forward",
    "train_step": "training step: forward + backward, every gradient (prefix tuning above the first layer)",
    "prefix_only_bwd": "prefix-only backward (prefix tuning, first layer)",
}

# Names earlier result files used. `prefix_bwd` (bench_attention before the rename) timed the
# forward and the prefix-only backward together: no pass measures that now, so it has no alias.
PASS_ALIASES = {"fwd_bwd": "train_step", "bwd_prefix": "prefix_only_bwd"}


def canonical_pass(name: str) -> str:
    """A pass id from a current or an older name; ValueError for anything else."""
    name = PASS_ALIASES.get(name, name)
    if name not in PASSES:
        hint = (" (`prefix_bwd` timed forward + prefix-only backward together; no pass measures "
                "that any more)" if name == "prefix_bwd" else "")
        raise ValueError(f"pass must be one of {PASSES}, got {name!r}{hint}")
    return name


DTYPES = {"float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# --- shapes --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention problem. q [B, H, N, D]; k, v [B, Hkv, Nk, D]; prefix [Hkv, P, D]."""
    B: int
    H: int          # query heads
    N: int          # query length Nq
    P: int          # prefix length
    D: int
    causal: bool
    Hkv: int = 0    # 0: = H (MHA)
    Nk: int = 0     # 0: = N
    dropout: float = 0.0  # attention dropout, ours and the incumbents alike (training with it)

    @property
    def hkv(self) -> int:
        return self.Hkv or self.H

    @property
    def nk(self) -> int:
        return self.Nk or self.N

    @property
    def grouped(self) -> bool:
        return self.hkv != self.H

    @property
    def name(self) -> str:
        s = f"B{self.B}-H{self.H}"
        if self.hkv != self.H:
            s += f"-Hkv{self.hkv}"
        s += f"-N{self.N}"
        if self.nk != self.N:
            s += f"-Nk{self.nk}"
        s += f"-P{self.P}-D{self.D}"
        if self.dropout:
            s += f"-drop{self.dropout:g}"
        return s + ("-causal" if self.causal else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The CPU benchmark's target shapes, (B, H, N, P, D), fp32, causal and non-causal.
CPU_TARGET_SHAPES = [(4, 12, 512, 64, 64), (2, 16, 1024, 128, 64), (1, 8, 2048, 32, 128)]


def cpu_target_shapes(causals: Iterable[bool] = (True, False)) -> list[Shape]:
    return [Shape(B, H, N, P, D, c) for (B, H, N, P, D) in CPU_TARGET_SHAPES for c in causals]


def cpu_default_sweep() -> list[Shape]:
    """One knob at a time around a base shape (B2 H8 N512 P64 D64, causal)."""
    base = dict(B=2, H=8, N=512, P=64, D=64, causal=True)
    out = [Shape(**base)]
    out += [Shape(**{**base, "P": p}) for p in (0, 256, 1024)]
    out += [Shape(**{**base, "N": n}) for n in (128, 2048)]
    out += [Shape(**{**base, "D": 128})]
    out += [Shape(**{**base, "Hkv": 2})]  # GQA 4:1
    out += [Shape(**{**base, "N": 16, "Nk": 1024})]  # a 16-token chunk against a 1024-token KV cache
    return out


@dataclasses.dataclass(frozen=True)
class KernelCase:
    """One row group of the GPU suite: a dtype and a shape, run for each causal setting and pass.

    kind "train": the incumbents concatenate the prefix per call. kind "decode": one new
    token per row against a KV cache that (for the incumbents) already holds the prefix.
    """
    label: str
    dtype: str
    shape: Shape                      # its causal field is replaced by each of `causals`
    kind: str = "train"
    causals: tuple[bool, ...] = (True, False)
    passes: tuple[str, ...] = PASSES

    def shapes(self) -> list[Shape]:
        return [dataclasses.replace(self.shape, causal=c) for c in self.causals]


def _grid_case(dtype: str, D: int, P: int, N: int, label: str = "grid") -> KernelCase:
    # same tokens per batch (16384) at every N; heads x D = 1024
    return KernelCase(label, dtype, Shape(B=max(1, 16384 // N), H=16 if D == 64 else 8, N=N, P=P, D=D, causal=True))


# Decoding: one token per row, 64 rows, a 4096-token cache, P = 128, Llama-3-8B's heads (32 / 8).
DECODE_CASE = KernelCase("decode", "bf16", Shape(B=64, H=32, Hkv=8, N=1, Nk=4096, P=128, D=128, causal=True),
                         kind="decode", causals=(True,), passes=("fwd",))
# Grouped heads for the training step (Llama-3-8B's 32 / 8), as many visible pairs as the
# target. N = 4096 appears nowhere else in the grid: one (dtype, N, P, D) per case.
GQA_CASE = KernelCase("gqa", "bf16", Shape(B=2, H=32, Hkv=8, N=4096, P=128, D=128, causal=True))
# Training with attention dropout 0.1 (GPT-2's, BERT's default), against cat + SDPA with the same
# dropout: what the counter-based mask regeneration costs. FlexAttention has no dropout. N = 1024
# appears nowhere else in the grid (one (dtype, N, P, D) per case).
DROPOUT_CASE = KernelCase("dropout", "bf16", Shape(B=16, H=16, N=1024, P=128, D=64, causal=True, dropout=0.1),
                          causals=(True, False), passes=("train_step",))


def gpu_cases(quick: bool = False) -> list[KernelCase]:
    """The GPU suite's cases, most important first: the targets (bf16, D = 128, N = 8192, causal
    first within each case), then decoding, grouped heads, the rest of the grid."""
    targets = [_grid_case("bf16", 128, P, 8192, "target") for P in (128, 512, 16)]
    if quick:
        return [targets[0], DECODE_CASE, GQA_CASE, _grid_case("fp16", 64, 128, 2048)]
    grid = [_grid_case(dt, D, P, N) for dt in ("bf16", "fp16") for D in (128, 64) for N in (8192, 2048, 512)
            for P in (128, 512, 16)]
    seen = {(c.dtype, c.shape.D, c.shape.P, c.shape.N) for c in targets}
    rest = [c for c in grid if (c.dtype, c.shape.D, c.shape.P, c.shape.N) not in seen]
    return targets + [DECODE_CASE, GQA_CASE, DROPOUT_CASE] + rest


# --- counts --------------------------------------------------------------------------------------


def visible_sequence_pairs(Nq: int, Nk: int, causal: bool) -> int:
    """Visible (query, sequence key) pairs in one (row, head); causal is bottom-right aligned."""
    if not causal:
        return Nq * Nk
    # query i sees keys 0 .. i + a - 1, a = Nk - Nq + 1: i + a keys, never more than Nk
    a = Nk - Nq + 1
    i0 = max(0, -a)  # queries before i0 see no sequence key
    n = Nq - i0
    if n <= 0:
        return 0
    return n * a + (i0 + Nq - 1) * n // 2


def visible_pairs(shape: Shape) -> int:
    """Visible (query, key) pairs in one (row, head): every prefix key, plus the sequence's."""
    return shape.N * shape.P + visible_sequence_pairs(shape.N, shape.nk, shape.causal)


def flops(shape: Shape, pass_id: str) -> float:
    """The work a pass needs (the module docstring gives the convention)."""
    pass_id = canonical_pass(pass_id)
    fwd = 4.0 * shape.B * shape.H * shape.D * visible_pairs(shape)
    if pass_id == "fwd":
        return fwd
    if pass_id == "train_step":
        return 3.5 * fwd
    return 8.0 * shape.B * shape.H * shape.N * shape.P * shape.D


def bytes_floor(shape: Shape, pass_id: str, elem_bytes: int) -> float:
    """The least memory traffic of a pass, in bytes (the module docstring gives the terms)."""
    pass_id = canonical_pass(pass_id)
    e = elem_bytes
    Q = shape.B * shape.H * shape.N * shape.D
    KV = shape.B * shape.hkv * shape.nk * shape.D
    PR = shape.hkv * shape.P * shape.D
    L = shape.B * shape.H * shape.N
    if pass_id == "fwd":
        return e * (2 * Q + 2 * KV + 2 * PR)
    if pass_id == "train_step":
        return e * (6 * Q + 6 * KV + 6 * PR) + 8 * L
    return e * (3 * Q + 4 * PR) + 4 * L


# one line each, for result files' metadata
FLOPS_CONVENTION = ("visible pairs only: fwd F = 4*B*Hq*D*(Nq*P + visible sequence pairs); train_step 3.5*F; "
                    "prefix_only_bwd 8*B*Hq*Nq*P*D (the backward alone, over the P prefix columns)")
BYTES_CONVENTION = ("each tensor once, e = bytes/element, Q = B*Hq*Nq*D, KV = B*Hkv*Nk*D, PR = Hkv*P*D, "
                    "L = B*Hq*Nq: fwd e*(2Q+2KV+2PR); train_step e*(6Q+6KV+6PR)+8L; prefix_only_bwd e*(3Q+4PR)+4L")

def elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- the implementations -------------------------------------------------------------------------


def ours(shape: Shape, backend: str = "auto") -> Callable:
    """prefix_attn reading the prefix in place: fn(q, k, v, prefix_k, prefix_v)."""
    import prefix_attn

    causal, dropout = shape.causal, shape.dropout

    def fn(q, k, v, pk, pv):
        return prefix_attn.prefix_attention(q, k, v, pk, pv, causal=causal, dropout_p=dropout, backend=backend)
    return fn


def prefix_bool_mask(nq: int, nk: int, p: int, device) -> torch.Tensor:
    """bool [Nq, P + Nk], True = attend.

        prefix   sequence (bottom-right causal, Nq=3, Nk=4)
        1 1 1 |  1 1 0 0
        1 1 1 |  1 1 1 0
        1 1 1 |  1 1 1 1
    """
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    seq = j <= i + (nk - nq)
    return torch.cat([torch.ones(nq, p, dtype=torch.bool, device=device), seq], dim=1)


def cat_prefix(k, v, pk, pv):
    """[prefix ; sequence] keys and values, the shared prefix expanded over the batch."""
    if pk is None or pk.shape[-2] == 0:
        return k, v
    B = k.shape[0]
    return (torch.cat([pk.expand(B, -1, -1, -1), k], dim=2),
            torch.cat([pv.expand(B, -1, -1, -1), v], dim=2))


def _repeat_kv(x, n_rep: int):
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _lower_right(shape: Shape, device):
    from torch.nn.attention.bias import causal_lower_right

    # bottom-right over P + Nk keys equals ours (prefix always visible) when Nk >= Nq
    return causal_lower_right(shape.N, shape.P + shape.nk) if shape.causal else None


def _sdpa_cat(mask_for: Callable) -> Callable[[Shape, Any], Callable]:
    def build(shape: Shape, device) -> Callable:
        mask = mask_for(shape, device)
        n_rep = shape.H // shape.hkv

        def fn(q, k, v, pk, pv):
            K, V = cat_prefix(k, v, pk, pv)
            return F.scaled_dot_product_attention(q, _repeat_kv(K, n_rep), _repeat_kv(V, n_rep), attn_mask=mask,
                                                  dropout_p=shape.dropout)
        return fn
    return build


sdpa_cat = _sdpa_cat(lambda s, device: prefix_bool_mask(s.N, s.nk, s.P, device) if s.causal else None)
sdpa_cat_lower_right = _sdpa_cat(_lower_right)


def sdpa_cat_gqa(shape: Shape, device) -> Callable:
    mask = _lower_right(shape, device)

    def fn(q, k, v, pk, pv):
        K, V = cat_prefix(k, v, pk, pv)
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True, dropout_p=shape.dropout)
    return fn


def sdpa_cache(shape: Shape, device) -> Callable:
    """Decoding: k, v are the cache with the prefix already in it (`cache_inputs`)."""
    grouped = shape.grouped

    def fn(q, k, v, pk, pv):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=grouped)
    return fn


def cache_inputs(q, k, v, pk, pv):
    """The decoding incumbents' inputs: the cache holds [prefix ; sequence], built once."""
    K, V = cat_prefix(k, v, pk, pv)
    return q, K.contiguous(), V.contiguous(), None, None


# dynamo settings every compiled incumbent runs under (`configure_dynamo`)
RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 4096


def configure_dynamo() -> dict[str, Any]:
    """Raise dynamo's recompile limits and make a hit one, or a compile error, raise instead of
    running eagerly. Handles both names of each setting (torch renamed cache_size_limit to
    recompile_limit and kept the old name as an alias; either may be missing). Returns what it set."""
    cfg = torch._dynamo.config
    wanted = [(("recompile_limit", "cache_size_limit"), RECOMPILE_LIMIT, max),
              (("accumulated_recompile_limit", "accumulated_cache_size_limit"), ACCUMULATED_RECOMPILE_LIMIT, max),
              (("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"), True, None),
              (("suppress_errors",), False, None)]
    done = {}
    for names, value, combine in wanted:
        for name in names:
            if hasattr(cfg, name):
                new = combine(getattr(cfg, name), value) if combine else value
                setattr(cfg, name, new)
                done[name] = new
                break  # the other name is an alias of this one, or absent
    return done


_EAGER = {"flex": 0}


def eager_calls() -> int:
    """How many times a compiled incumbent's body ran eagerly (not compiled) in this process."""
    return _EAGER["flex"]


def _flex_body(q, K, V, block_mask, enable_gqa):
    if not torch.compiler.is_compiling():
        # Compiled code never runs this line; only an eager fallback does (dynamo skipped the
        # frame, or torch.compiler.set_stance("force_eager"), or TORCHDYNAMO_DISABLE=1).
        _EAGER["flex"] += 1
    return flex_attention(q, K, V, block_mask=block_mask, enable_gqa=enable_gqa)


_n_compiled = [0]


def _fresh(fn: Callable) -> Callable:
    """A copy of fn with a code object of its own. Dynamo keeps compiled graphs per code object,
    so each shape gets its own cache, as in a user's process that runs one shape: the graphs of
    earlier shapes neither count toward its recompile limit nor sit in its guard checks."""
    _n_compiled[0] += 1
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{_n_compiled[0]}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def _flex(shape: Shape, device, *, concatenate: bool) -> Callable:
    if flex_attention is None:
        raise NotImplementedError(f"torch {torch.__version__} has no FlexAttention")
    configure_dynamo()
    compiled = torch.compile(_fresh(_flex_body), dynamic=False, fullgraph=True)
    P, off = shape.P, shape.nk - shape.N
    block_mask = None
    if shape.causal and shape.N > 1:  # one query sees every key
        def visible(b, h, qi, kv):
            return (kv < P) | (kv - P <= qi + off)

        block_mask = create_block_mask(visible, None, None, shape.N, P + shape.nk, device=device)
    grouped = shape.grouped

    def fn(q, k, v, pk, pv):
        K, V = cat_prefix(k, v, pk, pv) if concatenate else (k, v)
        return compiled(q, K, V, block_mask, grouped)
    return fn


def flex_cat(shape: Shape, device) -> Callable:
    return _flex(shape, device, concatenate=True)


def flex_cache(shape: Shape, device) -> Callable:
    return _flex(shape, device, concatenate=False)


def flash_attn_cat(shape: Shape, device) -> Callable:
    from flash_attn import flash_attn_func  # bottom-right causal, [B, N, H, D] layout, GQA native

    causal = shape.causal

    def fn(q, k, v, pk, pv):
        K, V = cat_prefix(k, v, pk, pv)
        out = flash_attn_func(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    return fn


def _importable(name: str) -> Callable[[], bool]:
    def check():
        try:
            __import__(name)
            return True
        except ImportError:
            return False
    return check


@dataclasses.dataclass(frozen=True)
class Incumbent:
    name: str
    what: str
    build: Callable[[Shape, Any], Callable]   # untimed set-up -> fn(q, k, v, prefix_k, prefix_v)
    kinds: tuple[str, ...] = ("train",)       # KernelCase kinds it stands for
    grouped_only: bool = False                # only where Hq != Hkv
    lower_right: bool = False                 # equals our visibility only where Nk >= Nq
    compiled: bool = False                    # its first call compiles; fallbacks are watched
    prepare_inputs: Callable | None = None    # per input set, untimed (the decoding cache)
    available: Callable[[], bool] = lambda: True
    dropout: bool = False                     # runs attention dropout (shapes with dropout need it)

    def applies(self, shape: Shape, kind: str = "train") -> bool:
        if kind not in self.kinds or (self.grouped_only and not shape.grouped):
            return False
        if shape.dropout and not self.dropout:
            return False
        if self.lower_right and shape.causal and shape.nk < shape.N:
            return False
        return True


INCUMBENTS = {i.name: i for i in [
    Incumbent("sdpa-cat", "expand + cat the prefix, repeat kv heads (HF repeat_kv), SDPA with the bool mask "
                          "(HF PEFT)", sdpa_cat, dropout=True),
    Incumbent("sdpa-cat-lower-right", "the same, causal_lower_right instead of a mask tensor (SDPA may pick "
                                      "flash)", sdpa_cat_lower_right, lower_right=True, dropout=True),
    Incumbent("sdpa-cat-gqa", "cat the prefix, SDPA with enable_gqa (no kv-head expansion) and "
                              "causal_lower_right", sdpa_cat_gqa, grouped_only=True, lower_right=True,
              dropout=True),
    Incumbent("flex-cat", "cat the prefix, FlexAttention with a block mask, compiled per shape "
                          "(dynamic=False, fullgraph=True)", flex_cat, compiled=True),
    Incumbent("flash-attn-cat", "cat the prefix, flash_attn_func", flash_attn_cat,
              available=_importable("flash_attn")),
    Incumbent("sdpa-cache", "decoding: SDPA over a KV cache that already holds the prefix (enable_gqa "
                            "where grouped)", sdpa_cache, kinds=("decode",), prepare_inputs=cache_inputs),
    Incumbent("flex-cache", "decoding: compiled FlexAttention over the same cache", flex_cache, kinds=("decode",),
              compiled=True, prepare_inputs=cache_inputs),
]}


def incumbents_for(shape: Shape, kind: str = "train", names: Iterable[str] | None = None,
                   check_available: bool = True) -> list[Incumbent]:
    """The incumbents that stand for `kind` at this shape (those named, if names is given)."""
    chosen = list(INCUMBENTS.values()) if names is None else [INCUMBENTS[n] for n in names]
    return [i for i in chosen if i.applies(shape, kind) and (not check_available or i.available())]


# --- results -------------------------------------------------------------------------------------

ROW_SHAPE_KEYS = ("dtype", "B", "H", "Hkv", "N", "Nk", "P", "D", "causal", "mode")


def add_speedups(rows: list[dict], key_fields: Iterable[str] = ROW_SHAPE_KEYS) -> dict[tuple, dict]:
    """Per (shape, pass) the fastest incumbent that ran compiled and without error; every row with
    a time gets speedup_vs_best_incumbent = best ms / its ms. Rows flagged `fell_back` or
    carrying an `error` never count as the best. Returns {key: best row}."""
    key_fields = tuple(key_fields)

    def key(r):
        return tuple(r.get(k) for k in key_fields)

    best: dict[tuple, dict] = {}
    for r in rows:
        if r["impl"].startswith("ours") or r.get("fell_back") or r.get("error") or "ms" not in r:
            continue
        b = best.get(key(r))
        if b is None or r["ms"] < b["ms"]:
            best[key(r)] = r
    for r in rows:
        b = best.get(key(r))
        if "ms" in r and b is not None:
            r["speedup_vs_best_incumbent"] = b["ms"] / r["ms"]
            r["best_incumbent"] = b["impl"]
    return best


def geomean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


# --- measuring -----------------------------------------------------------------------------------

INPUT_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
# A row's numbers move here when its compiled incumbent ran eagerly: nothing that reads "ms"
# counts it as measured.
FALLBACK_KEYS = ("ms", "tflops", "gbps")
# A compiled incumbent starts only with this much time left before the deadline (its compile
# alone can take tens of seconds).
COMPILE_MARGIN_S = 60.0


def make_inputs(shape: Shape, pass_id: str, device, dtype, n_sets: int = 1, seed: int = 0) -> list[tuple]:
    """Independent input sets (q, k, v, prefix_k, prefix_v, grad_out), random, never zeros; the
    pass's trainable inputs require grad."""
    trainable = TRAINABLE[canonical_pass(pass_id)]
    torch.manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        x = [torch.randn(shape.B, shape.H, shape.N, shape.D, device=device, dtype=dtype)]
        x += [torch.randn(shape.B, shape.hkv, shape.nk, shape.D, device=device, dtype=dtype) for _ in range(2)]
        x += [torch.randn(shape.hkv, shape.P, shape.D, device=device, dtype=dtype) for _ in range(2)]
        for t, name in zip(x, INPUT_NAMES):
            t.requires_grad_(name in trainable)
        sets.append((*x, torch.randn_like(x[0])))
    return sets


def implementation(name: str, shape: Shape, device) -> tuple[Callable, "Incumbent | None"]:
    """fn(q, k, v, prefix_k, prefix_v) for `ours` (backend auto), `ours-<backend>` or an incumbent's
    name, and the Incumbent (None for ours). Masks and compiles happen here, untimed."""
    if name == "ours" or name.startswith("ours-"):
        return ours(shape, name[5:] or "auto"), None
    if name not in INCUMBENTS:
        raise ValueError(f"implementation must be ours, ours-<backend> or one of {list(INCUMBENTS)}, got {name!r}")
    return INCUMBENTS[name].build(shape, torch.device(device)), INCUMBENTS[name]


def run_once(fn: Callable, x: tuple, pass_id: str) -> dict[str, torch.Tensor]:
    """One whole step (forward, and backward where the pass has one): {"out": ..., "dq": ...}, in
    float32, for comparisons. Gradients are dropped from the inputs."""
    if pass_id == "fwd":
        with torch.no_grad():
            return {"out": fn(*x[:5]).float()}
    out = fn(*x[:5])
    out.backward(x[5])
    got = {"out": out.detach().float()}
    for name, t in zip(INPUT_NAMES, x[:5]):
        if t is not None and t.requires_grad:
            # None: the input did not reach the output (P == 0 in cat + SDPA)
            got["d" + name] = (t.grad if t.grad is not None else torch.zeros_like(t)).float()
            t.grad = None
    return got


def make_step(fn: Callable, sets: list[tuple], pass_id: str) -> Callable[[], None]:
    """A zero-argument step of pass_id, rotating among the input sets (so that repeats do not just
    measure a warm L2). Gradients are dropped after each call, so each call allocates them afresh,
    as a training step does. prefix_only_bwd times the backward alone: its step has a `prepare`
    that runs the forward, which the timer calls untimed; called without it (a memory
    measurement), the step runs both."""
    pass_id = canonical_pass(pass_id)
    turn = itertools.cycle(sets)
    pending = []

    def prepare():
        x = next(turn)
        pending.append((x, fn(*x[:5])))

    def step():
        if pass_id == "fwd":
            with torch.no_grad():
                fn(*next(turn)[:5])
            return
        if not pending:
            prepare()
        x, out = pending.pop()
        out.backward(x[5])
        for t in x[:5]:
            if t is not None:
                t.grad = None

    if pass_id == "prefix_only_bwd":
        step.prepare = prepare
    return step


def memory_step(shape: dict, impl: str, mode: str, device: str, dtype: str, seed: int = 0) -> Callable[[], None]:
    """harness.memory's target: JSON-able arguments in, the whole step out (built in the fresh process)."""
    s = Shape(**shape)
    fn, inc = implementation(impl, s, device)
    sets = make_inputs(s, mode, device, DTYPES[dtype], seed=seed)
    if inc is not None and inc.prepare_inputs is not None:
        sets = [(*inc.prepare_inputs(*x[:5]), x[5]) for x in sets]
    step = make_step(fn, sets, mode)
    return lambda: step()


def _diffs(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    return {n: {"max_abs_diff": float((a - ref[n]).abs().max()) if a.numel() else 0.0,
                "ref_max_abs": float(ref[n].abs().max()) if a.numel() else 0.0}
            for n, a in got.items() if n in ref and a.shape == ref[n].shape}


def measure(shape: Shape, pass_id: str, impls: Iterable[str], *, device="cpu", dtype="fp32", n_sets: int = 1,
            warmup: int = 1, reps: int | None = None, min_reps: int = 3, max_reps: int = 50, budget_s: float = 2.0,
            memory: bool = True, check: bool = True, deadline: float | None = None, retries: int = 0,
            wait_quiet_s: float = 0.0, fields: dict | None = None) -> list[dict]:
    """One row per implementation of `shape` in pass `pass_id`, all timed interleaved in this process.

    Each implementation is built (masks, compiles: untimed) and run once on its own (`first_call_s`,
    compile included; its output and gradients are kept for the accuracy check), then all are timed
    together (harness.timer), then each one's peak memory of a whole step (harness.memory). A
    build or call that raises costs that row only (`error`); a compiled incumbent that raises or
    runs eagerly is flagged `fell_back`. `max_abs_diff` / `max_rel_diff` (relative to the largest
    value of the same tensor) are against the first incumbent that ran (`reference_impl`), over the
    output and every gradient. CPU: `background_cpu`, the cores other processes used meanwhile;
    with retries, the timing is repeated while that exceeds timer.BUSY_CORES and the least
    disturbed attempt kept.
    """
    from . import memory as mem
    from . import timer

    pass_id = canonical_pass(pass_id)
    device = torch.device(device)
    torch_dtype = DTYPES[dtype]
    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    sets = make_inputs(shape, pass_id, device, torch_dtype, n_sets)
    base = {**(fields or {}), "config": shape.name, "dtype": dtype, "B": shape.B, "H": shape.H, "Hkv": shape.hkv,
            "N": shape.N, "Nk": shape.nk, "P": shape.P, "D": shape.D, "causal": shape.causal,
            "dropout": shape.dropout, "mode": pass_id}
    rows, steps, outs, compiled = {}, {}, {}, set()
    eager_before = eager_calls()
    for name in impls:
        row = rows[name] = dict(base, impl=name)
        inc = INCUMBENTS.get(name)
        if inc is not None and inc.compiled:
            compiled.add(name)
            if deadline is not None and time.time() > deadline - COMPILE_MARGIN_S:
                row.update(error="not run: too close to the deadline to compile", fell_back="not compiled")
                continue
        try:
            t0 = time.perf_counter()
            fn, inc = implementation(name, shape, device)
            own = sets if inc is None or inc.prepare_inputs is None else [
                (*inc.prepare_inputs(*x[:5]), x[5]) for x in sets]
            outs[name] = run_once(fn, own[0], pass_id)
            timer.sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            steps[name] = make_step(fn, own, pass_id)
        except Exception as exc:  # noqa: BLE001 - an implementation that cannot run this shape
            row["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            if name in compiled:
                row["fell_back"] = "compile failed"
    best = None
    while steps and best is None:
        running = []  # which step was running when the timing raised (out of memory, most likely)

        def guarded(name, step):
            def mark(fn):
                def run():
                    running[:] = [name]
                    return fn()
                return run
            run = mark(step)
            if hasattr(step, "prepare"):
                run.prepare = mark(step.prepare)
            return run

        try:
            for _ in range(1 + max(0, retries)):
                if device.type == "cpu" and wait_quiet_s > 0:
                    timer.wait_for_quiet(wait_quiet_s)
                with timer.CpuMonitor(enabled=device.type == "cpu") as mon:
                    times = timer.time_interleaved({n: guarded(n, f) for n, f in steps.items()}, device,
                                                   warmup=warmup, reps=reps, min_reps=min_reps, max_reps=max_reps,
                                                   budget_s=budget_s, deadline=deadline)
                if best is None or (mon.background or 0) < (best[1].background or 0):
                    best = (times, mon)
                if (mon.background or 0) <= timer.BUSY_CORES:
                    break
        except Exception as exc:  # noqa: BLE001 - that implementation's row says so; the others are timed again
            if not running or best is not None:
                raise
            rows[running[0]]["error"] = f"{type(exc).__name__} while timed: {str(exc).strip()[:200]}"
            del steps[running[0]]
    if best is not None:
        times, mon = best
        work, floor = flops(shape, pass_id), bytes_floor(shape, pass_id, elem_bytes(torch_dtype))
        ran_eagerly = eager_calls() > eager_before
        for name, ms in times.items():
            row = rows[name]
            row.update(timer.summary(ms), background_cpu=mon.background, cpu_per_wall=mon.own)
            row.update(tflops=work / row["ms"] / 1e9, gbps=floor / row["ms"] / 1e6)
            if memory:
                kwargs = {"shape": dataclasses.asdict(shape), "impl": name, "mode": pass_id, "device": str(device),
                          "dtype": dtype_name}
                try:
                    row["peak_mb"] = (mem.peak_call(steps[name], device)[2] if device.type == "cuda" else
                                      mem.measure_peak_extra("harness.attention:memory_step", kwargs)) / 1e6
                except (mem.MemoryMeasurementError, RuntimeError) as exc:
                    row["memory_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            if name in compiled and ran_eagerly:
                row["fell_back"] = "ran eagerly, not compiled"
                for k in FALLBACK_KEYS:
                    row["fallback_" + k] = row.pop(k)
    ref = next((n for n in rows if n in outs and not n.startswith("ours") and not rows[n].get("fell_back")), None)
    if check and ref is not None and not shape.dropout:  # with dropout the two draw different masks
        for name, got in outs.items():
            d = _diffs(got, outs[ref])
            if d:
                rows[name].update(reference_impl=ref, diff_by_tensor=d,
                                  max_abs_diff=max(v["max_abs_diff"] for v in d.values()),
                                  max_rel_diff=max(v["max_abs_diff"] / max(v["ref_max_abs"], 1e-30)
                                                   for v in d.values()))
    return list(rows.values())
