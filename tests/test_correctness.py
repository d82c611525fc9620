"""Kernel backends against the reference, on a hostile grid of shapes, layouts, masks,
prefix modes, dtypes and requires_grad patterns.

Every output buffer starts as NaN (``nan_poison``), so an element a kernel does not
write fails the test. The bound is ``err(ours) <= 2 * err(same-precision reference) +
floor`` (see conftest).

The grid is a covering design, not a cartesian product:

- HAND_CASES: cases that each combine several hostile features (every P in {0, 1, 63,
  257}, every Nq in {1, 17, 113, 1025}, Nk above and below Nq, head dims 16 to 256, GQA
  groups 1/2/4, every mask shape, every prefix mode, every requires_grad pattern);
- LOW_PRECISION_CASES: fp16 / bf16 on a subset of those;
- PRODUCT_CASES: the features most likely to interact (prefix mode x causal x padding)
  crossed in full at a small shape;
- PAIRWISE_CASES: a pairwise covering of Nq x P x D x group x prefix mode x causal x
  dtype x masks x layout x requires_grad (every pair of values meets in some case);
- RANDOM_CASES: seeded random small cases over everything, for breadth.
"""

import dataclasses
import itertools
import math
import random

import pytest
import torch

from attn_testing import (
    Case,
    OpLog,
    backend_params,
    bank_index,
    check_against_reference,
    device_for,
    make_inputs,
    padding_lengths,
    reference_pair,
    run_attention,
)

pytestmark = pytest.mark.usefixtures("nan_poison")

BACKENDS = backend_params()

C = Case

HAND_CASES = [
    # tiny and degenerate
    C(B=1, Hq=1, Hkv=1, Nq=1, Nk=1, P=0, D=16, prefix="none"),
    C(B=1, Hq=2, Hkv=2, Nq=1, Nk=1, P=1, D=16),
    C(B=4, Hq=4, Hkv=4, Nq=9, Nk=13, P=3, D=32, prefix="bank"),
    # decoding: one query against a long cache
    C(B=2, Hq=4, Hkv=2, Nq=1, Nk=300, P=63, D=64, prefix="bank"),
    C(B=3, Hq=8, Hkv=2, Nq=1, Nk=129, P=257, D=128, causal=True, prefix="per_row", kpm="left"),
    C(B=1, Hq=2, Hkv=2, Nq=1, Nk=1025, P=0, D=128, prefix="none", kpm="right"),
    # Nq = 2 .. 4: the CPU backend's register-blocked small-row products (a decode step with a KV
    # group's query heads folded into one head), with head dims that leave vector tails
    C(B=2, Hq=3, Hkv=3, Nq=3, Nk=37, P=19, D=20, causal=True, kpm="left"),
    C(B=2, Hq=4, Hkv=2, Nq=4, Nk=70, P=63, D=80, prefix="bank", mask="float-NqNk", layout="qT"),
    C(B=3, Hq=2, Hkv=1, Nq=2, Nk=5, P=300, D=100, prefix="per_row", kpm="right", layout="kvslice"),
    # Nq = 17
    C(B=2, Hq=4, Hkv=4, Nq=17, Nk=17, P=0, D=64, causal=True, prefix="none"),
    C(B=2, Hq=4, Hkv=4, Nq=17, Nk=17, P=0, D=64, causal=True, prefix="shared"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=40, P=1, D=80, causal=True, mask="bool-NqNk"),
    C(B=2, Hq=4, Hkv=1, Nq=17, Nk=17, P=63, D=16, causal=True, prefix="bank", layout="qT", grads="prefix"),
    C(B=2, Hq=2, Hkv=1, Nq=17, Nk=50, P=257, D=64, kpm="right", grads="q"),
    C(B=2, Hq=2, Hkv=2, Nq=17, Nk=33, P=63, D=128, prefix="per_row", mask="float-NqNk", grads="prefix"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=17, P=63, D=64, scale=0.5, mask="float-HNqNk"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=33, P=63, D=64, causal=True, prefix="bank", kpm="right", mask="bool-B11Nk", grads="prefix"),
    # Nq = 113 (odd, not a multiple of any block)
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank", layout="kvslice"),
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, prefix="per_row", mask="float-B1NqNk", grads="kv"),
    C(B=1, Hq=6, Hkv=2, Nq=113, Nk=113, P=257, D=128, causal=True, layout="qT+kvslice"),
    C(B=2, Hq=3, Hkv=3, Nq=113, Nk=150, P=1, D=64, kpm="int_left", mask="bool-BHNqNk"),
    C(B=3, Hq=2, Hkv=1, Nq=113, Nk=113, P=0, D=80, causal=True, prefix="none", kpm="right", grads="q"),
    # Nk < Nq: causal rows before Nq - Nk see only the prefix (or nothing when P = 0)
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=17, P=63, D=64, causal=True),
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=50, P=0, D=64, causal=True, prefix="none"),
    C(B=1, Hq=2, Hkv=1, Nq=50, Nk=7, P=1, D=16, causal=True, prefix="bank"),
    C(B=2, Hq=2, Hkv=1, Nq=17, Nk=1, P=257, D=64, causal=True),
    C(B=2, Hq=4, Hkv=2, Nq=100, Nk=1, P=63, D=64, prefix="bank"),
    # no sequence keys at all: the prefix alone
    C(B=2, Hq=4, Hkv=2, Nq=5, Nk=0, P=7, D=32),
    C(B=2, Hq=4, Hkv=2, Nq=5, Nk=0, P=7, D=32, causal=True, prefix="bank"),
    # block-aligned sizes (the easy path must be right too)
    C(B=2, Hq=4, Hkv=4, Nq=64, Nk=64, P=64, D=64, causal=True, grads="none"),
    C(B=1, Hq=4, Hkv=2, Nq=257, Nk=257, P=63, D=64, causal=True, prefix="bank", mask="bool-1HNqNk"),
    # single-tensor grads and odd requires_grad patterns
    C(B=2, Hq=8, Hkv=2, Nq=31, Nk=31, P=15, D=64, causal=True, prefix="bank", kpm="int_right", grads="k"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=15, D=80, prefix="per_row", mask="bool-Nk", grads="v"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=15, D=16, kpm="allpad", grads="prefix_k"),
    # fully masked rows (P = 0): out 0, lse -inf
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=0, D=16, kpm="allpad"),
    C(B=2, Hq=2, Hkv=1, Nq=40, Nk=40, P=0, D=64, prefix="none", mask="bool-Nq1"),
    # strides
    C(B=2, Hq=2, Hkv=2, Nq=23, Nk=29, P=5, D=64, layout="qstride2"),
    C(B=2, Hq=2, Hkv=1, Nq=129, Nk=129, P=63, D=64, causal=True, prefix="per_row", kpm="left", mask="float-B1NqNk", layout="qT"),
    # other head dims from the SPEC's list
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=33, P=63, D=256, causal=True),
    C(B=1, Hq=2, Hkv=1, Nq=17, Nk=33, P=3, D=96),
    C(B=1, Hq=2, Hkv=1, Nq=17, Nk=33, P=3, D=32, prefix="bank", T=1),
    # large scores (a softmax without a correct running max overflows), small scale
    C(B=2, Hq=4, Hkv=2, Nq=65, Nk=130, P=17, D=64, causal=True, amp=30),
    C(B=2, Hq=2, Hkv=1, Nq=65, Nk=130, P=17, D=64, scale=0.01, prefix="per_row"),
    # Hugging Face style additive masks (finfo.min, not -inf)
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=47, P=5, D=64, kpm="left", mask="fmin-B11Nk"),
    C(B=2, Hq=2, Hkv=1, Nq=20, Nk=20, P=0, D=32, prefix="none", mask="fmin-Nq1"),
    # strided masks and index (kvslice also makes them non-contiguous, index int32)
    C(B=3, Hq=4, Hkv=2, Nq=29, Nk=41, P=7, D=64, causal=True, prefix="bank", kpm="right", mask="bool-BHNqNk", layout="kvslice"),
    C(B=3, Hq=4, Hkv=2, Nq=29, Nk=41, P=7, D=64, prefix="bank", kpm="int_left", mask="float-NqNk", layout="qT+kvslice", grads="prefix"),
    # long sequences
    C(B=1, Hq=1, Hkv=1, Nq=1025, Nk=1025, P=63, D=64, causal=True),
    C(B=1, Hq=2, Hkv=1, Nq=1025, Nk=1100, P=257, D=128, prefix="bank", T=2, kpm="left", grads="prefix"),
]

LOW_PRECISION_CASES = [
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank", dtype="fp16"),
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank", dtype="bf16"),
    C(B=1, Hq=2, Hkv=1, Nq=1, Nk=300, P=257, D=128, kpm="left", dtype="fp16"),
    C(B=2, Hq=4, Hkv=4, Nq=17, Nk=17, P=0, D=64, causal=True, prefix="none", dtype="bf16"),
    C(B=2, Hq=4, Hkv=1, Nq=64, Nk=100, P=63, D=128, prefix="per_row", mask="float-B1NqNk", layout="qT", dtype="bf16"),
    C(B=2, Hq=2, Hkv=1, Nq=33, Nk=17, P=1, D=16, causal=True, grads="prefix", dtype="fp16"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=0, D=64, kpm="allpad", dtype="fp16"),
    C(B=2, Hq=8, Hkv=2, Nq=50, Nk=50, P=15, D=64, causal=True, prefix="bank", kpm="int_right", grads="prefix", dtype="bf16"),
    C(B=1, Hq=2, Hkv=2, Nq=257, Nk=257, P=63, D=96, causal=True, layout="kvslice", dtype="bf16"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=40, P=7, D=256, mask="bool-NqNk", dtype="fp16"),
    C(B=2, Hq=4, Hkv=1, Nq=40, Nk=70, P=9, D=64, causal=True, prefix="bank", amp=20, dtype="fp16"),
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=47, P=5, D=64, kpm="left", mask="fmin-B11Nk", dtype="bf16"),
]

_GRAD_CYCLE = ["all", "prefix", "q", "kv", "all", "none", "prefix", "all"]


def _product_grads(i, prefix):
    grads = _GRAD_CYCLE[i % len(_GRAD_CYCLE)]
    return "all" if grads == "prefix" and prefix == "none" else grads


PRODUCT_CASES = [
    C(B=3, Hq=4, Hkv=2, Nq=13, Nk=29, P=5, D=32, prefix=prefix, causal=causal, kpm=kpm, grads=_product_grads(i, prefix))
    for i, (prefix, causal, kpm) in enumerate(
        itertools.product(["none", "shared", "per_row", "bank"], [False, True], ["none", "left", "right"])
    )
]



SMALL_NQ = [1, 2, 7, 16, 31, 64, 65, 100]
SMALL_NK = [0, 1, 5, 31, 64, 65, 127]
MEDIUM_NQ = [1, 63, 129, 255, 300, 511]
MEDIUM_NK = [1, 64, 200, 257, 513, 700]


def _random_cases(n, seed=2024, nq=SMALL_NQ, nk=SMALL_NK):
    """Seeded random draws from the whole space: breadth beyond the hand list."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        prefix = rng.choice(["none", "shared", "per_row", "bank"])
        Nk = rng.choice(nk)
        grads = rng.choice(["all", "all", "prefix", "q", "kv", "none", "v", "prefix_k"])
        if prefix == "none" and grads.startswith("prefix"):
            grads = "all"
        Hkv = rng.choice([1, 2, 3])
        cases.append(C(
            B=rng.choice([1, 2, 3]), Hkv=Hkv, Hq=Hkv * rng.choice([1, 2, 4]),
            Nq=rng.choice(nq), Nk=Nk,
            P=rng.choice([0, 1, 3, 16, 33, 64]), D=rng.choice([16, 32, 64, 80, 96, 128]),
            causal=rng.random() < 0.5, prefix=prefix, T=rng.choice([0, 1, 2, 5]),
            kpm=rng.choice(["none", "left", "right", "int_left", "allpad"]) if Nk else "none",
            mask=rng.choice(["none", "none", "bool-NqNk", "float-B1NqNk", "fmin-B11Nk", "bool-HNqNk", "float-1HNqNk"]),
            layout=rng.choice(["contig", "contig", "qT", "kvslice", "qT+kvslice", "qstride2"]),
            grads=grads, dtype=rng.choice(["fp32", "fp32", "fp32", "fp16", "bf16"]),
        ))
    return cases


RANDOM_CASES = _random_cases(250) + _random_cases(30, seed=99, nq=MEDIUM_NQ, nk=MEDIUM_NK)
#: with --run-slow only
SLOW_RANDOM_CASES = _random_cases(600, seed=5) + _random_cases(150, seed=6, nq=MEDIUM_NQ, nk=MEDIUM_NK)

#: Factors of the pairwise covering design: every value of every factor meets every
#: value of every other factor in at least one case.
PAIRWISE_FACTORS = {
    "Nq": [1, 17, 113, 1025],
    "P": [0, 1, 63, 257],
    "D": [16, 64, 80, 128],
    "group": [1, 2, 4],
    "prefix": ["none", "shared", "per_row", "bank"],
    "causal": [False, True],
    "dtype": ["fp32", "fp16", "bf16"],
    "masks": ["none", "kpm_left", "kpm_int_right", "bool-NqNk", "float-B1NqNk", "kpm_right+bool-B11Nk"],
    "layout": ["contig", "qT", "kvslice"],
    "grads": ["all", "prefix", "q", "kv", "none"],
}


def _pairwise_rows(factors, seed=7, candidates=60):
    """Greedy pairwise covering: repeatedly take, of some random candidate rows, the one
    covering the most value pairs not yet covered."""
    rng = random.Random(seed)
    names = list(factors)
    uncovered = {
        (a, va, b, vb)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        for va in range(len(factors[a]))
        for vb in range(len(factors[b]))
    }
    rows = []
    while uncovered:
        # seed each candidate with one uncovered pair, so every pick makes progress
        best, best_gain = None, -1
        for _ in range(candidates):
            a, va, b, vb = rng.choice(sorted(uncovered))
            row = {n: rng.randrange(len(factors[n])) for n in names}
            row[a], row[b] = va, vb
            gain = sum(
                (x, row[x], y, row[y]) in uncovered
                for i, x in enumerate(names)
                for y in names[i + 1 :]
            )
            if gain > best_gain:
                best, best_gain = row, gain
        rows.append(best)
        uncovered -= {(x, best[x], y, best[y]) for i, x in enumerate(names) for y in names[i + 1 :]}
    return [{n: factors[n][row[n]] for n in names} for row in rows]


def _pairwise_cases():
    rng = random.Random(11)
    cases = []
    for row in _pairwise_rows(PAIRWISE_FACTORS):
        big = row["Nq"] > 200
        Hkv = 1 if big else rng.choice([1, 2])
        Nq = row["Nq"]
        # Nk >= Nq mostly; causal rows sometimes get Nk < Nq (queries before Nq - Nk see
        # only the prefix)
        if row["causal"] and Nq > 1 and rng.random() < 0.3:
            Nk = rng.randrange(1, Nq)
        else:
            Nk = Nq + rng.choice([0, 1, 37, 90])
        kpm, mask = "none", "none"
        for part in row["masks"].split("+"):
            if part.startswith("kpm_"):
                kpm = part[4:]
            elif part != "none":
                mask = part
        prefix, grads = row["prefix"], row["grads"]
        if prefix == "none" and grads == "prefix":
            grads = "all"
        cases.append(C(
            B=1 if big else 2, Hq=Hkv * row["group"], Hkv=Hkv, Nq=Nq, Nk=Nk, P=row["P"], D=row["D"],
            causal=row["causal"], prefix=prefix, kpm=kpm, mask=mask, layout=row["layout"], grads=grads,
            dtype=row["dtype"],
        ))
    return cases


PAIRWISE_CASES = _pairwise_cases()

ALL_CASES = HAND_CASES + LOW_PRECISION_CASES + PRODUCT_CASES + PAIRWISE_CASES + RANDOM_CASES

#: The GPU tier (`pytest -m gpu_tier`, run by `make gpu-check`): every kernel path of every GPU
#: backend in a couple of minutes. On a GPU a test's cost is its Triton JIT compiles (1-3 s per
#: new specialisation: kernel x constexpr flags x dtype x head-dim block x which integer
#: arguments are 1 or multiples of 16), not its FLOPs, so these cases reuse few specialisations:
#: mostly D = 64 with GQA 2 at odd sizes, one feature changed at a time. Each is also in the
#: full grid above. They cover forward, dq, dk/dv and dprefix (chunked and in place); shared,
#: per-row and bank prefixes, and none; bool, float, finfo.min and key-padding masks, causal,
#: Nk < Nq, Nk = 0, decode; MHA, GQA, MQA; fp32, fp16, bf16; head dims 16 to 256; strided
#: layouts; large scores; every requires_grad pattern.
#: Cost of the whole tier (the `gpu_tier` tests of tools/gpu_check.sh's GPU_TESTS) on one H200,
#: an estimate: ~75 triton tests launch ~215 distinct Triton specialisations (201 counted on CPU
#: with tools/triton_spec_count.py, TRITON_SPEC_COUNT_ONLY=1, in seconds; 100 of them from these
#: cases; test_syncs.py's GPU-only tests, skipped on CPU, add ~15). At 1-3 s per cold compile that
#: is 200-650 CPU-seconds, 20-55 s over 12 xdist workers (more where two workers compile the same
#: kernel at once); the ~75 cuda tests compile nothing (< 1 s each); workers start in ~15 s; the
#: longest single tests (torch.compile with inductor, a subprocess) take ~30 s and overlap.
#: ~60-100 s in all, under the 150 s `make gpu-check` gives it; tests.log counts the compiles.
GPU_TIER_CASES = [
    # fp32, D = 64, GQA 2: the prefix modes, causal and masks
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=17, P=63, D=64, causal=True),
    C(B=3, Hq=4, Hkv=2, Nq=29, Nk=41, P=7, D=64, causal=True, prefix="bank", kpm="right", mask="bool-BHNqNk", layout="kvslice"),
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=47, P=5, D=64, kpm="left", mask="fmin-B11Nk"),
    C(B=2, Hq=4, Hkv=2, Nq=65, Nk=130, P=17, D=64, causal=True, amp=30),
    C(B=2, Hq=2, Hkv=2, Nq=23, Nk=29, P=5, D=64, layout="qstride2"),
    C(B=2, Hq=3, Hkv=3, Nq=113, Nk=150, P=1, D=64, kpm="int_left", mask="bool-BHNqNk"),
    C(B=2, Hq=4, Hkv=2, Nq=100, Nk=1, P=63, D=64, prefix="bank"),
    C(B=2, Hq=8, Hkv=2, Nq=31, Nk=31, P=15, D=64, causal=True, prefix="bank", kpm="int_right", grads="k"),
    C(B=1, Hq=1, Hkv=1, Nq=1025, Nk=1025, P=63, D=64, causal=True),
    # other head dims, decode, no prefix, no sequence
    C(B=3, Hq=8, Hkv=2, Nq=1, Nk=129, P=257, D=128, causal=True, prefix="per_row", kpm="left"),
    C(B=2, Hq=4, Hkv=2, Nq=4, Nk=70, P=63, D=80, prefix="bank", mask="float-NqNk", layout="qT"),
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, prefix="per_row", mask="float-B1NqNk", grads="kv"),
    C(B=2, Hq=4, Hkv=1, Nq=17, Nk=17, P=63, D=16, causal=True, prefix="bank", layout="qT", grads="prefix"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=0, D=16, kpm="allpad"),
    C(B=3, Hq=2, Hkv=1, Nq=113, Nk=113, P=0, D=80, causal=True, prefix="none", kpm="right", grads="q"),
    C(B=2, Hq=4, Hkv=2, Nq=5, Nk=0, P=7, D=32),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=33, P=63, D=256, causal=True),
    C(B=1, Hq=6, Hkv=2, Nq=113, Nk=113, P=257, D=128, causal=True, layout="qT+kvslice"),
    # 16-bit
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank", dtype="fp16"),
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank", dtype="bf16"),
    C(B=1, Hq=2, Hkv=1, Nq=1, Nk=300, P=257, D=128, kpm="left", dtype="fp16"),
    C(B=2, Hq=4, Hkv=1, Nq=64, Nk=100, P=63, D=128, prefix="per_row", mask="float-B1NqNk", layout="qT", dtype="bf16"),
    C(B=2, Hq=8, Hkv=2, Nq=50, Nk=50, P=15, D=64, causal=True, prefix="bank", kpm="int_right", grads="prefix", dtype="bf16"),
    C(B=2, Hq=4, Hkv=2, Nq=17, Nk=40, P=7, D=256, mask="bool-NqNk", dtype="fp16"),
    C(B=2, Hq=4, Hkv=2, Nq=33, Nk=47, P=5, D=64, kpm="left", mask="fmin-B11Nk", dtype="bf16"),
    # the cuda backend's tensor-core kernels (16-bit, head dims multiple of 16), beyond the above:
    # D = 256 with a tail in every tile and Nk < Nq; MQA with a bank and strided views (the
    # element-wise tile loads); q with a column stride (D = 32's bucket); large scores at D = 96
    C(B=2, Hq=4, Hkv=2, Nq=130, Nk=97, P=70, D=256, causal=True, dtype="bf16"),
    C(B=3, Hq=4, Hkv=1, Nq=77, Nk=150, P=40, D=64, causal=True, prefix="bank", kpm="left", layout="qT+kvslice",
      dtype="fp16"),
    C(B=2, Hq=2, Hkv=2, Nq=23, Nk=29, P=5, D=32, layout="qstride2", dtype="bf16"),
    C(B=2, Hq=4, Hkv=2, Nq=65, Nk=130, P=17, D=96, causal=True, amp=30, dtype="fp16"),
]
_IN_GPU_TIER = set(GPU_TIER_CASES)


def _case_param(c):
    """pytest.param for a case, marked gpu_tier when the case is in GPU_TIER_CASES."""
    return pytest.param(c, id=c.id(), marks=[pytest.mark.gpu_tier] if c in _IN_GPU_TIER else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [_case_param(c) for c in ALL_CASES]
    + [_case_param(c) for c in GPU_TIER_CASES if c not in ALL_CASES]
    + [pytest.param(c, id=f"slow{i}-{c.id()}", marks=pytest.mark.slow) for i, c in enumerate(SLOW_RANDOM_CASES)],
)
def test_matches_reference(case, backend):
    x = make_inputs(case, device=device_for(backend))
    before = [t.clone() for t in _input_tensors(x)]
    ours = run_attention(x, backend)
    for old, new in zip(before, _input_tensors(x)):
        assert torch.equal(old, new), "an input was modified in place"
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, case)
    if case.kpm != "none":
        _check_padded_key_grads_are_zero(case, ours)
    if case.prefix == "bank":
        _check_unused_bank_entries_are_zero(case, ours)


def _input_tensors(x):
    masks = [x.key_padding_mask, x.attn_mask, x.prefix_index, x.dout_leaf]
    return [t.detach() for t in list(x.leaves.values()) + masks if t is not None]


def _check_padded_key_grads_are_zero(c, ours):
    """A padded key is invisible to every query: its dk and dv must be exactly 0."""
    lengths = padding_lengths(c)
    for name in ("k", "v"):
        g = ours.grads[name]
        if g is None:
            continue
        for b, n in enumerate(lengths):
            left = c.kpm in ("left", "int_left") or (c.kpm == "allpad" and b % 2 == 1)
            padded = g[b, :, : c.Nk - n] if left else g[b, :, n:]
            assert torch.count_nonzero(padded) == 0, f"d{name} nonzero on padded keys of row {b}"


def _check_unused_bank_entries_are_zero(c, ours):
    used = set(bank_index(c).tolist())
    for name in ("prefix_k", "prefix_v"):
        g = ours.grads[name]
        if g is None:
            continue
        for t in range(c.n_bank):
            if t not in used:
                assert torch.count_nonzero(g[t]) == 0, f"d{name}[{t}] nonzero but entry {t} is unused"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] == "cpu"])
@pytest.mark.parametrize("threads", [1, 3])
def test_other_thread_counts(threads, backend):
    """The work split over threads must not change the answer (1 thread: no split; 3
    threads on 2 cores: an odd split)."""
    case = C(B=3, Hq=4, Hkv=1, Nq=77, Nk=150, P=40, D=64, causal=True, prefix="bank", kpm="left")
    x = make_inputs(case, device=device_for(backend))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = run_attention(x, backend)
        det = run_attention(x.cast(case.torch_dtype), backend, deterministic=True)
    finally:
        torch.set_num_threads(saved)
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, case)
    check_against_reference(det, lo, hi, case, what="deterministic ")


@pytest.mark.gpu_tier
def test_nan_poison_fixture_is_active():
    """The fixture this module relies on: Python-allocated buffers start as NaN."""
    for t in (torch.empty(5), torch.empty_like(torch.zeros(3, 2)), torch.zeros(2).new_empty(4),
              torch.empty_strided((2, 3), (1, 2))):
        assert torch.isnan(t).all()
    assert not torch.isnan(torch.empty(3, dtype=torch.int64).float()).any()  # ints untouched


# --------------------------------------------------------------------------- fully masked rows

MASKED_ROW_CASES = [
    C(B=2, Hq=4, Hkv=2, Nq=40, Nk=9, P=0, D=32, causal=True, prefix="none"),
    C(B=2, Hq=4, Hkv=2, Nq=40, Nk=9, P=0, D=32, causal=True, prefix="shared"),
    C(B=2, Hq=4, Hkv=2, Nq=40, Nk=9, P=0, D=32, causal=True, prefix="bank", dtype="bf16"),
    C(B=3, Hq=2, Hkv=2, Nq=21, Nk=30, P=0, D=64, kpm="allpad"),
    C(B=2, Hq=2, Hkv=1, Nq=30, Nk=30, P=0, D=64, prefix="none", mask="bool-Nq1", dtype="fp16"),
    C(B=2, Hq=2, Hkv=1, Nq=30, Nk=30, P=0, D=64, prefix="none", mask="float-Nq1"),
    C(B=2, Hq=2, Hkv=1, Nq=5, Nk=0, P=0, D=32, prefix="none"),
]


@pytest.mark.gpu_tier
@pytest.mark.parametrize("lse_grad", [False, True], ids=["dout", "dout-dlse"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id()) for c in MASKED_ROW_CASES])
def test_fully_masked_rows(case, backend, lse_grad):
    """P == 0 and every key hidden: out is exactly 0, lse is -inf, nothing is NaN, and
    those queries get dq == 0, also with a (random, nonzero) gradient on their lse, as when two
    calls are merged by their log-sum-exps (the HF integration's T5 path)."""
    x = make_inputs(case, device=device_for(backend))
    if case.mask.startswith("float"):
        # make the masked rows fully -inf (a random float mask rarely masks a whole row)
        x.attn_mask = torch.where(
            torch.arange(case.Nq, device=x.attn_mask.device).view(-1, 1) % 3 == 0,
            torch.full_like(x.attn_mask, -math.inf),
            x.attn_mask,
        )
    ours = run_attention(x, backend, lse_grad=lse_grad)
    if lse_grad:
        lo = run_attention(x.cast(case.torch_dtype), "reference", lse_grad=True)
        hi = run_attention(x.cast(torch.float64), "reference", lse_grad=True)
        hi.recompute_rel = reference_pair(x)[1].recompute_rel
    else:
        lo, hi = reference_pair(x)
    masked = torch.isneginf(hi.lse)
    assert masked.any(), "test setup: no fully masked row"
    assert case.Nk == 0 or not masked.all(), "test setup: every row masked"
    out_masked = ours.out.masked_select(masked.unsqueeze(-1))
    assert torch.equal(out_masked, torch.zeros_like(out_masked)), "out of a fully masked row is not exactly 0"
    assert torch.equal(torch.isneginf(ours.lse), masked), "lse is -inf exactly on the fully masked rows"
    for name, g in ours.grads.items():
        if g is not None:
            assert torch.isfinite(g).all(), f"d{name} not finite"
    dq = ours.grads["q"]
    dq_masked = dq.masked_select(masked.unsqueeze(-1))
    assert torch.count_nonzero(dq_masked) == 0, "dq of a fully masked query is not 0"
    check_against_reference(ours, lo, hi, case)


# --------------------------------------------------------------------------- other upstream gradients

LSE_GRAD_CASES = [
    C(B=2, Hq=4, Hkv=2, Nq=113, Nk=203, P=63, D=80, causal=True, prefix="bank"),
    C(B=3, Hq=4, Hkv=1, Nq=17, Nk=40, P=1, D=64, kpm="left", mask="float-B1NqNk", layout="qT", grads="prefix"),
    C(B=2, Hq=2, Hkv=2, Nq=33, Nk=17, P=5, D=64, causal=True, grads="q"),
    C(B=2, Hq=4, Hkv=2, Nq=31, Nk=47, P=15, D=128, prefix="per_row", dtype="bf16"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id(), marks=[pytest.mark.gpu_tier] * (i < 2))
                                  for i, c in enumerate(LSE_GRAD_CASES)])
def test_lse_gradient(case, backend):
    """lse is differentiable too (d lse / d s = softmax): a loss on out and lse."""
    x = make_inputs(case, device=device_for(backend))
    ours = run_attention(x, backend, lse_grad=True)
    lo = run_attention(x.cast(case.torch_dtype), "reference", lse_grad=True)
    hi = run_attention(x.cast(torch.float64), "reference", lse_grad=True)
    check_against_reference(ours, lo, hi, case)


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, id=c.id())
        for c in [
            C(B=2, Hq=4, Hkv=2, Nq=37, Nk=45, P=9, D=64, causal=True, prefix="bank"),
            C(B=2, Hq=4, Hkv=1, Nq=37, Nk=45, P=9, D=64, kpm="right", dtype="fp16"),
        ]
    ],
)
def test_backward_of_sum(case, backend):
    """loss = out.sum() hands the backward a dout with all strides 0."""
    x = make_inputs(case, device=device_for(backend))
    x.dout_leaf = torch.ones((), dtype=case.torch_dtype, device=x.dout_leaf.device)
    x.dout_view = lambda t: t.expand(case.B, case.Hq, case.Nq, case.D)
    ours = run_attention(x, backend)
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, case)


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "shape",
    [dict(B=0), dict(Nq=0), dict(B=0, prefix="bank"), dict(Nq=0, Nk=0, P=0)],
    ids=["B0", "Nq0", "B0-bank", "Nq0-Nk0-P0"],
)
def test_empty_problem(shape, backend):
    """Zero-size dimensions return zero-size results (and zero gradients), no crash."""
    c = C(**{**dict(B=2, Hq=4, Hkv=2, Nq=5, Nk=7, P=3, D=32, causal=True), **shape})
    x = make_inputs(c, device=device_for(backend))
    ours = run_attention(x, backend)
    assert ours.out.shape == (c.B, c.Hq, c.Nq, c.D)
    assert ours.lse.shape == (c.B, c.Hq, c.Nq)
    for name, g in ours.grads.items():
        assert g is not None and g.shape == x.tensors()[name].shape
        assert torch.count_nonzero(g) == 0, f"d{name} not zero"


# --------------------------------------------------------------------------- odd head dims and dtypes


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [8, 59, 512])
def test_unusual_head_dim_is_right_or_refused(D, backend):
    """A head dim a backend cannot run must be refused with a message naming the head
    dim; one it accepts must be right."""
    c = C(B=1, Hq=2, Hkv=1, Nq=13, Nk=21, P=5, D=D, causal=True)
    x = make_inputs(c, device=device_for(backend))
    try:
        ours = run_attention(x, backend)
    except (ValueError, TypeError, NotImplementedError) as e:
        msg = str(e).lower()
        assert "head" in msg or "dim" in msg or str(D) in msg, f"refusal does not name the head dim: {e}"
        return
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, c)


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_is_right_or_refused(backend):
    c = C(B=2, Hq=2, Hkv=1, Nq=13, Nk=21, P=5, D=32, causal=True, dtype="fp64")
    x = make_inputs(c, device=device_for(backend))
    try:
        ours = run_attention(x, backend)
    except (ValueError, TypeError, NotImplementedError) as e:
        assert "dtype" in str(e) or "float64" in str(e), f"refusal does not name the dtype: {e}"
        return
    lo, hi = reference_pair(x)
    check_against_reference(ours, lo, hi, c)


# --------------------------------------------------------------------------- gradient consistency


def _prefix_grads(x, backend):
    r = run_attention(x, backend)
    return r, r.grads["prefix_k"], r.grads["prefix_v"]


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_shared_prefix_grad_is_sum_of_per_row_grads(causal, backend):
    """The kernel's in-kernel reduction of a shared prefix's gradient must equal the
    per-row gradients summed over the batch (independent of the reference)."""
    c = C(B=3, Hq=4, Hkv=1, Nq=37, Nk=45, P=19, D=64, causal=causal, kpm="left")
    shared = make_inputs(c, device=device_for(backend))
    rows = as_per_row_prefix(shared, "per_row")
    r_shared, gk_shared, gv_shared = _prefix_grads(shared, backend)
    r_rows, gk_rows, gv_rows = _prefix_grads(rows, backend)
    torch.testing.assert_close(r_shared.out, r_rows.out, rtol=1e-6, atol=1e-6)
    for name, got, per_row in (("prefix_k", gk_shared, gk_rows), ("prefix_v", gv_shared, gv_rows)):
        assert got.shape == (c.Hkv, c.P, c.D), f"d{name} shape {tuple(got.shape)}"
        scale = per_row.abs().max().item()
        torch.testing.assert_close(got, per_row.sum(0), rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"d{name}: {m}")


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_grad_is_scatter_of_per_row_grads(backend):
    """A bank's gradient is the per-row gradients added into the entries the rows
    used, and exactly zero in the entries no row used."""
    c = C(B=5, Hq=4, Hkv=2, Nq=29, Nk=37, P=11, D=32, causal=True, prefix="bank", T=7)
    bank = make_inputs(c, device=device_for(backend))
    index = torch.tensor([4, 1, 4, 4, 1], device=bank.prefix_index.device)
    bank.prefix_index = index
    rows = as_per_row_prefix(bank, "per_row", gather=index)
    r_bank, gk_bank, gv_bank = _prefix_grads(bank, backend)
    r_rows, gk_rows, gv_rows = _prefix_grads(rows, backend)
    torch.testing.assert_close(r_bank.out, r_rows.out, rtol=1e-6, atol=1e-6)
    for name, got, per_row in (("prefix_k", gk_bank, gk_rows), ("prefix_v", gv_bank, gv_rows)):
        want = torch.zeros_like(got).index_add_(0, index, per_row)
        scale = per_row.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"d{name}: {m}")
        for t in (0, 2, 3, 5, 6):
            assert torch.count_nonzero(got[t]) == 0, f"d{name}[{t}] nonzero for an unused entry"


def as_per_row_prefix(x, mode, gather=None):
    """The same problem with the prefix given one per row: a shared prefix repeated
    B times, or the bank entries each row uses gathered."""
    c = dataclasses.replace(x.case, prefix=mode)
    leaves = dict(x.leaves)
    for name in ("prefix_k", "prefix_v"):
        p = x.view[name](x.leaves[name]).detach()
        p = p[gather] if gather is not None else p.unsqueeze(0).expand(c.B, *p.shape)
        leaves[name] = p.contiguous().requires_grad_(c.requires_grad(name))
    for name in ("q", "k", "v"):
        leaves[name] = x.leaves[name].detach().clone().requires_grad_(c.requires_grad(name))
    view = dict(x.view, prefix_k=lambda t: t, prefix_v=lambda t: t)
    return dataclasses.replace(x, case=c, leaves=leaves, view=view, prefix_index=None)


# --------------------------------------------------------------------------- work not done


def _kernel_calls(log, op):
    # the extension's op (cpu, cuda) or the triton backend's (prefix_attn::triton_fwd / triton_bwd)
    return log.named(f"prefix_attn.{op}.") + log.named(f"prefix_attn.triton_{op}.")


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
@pytest.mark.parametrize("grads", ["none", "prefix", "q", "kv", "all"])
def test_only_requested_grads_are_computed(grads, backend):
    """With only the prefix trainable (frozen model) the backward must not compute dq,
    dk or dv at all: the bwd op is asked for exactly the grads that are needed, and
    hands back empty tensors for the others."""
    c = C(B=2, Hq=4, Hkv=2, Nq=19, Nk=23, P=5, D=32, causal=True, grads=grads)
    x = make_inputs(c, device=device_for(backend))
    with OpLog() as log:
        run_attention(x, backend)
    fwd = _kernel_calls(log, "fwd")
    bwd = _kernel_calls(log, "bwd")
    assert len(fwd) == 1, f"expected one prefix_attn.fwd call, got {len(fwd)}"
    if grads == "none":
        assert bwd == [], "backward ran although nothing requires grad"
        return
    assert len(bwd) == 1, f"expected one prefix_attn.bwd call, got {len(bwd)}"
    flags = {k: bool(bwd[0][k]) for k in ("need_dq", "need_dkv", "need_dprefix")}
    want = {
        "need_dq": c.requires_grad("q"),
        "need_dkv": c.requires_grad("k") or c.requires_grad("v"),
        "need_dprefix": c.requires_grad("prefix_k") or c.requires_grad("prefix_v"),
    }
    assert flags == want, f"bwd asked for {flags}, needed {want}"


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_shared_prefix_grad_never_materialized_per_row(backend):
    """No [B, Hkv, P, D] tensor is ever allocated for a shared prefix (its gradient is
    reduced inside the kernels)."""
    c = C(B=3, Hq=4, Hkv=2, Nq=7, Nk=11, P=5, D=16, causal=True)
    x = make_inputs(c, device=device_for(backend))
    with OpLog() as log:
        run_attention(x, backend)
    per_row = (c.B, c.Hkv, c.P, c.D)
    offenders = [
        name
        for name, _, shapes in log.calls
        for shape, stride in shapes
        if shape == per_row and stride[0] != 0
    ]
    assert offenders == [], f"ops produced a per-row prefix tensor {per_row}: {offenders}"


@pytest.mark.gpu_tier
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_strided_inputs_are_not_copied(backend):
    """A transposed [B, N, H, D] q and sliced k / v reach the kernel as views: no
    Python-side copy (clone / contiguous / copy_) of them."""
    c = C(B=2, Hq=4, Hkv=2, Nq=19, Nk=23, P=5, D=32, causal=True, layout="qT+kvslice", grads="all")
    x = make_inputs(c, device=device_for(backend))
    storages = {
        x.leaves[n].untyped_storage().data_ptr(): n for n in ("q", "k", "v")
    }
    with OpLog() as log:
        run_attention(x, backend)
    copied = []
    for name, bound, _ in log.calls:
        if any(op in name for op in ("clone", "copy_", "_to_copy", "contiguous")):
            for value in bound.values():
                if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() in storages:
                    copied.append((name, storages[value.untyped_storage().data_ptr()]))
    assert copied == [], f"strided inputs were copied: {copied}"
