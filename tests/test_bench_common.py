"""The kernel benchmarks' counts, shapes, incumbents and measurement (benchmarks/harness/attention.py),
and the GPU suite's loop on CPU with torch.cuda's timing and memory calls faked. No GPU needed; the
test that compiles FlexAttention on CPU is marked slow."""
import dataclasses
import math
import os
import sys
import time

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

from harness import attention as bc  # noqa: E402

H200_PEAK_TFLOPS = 989.0  # dense bf16 tensor cores
H200_PEAK_GBPS = 4800.0

_DYNAMO_SETTINGS = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                    "accumulated_cache_size_limit", "fail_on_recompile_limit_hit", "fail_on_cache_limit_hit",
                    "suppress_errors")


@pytest.fixture(autouse=True)
def _restore_dynamo_config():
    """configure_dynamo changes process-wide settings; other test modules
    (torch.compile tests) must not see them."""
    cfg = torch._dynamo.config
    saved = {n: getattr(cfg, n) for n in _DYNAMO_SETTINGS if hasattr(cfg, n)}
    yield
    for n, v in saved.items():
        setattr(cfg, n, v)


# ------------------------------------------------------------------------------------- counts


def _pairs_loop(nq, nk, causal):
    if not causal:
        return nq * nk
    return sum(min(nk, max(0, i + nk - nq + 1)) for i in range(nq))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 4096), (7, 3), (3, 7), (64, 64), (113, 203), (203, 113), (16, 1024)])
def test_visible_sequence_pairs_matches_the_definition(nq, nk, causal):
    assert bc.visible_sequence_pairs(nq, nk, causal) == _pairs_loop(nq, nk, causal)


def test_flops_convention():
    s = bc.Shape(B=2, H=8, N=8192, P=128, D=128, causal=True)
    fwd = 4 * 2 * 8 * 128 * (8192 * 128 + 8192 * 8193 // 2)
    assert bc.flops(s, "fwd") == fwd
    assert bc.flops(s, "train_step") == 3.5 * fwd
    assert bc.flops(s, "prefix_only_bwd") == 8 * 2 * 8 * 8192 * 128 * 128
    # the prefix-only backward is a part of the full backward's work (its 4 matmuls over the
    # prefix columns, of the backward's 5 over every column)
    for shape in (s, dataclasses.replace(s, causal=False), bc.Shape(4, 12, 512, 64, 64, True)):
        assert bc.flops(shape, "prefix_only_bwd") < bc.flops(shape, "train_step") - bc.flops(shape, "fwd")
    assert bc.flops(s, "fwd_bwd") == bc.flops(s, "train_step")  # the old name reads the same
    with pytest.raises(ValueError, match="prefix_bwd"):
        bc.flops(s, "prefix_bwd")


# (dtype, B, H, N, P, D, causal, ms) of ours-triton's prefix-only backward in the first H200 run
# (benchmarks/results/nvidia-h200/2026-11-29-before-fixes, pass `bwd_prefix`): its fastest rows,
# which the old count (1.5x the whole forward) put at up to 1725 TFLOP/s, above the card's peak.
H200_PREFIX_BWD = [
    ("bf16", 2, 8, 8192, 16, 128, False, 0.4790), ("bf16", 2, 8, 8192, 128, 128, False, 0.5247),
    ("fp16", 2, 8, 8192, 128, 128, False, 0.5737), ("bf16", 2, 16, 8192, 16, 64, False, 0.5857),
    ("bf16", 2, 8, 8192, 512, 128, False, 0.6368), ("fp16", 2, 8, 8192, 128, 128, True, 0.3718),
    ("bf16", 8, 16, 2048, 128, 64, False, 0.5795), ("bf16", 32, 16, 512, 512, 64, False, 1.0898),
]


@pytest.mark.parametrize("row", H200_PREFIX_BWD, ids=lambda r: f"{r[0]}-N{r[3]}-P{r[4]}-D{r[5]}-{r[6]}")
def test_prefix_only_bwd_at_the_h200_times_is_possible(row):
    dtype, B, H, N, P, D, causal, ms = row
    s = bc.Shape(B=B, H=H, N=N, P=P, D=D, causal=causal)
    old = 1.5 * bc.flops(s, "fwd") / ms / 1e9
    tflops = bc.flops(s, "prefix_only_bwd") / ms / 1e9
    gbps = bc.bytes_floor(s, "prefix_only_bwd", 2) / ms / 1e6
    assert tflops < H200_PEAK_TFLOPS and gbps < H200_PEAK_GBPS
    assert tflops < old


def test_bytes_floor():
    s = bc.Shape(B=64, H=32, Hkv=8, N=1, Nk=4096, P=128, D=128, causal=True)
    kv = 64 * 8 * 4096 * 128
    assert bc.bytes_floor(s, "fwd", 2) == 2 * (2 * 64 * 32 * 128 + 2 * kv + 2 * 8 * 128 * 128)
    t = bc.Shape(B=2, H=8, N=64, P=16, D=32, causal=False)
    q, pr, lse = 2 * 8 * 64 * 32, 8 * 16 * 32, 2 * 8 * 64
    assert bc.bytes_floor(t, "prefix_only_bwd", 4) == 4 * (3 * q + 4 * pr) + 4 * lse
    assert bc.bytes_floor(t, "train_step", 2) > 3 * bc.bytes_floor(t, "fwd", 2)


# ------------------------------------------------------------------------------------- shapes


def test_gpu_cases_targets_first_and_keys_unique():
    for quick in (False, True):
        cases = bc.gpu_cases(quick)
        first = cases[0]
        assert (first.dtype, first.shape.D, first.shape.N, first.kind) == ("bf16", 128, 8192, "train")
        assert first.shapes()[0].causal  # causal before non-causal
        # gpu_suite.save() tells rows apart by (dtype, N, P, D): one case per key
        keys = [(c.dtype, c.shape.N, c.shape.P, c.shape.D) for c in cases]
        assert len(keys) == len(set(keys))
    cases = bc.gpu_cases()
    assert [c.label for c in cases[:3]] == ["target"] * 3
    assert {c.shape.P for c in cases[:3]} == {16, 128, 512}
    assert len([c for c in cases if c.label == "grid"]) == 33  # the old grid, less the targets
    decode = [c for c in cases if c.kind == "decode"]
    assert len(decode) == 1 and decode[0] in cases[:5]
    d = decode[0].shape
    assert (d.N, d.B, d.nk, d.P) == (1, 64, 4096, 128) and decode[0].passes == ("fwd",)
    assert any(c.shape.grouped and c.kind == "train" for c in cases[:5])


# ------------------------------------------------------------------------------------- incumbents


def _names(shape, kind="train"):
    return [i.name for i in bc.incumbents_for(shape, kind, check_available=False)]


def test_incumbent_selection():
    mha = bc.Shape(B=2, H=8, N=512, P=64, D=64, causal=True)
    assert _names(mha) == ["sdpa-cat", "sdpa-cat-lower-right", "flex-cat", "flash-attn-cat"]
    gqa = dataclasses.replace(mha, Hkv=2)
    assert _names(gqa) == ["sdpa-cat", "sdpa-cat-lower-right", "sdpa-cat-gqa", "flex-cat", "flash-attn-cat"]
    # bottom-right over [prefix ; sequence] hides prefix keys when Nk < Nq: not our visibility
    short_kv = dataclasses.replace(gqa, N=64, Nk=32)
    assert _names(short_kv) == ["sdpa-cat", "flex-cat", "flash-attn-cat"]
    assert "sdpa-cat-lower-right" in _names(dataclasses.replace(short_kv, causal=False))
    dec = bc.Shape(B=64, H=32, Hkv=8, N=1, Nk=4096, P=128, D=128, causal=True)
    assert _names(dec, "decode") == ["sdpa-cache", "flex-cache"]
    assert _names(gqa, "decode") == ["sdpa-cache", "flex-cache"]  # a kind picks its own incumbents
    assert [i.name for i in bc.incumbents_for(gqa, names=["sdpa-cat-gqa", "sdpa-cat"])] == ["sdpa-cat-gqa", "sdpa-cat"]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.B, shape.H, shape.N, shape.D, generator=g)
    k, v = (torch.randn(shape.B, shape.hkv, shape.nk, shape.D, generator=g) for _ in range(2))
    pk, pv = (torch.randn(shape.hkv, shape.P, shape.D, generator=g) for _ in range(2))
    return q, k, v, pk, pv


@pytest.mark.parametrize("shape", [
    bc.Shape(B=2, H=4, N=33, P=5, D=16, causal=True),
    bc.Shape(B=2, H=4, Hkv=2, N=33, P=5, D=16, causal=True),
    bc.Shape(B=2, H=4, Hkv=1, N=9, Nk=40, P=7, D=16, causal=True),
    bc.Shape(B=1, H=4, Hkv=2, N=40, Nk=9, P=7, D=16, causal=True),
    bc.Shape(B=2, H=4, Hkv=2, N=33, P=5, D=16, causal=False),
], ids=lambda s: s.name)
def test_sdpa_incumbents_compute_prefix_attention(shape):
    x = _inputs(shape)
    ref = bc.ours(shape, "reference")(*x)
    names = [i.name for i in bc.incumbents_for(shape) if not i.compiled and i.name != "flash-attn-cat"]
    assert "sdpa-cat" in names
    for name in names:
        out = bc.INCUMBENTS[name].build(shape, torch.device("cpu"))(*x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_decode_incumbent_reads_the_cache():
    shape = bc.Shape(B=3, H=4, Hkv=2, N=1, Nk=40, P=8, D=16, causal=True)
    x = _inputs(shape)
    ref = bc.ours(shape, "reference")(*x)
    inc = bc.INCUMBENTS["sdpa-cache"]
    cached = inc.prepare_inputs(*x)
    assert cached[1].shape == (3, 2, 48, 16) and cached[3] is None
    torch.testing.assert_close(inc.build(shape, torch.device("cpu"))(*cached), ref, atol=1e-5, rtol=1e-5)


def test_configure_dynamo_raises_limits_and_fails_loudly():
    done = bc.configure_dynamo()
    cfg = torch._dynamo.config
    limit = getattr(cfg, "recompile_limit", None) or getattr(cfg, "cache_size_limit")
    assert limit >= bc.RECOMPILE_LIMIT
    assert any(k in done for k in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"))
    assert cfg.suppress_errors is False


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_running_eagerly_is_counted():
    shape = bc.Shape(B=1, H=2, N=16, P=4, D=16, causal=True)
    fn = bc.INCUMBENTS["flex-cat"].build(shape, torch.device("cpu"))
    before = bc.eager_calls()
    with torch.compiler.set_stance("force_eager"):  # what a dynamo that skips the frame does
        out = fn(*_inputs(shape))
    assert bc.eager_calls() == before + 1
    torch.testing.assert_close(out, bc.ours(shape, "reference")(*_inputs(shape)), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_flex_compiles_on_cpu_without_falling_back():
    shape = bc.Shape(B=1, H=4, Hkv=2, N=32, P=8, D=16, causal=True)
    x = _inputs(shape)
    before = bc.eager_calls()
    out = bc.INCUMBENTS["flex-cat"].build(shape, torch.device("cpu"))(*x)
    assert bc.eager_calls() == before
    torch.testing.assert_close(out, bc.ours(shape, "reference")(*x), atol=1e-5, rtol=1e-5)


def test_add_speedups_leaves_out_fallbacks_and_errors():
    base = dict(dtype="bf16", B=2, H=8, Hkv=8, N=64, Nk=64, P=16, D=64, causal=True, mode="fwd")
    rows = [dict(base, impl="ours-triton", ms=1.0),
            dict(base, impl="sdpa-cat", ms=2.0),
            dict(base, impl="flex-cat", ms=0.5, fell_back="ran eagerly"),
            dict(base, impl="flex-cache", error="Unsupported: ...", fell_back="compile failed"),
            dict(base, impl="sdpa-cat-lower-right", ms=4.0),
            dict(base, impl="sdpa-cat", ms=1.0, mode="train_step")]
    best = bc.add_speedups(rows)
    assert best[tuple(base[k] for k in bc.ROW_SHAPE_KEYS)]["impl"] == "sdpa-cat"
    assert rows[0]["speedup_vs_best_incumbent"] == 2.0 and rows[0]["best_incumbent"] == "sdpa-cat"
    assert rows[4]["speedup_vs_best_incumbent"] == 0.5
    assert rows[5]["speedup_vs_best_incumbent"] == 1.0  # another pass: its own best
    assert "speedup_vs_best_incumbent" not in rows[3]


# ------------------------------------------------------------------------------------- the GPU suite on CPU


class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


@pytest.fixture
def fake_cuda(monkeypatch):
    """gpu_suite on CPU: CUDA events from perf_counter, no-op synchronize, zero memory counters."""
    import gpu_suite

    monkeypatch.setattr(gpu_suite, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_suite, "OURS_BACKENDS", ("cpu",))
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: 0)
    return gpu_suite


def test_gpu_suite_loop_on_faked_cuda(fake_cuda):
    gs = fake_cuda
    cases = [bc.KernelCase("target", "fp32", bc.Shape(B=1, H=4, Hkv=2, N=32, P=8, D=16, causal=True)),
             dataclasses.replace(bc.DECODE_CASE, dtype="fp32",
                                 shape=bc.Shape(B=2, H=4, Hkv=2, N=1, Nk=64, P=8, D=16, causal=True))]
    rows = []
    names = ["sdpa-cat", "sdpa-cat-lower-right", "sdpa-cat-gqa", "sdpa-cache"]
    for case in cases:
        assert gs.run_case(case, rows, time.time() + 600, names)
    assert len(rows) == 2 * 3 * 4 + 2  # train: causal x 3 passes x (ours + 3); decode: ours + sdpa-cache
    for r in rows:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["gbps"] > 0 and r["first_call_s"] >= 0
        assert r["reference_impl"].startswith("sdpa") and r["max_abs_diff"] < 1e-4, r
    assert {r["mode"] for r in rows} == set(bc.PASSES)
    bc.add_speedups(rows)
    assert all("speedup_vs_best_incumbent" in r for r in rows)
    md = gs.markdown(dict(gpu="fake", torch=torch.__version__, triton=None, cuda=None, date="today",
                           commit="x", tests_rc=0, complete=True), rows)
    assert "prefix_only_bwd" in md and "train_step" in md and "| decode |" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == len(rows) + 2 and len({line.count(" | ") for line in table}) == 1  # one cell per column
    # past the deadline nothing starts
    assert not gs.run_case(cases[0], [], time.time() - 1, names)


def test_gpu_suite_flags_a_failed_compile(fake_cuda, monkeypatch):
    gs = fake_cuda

    def broken(shape, device):
        def fn(*a):
            raise RuntimeError("Hard failure due to fullgraph=True\nmore")
        return fn
    monkeypatch.setitem(bc.INCUMBENTS, "flex-cat", dataclasses.replace(bc.INCUMBENTS["flex-cat"], build=broken))
    case = bc.KernelCase("t", "fp32", bc.Shape(B=1, H=2, N=16, P=4, D=16, causal=True), causals=(True,),
                      passes=("fwd",))
    rows = []
    gs.run_case(case, rows, time.time() + 600, ["sdpa-cat", "flex-cat"])
    flex = next(r for r in rows if r["impl"] == "flex-cat")
    assert flex["fell_back"] == "compile failed" and "fullgraph" in flex["error"] and "ms" not in flex
    bc.add_speedups(rows)
    assert next(r for r in rows if r["impl"] == "ours-cpu")["best_incumbent"] == "sdpa-cat"
    assert "FELL BACK" in gs.markdown(dict(gpu="fake", torch="", triton=None, cuda=None, date="", commit="",
                                             tests_rc=0), rows)


def test_an_eager_run_moves_out_of_the_timings(monkeypatch):
    shape = bc.Shape(B=1, H=2, N=16, P=4, D=16, causal=True)

    def eager_flex(shape, device):
        inner = bc.sdpa_cat(shape, device)

        def fn(*a):
            bc._EAGER["flex"] += 1  # what _flex_body does when it runs eagerly
            return inner(*a)
        return fn
    monkeypatch.setitem(bc.INCUMBENTS, "flex-cat", dataclasses.replace(bc.INCUMBENTS["flex-cat"], build=eager_flex))
    rows = {r["impl"]: r for r in bc.measure(shape, "fwd", ["sdpa-cat", "flex-cat"], reps=2, memory=False)}
    flex = rows["flex-cat"]
    assert flex["fell_back"] and "ms" not in flex and flex["fallback_ms"] > 0
    assert math.isfinite(flex["fallback_tflops"])
    assert "fell_back" not in rows["sdpa-cat"] and rows["sdpa-cat"]["ms"] > 0
