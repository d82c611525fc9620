"""The Triton backend's tile configs and autotuning wiring, checked without a GPU.

What the compile check (`make triton-check`) cannot see: that the autotuner's key, reset and
restore names are real kernel arguments (a typo would only fail on the first GPU call), that the
defaults come first, and the switches that turn tuning off.
"""
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from prefix_attn.triton_backend import backward, configs, forward, tuning  # noqa: E402

KERNELS = {"fwd": forward._fwd_kernel, "dq": backward._bwd_dq_kernel, "dkv": backward._bwd_dkdv_kernel,
           "dprefix": backward._bwd_dprefix_kernel}


def _arg_names(kernel):
    return list(kernel.arg_names)


@pytest.mark.parametrize("kind", configs.KINDS)
def test_autotune_names_are_kernel_arguments(kind):
    names = set(_arg_names(KERNELS[kind]))
    for group in (tuning._KEYS[kind], tuning._RESET.get(kind, []), tuning._RESTORE.get(kind, [])):
        missing = [n for n in group if n not in names]
        assert not missing, f"{kind}: {missing} are not arguments of {KERNELS[kind]}"


@pytest.mark.skipif(configs.INTERPRET, reason="the interpreter has one config per kind")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D", [16, 24, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("kind", configs.KINDS)
def test_candidates(kind, D, dtype):
    cands = configs.candidates(kind, D, dtype)
    assert cands and len(set(cands)) == len(cands), "duplicate candidates"
    assert configs.default(kind, D, dtype) == cands[0]
    for c in cands:  # tl.dot needs 16-multiples; powers of two for tl.arange
        for n in (c.block_m, c.block_n):
            assert n >= 16 and n & (n - 1) == 0, c
        # every candidate fits the smallest opt-in shared memory of a supported GPU (sm_80: 163 KB)
        elem = 4 if dtype == torch.float32 else 2
        assert configs.shared_bytes_estimate(kind, c, configs.block_d(D), elem) <= 166912, c


def test_autotune_switch(monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_AUTOTUNE", "0")
    assert not configs.autotune_enabled()
    monkeypatch.setenv("PREFIX_ATTN_AUTOTUNE", "1")
    assert configs.autotune_enabled() == (not configs.INTERPRET)


@pytest.mark.skipif(configs.INTERPRET, reason="needs the GPU candidate lists")
def test_tuned_wrapper_prunes_by_shared_memory(monkeypatch):
    """A device with little shared memory keeps only the candidates that fit (at least one)."""
    monkeypatch.setattr(tuning, "_shared_limit", lambda device_index: 100_000)
    monkeypatch.setattr(tuning, "_TUNED", {})
    wrapper = tuning._tuned(KERNELS["fwd"], "fwd", 128, torch.bfloat16, 0)
    kept = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in wrapper.configs]
    cands = configs.candidates("fwd", 128, torch.bfloat16)
    want = [(c.block_m, c.block_n) for c in cands
            if configs.shared_bytes_estimate("fwd", c, 128, 2) <= 100_000]
    assert kept == (want or [(cands[0].block_m, cands[0].block_n)])
    assert len(kept) < len(cands)


def test_launch_uses_default_without_cuda():
    """On CPU tensors (the interpreter) launch never tunes: it runs the default, or a forced config."""
    calls = []

    class Fake:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append((grid, kwargs["BLOCK_M"], kwargs["BLOCK_N"]))
            return run

    x = torch.zeros(1)
    cfg = tuning.launch(Fake(), "fwd", lambda meta: (meta["BLOCK_M"],), 64, torch.float16, x)
    assert cfg == configs.default("fwd", 64, torch.float16)
    assert calls[-1] == ((cfg.block_m,), cfg.block_m, cfg.block_n)
    forced = configs.TileConfig(16, 16, 4, 1)
    tuning.FORCED["fwd"] = forced
    try:
        assert tuning.launch(Fake(), "fwd", lambda meta: (1,), 64, torch.float16, x) == forced
    finally:
        tuning.FORCED.clear()
