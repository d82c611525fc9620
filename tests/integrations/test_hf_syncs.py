"""Host synchronisations in a Hugging Face training step with prefix tuning: none on CUDA.

A host read per layer (or per step) waits for the GPU and keeps the step out of a CUDA graph.
The integration reads nothing back: prefix_index's range is checked by the attention ops
(a device assert on CUDA), and the padding mask is not tested for "all ones" on CUDA.
On CPU the step runs its CUDA path with the device decision forced (see tests/test_syncs.py),
on the Python reference backend, whose every op the counter sees; on a GPU,
torch.cuda.set_sync_debug_mode("error") checks the real step.
"""
import pytest
import torch

from attn_testing import HostReads, assert_no_cuda_sync, kernel_backends
from hf_testing import padded_batch, tiny_model
from prefix_attn import _inputs
from prefix_attn.integrations.transformers import add_prefix_tuning, remove_prefix_tuning


def _bank_model(device="cpu"):
    return add_prefix_tuning(tiny_model("llama").to(device), 4, num_tasks=3)


def test_training_step_cuda_path_reads_nothing_back(monkeypatch):
    monkeypatch.setattr(_inputs, "_host_reads_are_free", lambda t: False)
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "reference")
    model = _bank_model()
    ids, mask = padded_batch(batch=2)
    task = torch.tensor([2, 0])
    model(input_ids=ids, attention_mask=mask, labels=ids, prefix_index=task).loss.backward()  # warm-up
    layers = model.config.num_hidden_layers
    for attention_mask in (mask, torch.ones_like(mask), None):
        with HostReads() as counter:
            model(input_ids=ids, attention_mask=attention_mask, labels=ids, prefix_index=task).loss.backward()
        assert counter.reads == [], f"host reads in one step: {counter.reads}"
        assert counter.asserts == layers  # one range check per layer, on the device
    remove_prefix_tuning(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", [b for b in kernel_backends() if b in ("triton", "cuda")] or
                         [pytest.param("triton", marks=pytest.mark.skip("no CUDA backend"))])
def test_cuda_training_step_never_synchronises(backend, monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", backend)
    model = _bank_model("cuda")
    ids, mask = (t.cuda() for t in padded_batch(batch=2))
    task = torch.tensor([2, 0], device="cuda")

    def step():
        model(input_ids=ids, attention_mask=mask, prefix_index=task).logits.sum().backward()

    assert_no_cuda_sync(step)
    torch.cuda.synchronize()
