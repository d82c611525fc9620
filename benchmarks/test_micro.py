"""Micro-benchmarks (pytest-benchmark): one small shape per situation, ours vs cat + SDPA.

    pytest benchmarks --benchmark-only                       # all of them
    pytest benchmarks --benchmark-only -k prefix_only_bwd    # a subset
    PREFIX_ATTN_BACKEND=reference pytest benchmarks --benchmark-only
    pytest benchmarks --benchmark-only --benchmark-compare   # against a saved run (--benchmark-autosave)

Each group (shape + pass) holds the two implementations, so pytest-benchmark's table puts
them side by side. Passes are harness.attention's; prefix_only_bwd times the backward alone, its
forward run untimed as the set-up of each round. Not collected by ``pytest tests`` (pyproject's testpaths is tests/); without
pytest-benchmark installed the whole module is skipped. bench_attention.py is the full study
(memory, FLOPs, JSON, plots); these are for quick before/after comparisons of a change.
"""

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")
pytest.importorskip("prefix_attn")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import attention as at  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SHAPES = {
    "train": at.Shape(B=2, H=8, N=256, P=64, D=64, causal=True),
    "gqa": at.Shape(B=2, H=8, Hkv=2, N=256, P=32, D=64, causal=True),
    "noncausal-d128": at.Shape(B=1, H=4, N=256, P=16, D=128, causal=False),
    "chunk-vs-cache": at.Shape(B=2, H=8, N=16, Nk=1024, P=64, D=64, causal=True),
}


@pytest.mark.parametrize("impl", ["ours", "sdpa-cat"])
@pytest.mark.parametrize("mode", at.PASSES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(benchmark, shape, mode, impl):
    s = SHAPES[shape]
    benchmark.group = f"{shape} {s.name} {mode}"
    benchmark.extra_info.update(s.to_dict(), mode=mode, flops=at.flops(s, mode))
    fn, _ = at.implementation(impl, s, DEVICE)
    step = at.make_step(fn, at.make_inputs(s, mode, DEVICE, torch.float32), mode)
    step()  # warm-up outside the timer: lazy init, thread pools

    def run():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    prepare = getattr(step, "prepare", None)  # prefix_only_bwd: the untimed forward
    if prepare is None:
        benchmark(run)
    else:
        benchmark.pedantic(run, setup=prepare, rounds=20, warmup_rounds=1)
