"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with prefix tuning: 2 processes, gloo, on CPU.

The frozen base model is sharded layer by layer; the prefix shards with the root unit (or with a
unit of its own). After backward, every rank holds the same prefix gradient: the mean of the two
halves' gradients, as one process computes it without FSDP; one AdamW step on the shards gives
the same prefix; save_prefix from the sharded model writes the whole prefix, and load_prefix puts
it back into a freshly sharded one. The ranks run tests/integrations/fsdp_worker.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from hf_testing import HERE, run_ranks

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not torch.distributed.is_available() or \
        not torch.distributed.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo and FSDP2 (fully_shard)", allow_module_level=True)

CASES = ("root", "root_gc", "root_mlp", "own_unit")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("fsdp")
    run_ranks(os.path.join(HERE, "fsdp_worker.py"), str(out))
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]


def _names(results, prefix):
    names = sorted(key[len(prefix):] for key in results if key.startswith(prefix))
    assert names, f"no results under {prefix}"
    return names


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_prefix_gradient_and_step_match_one_process(ranks, case):
    rank0, rank1 = ranks
    assert rank0[f"{case}/sharded"].item() == 1, "the prefix was not sharded by fully_shard"
    assert rank0[f"{case}/frozen_grads"].item() == 0 and rank1[f"{case}/frozen_grads"].item() == 0
    for name in _names(rank0, f"{case}/grad/"):
        grad, expected = rank0[f"{case}/grad/{name}"], rank0[f"{case}/expected_grad/{name}"]
        assert expected.abs().sum() > 0, name
        assert torch.equal(grad, rank1[f"{case}/grad/{name}"]), f"{name}: the ranks disagree"
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7, msg=lambda m: f"{case} {name} grad: {m}")
        step, expected_step = rank0[f"{case}/step/{name}"], rank0[f"{case}/expected_step/{name}"]
        torch.testing.assert_close(step, expected_step, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{case} {name} after AdamW: {m}")


def test_fsdp2_save_and_load_the_whole_prefix(ranks):
    rank0, rank1 = ranks
    names = _names(rank0, "saved/")
    assert names == ["weight"]
    saved = rank0["saved/weight"]
    assert torch.equal(saved, rank0["root/step/weight"])  # the whole prefix, not a shard
    for results in (rank0, rank1):
        assert torch.equal(results["loaded/weight"], saved)
        assert results["loaded/grad_finite"].item() == 1
