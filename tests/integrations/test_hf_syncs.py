"""Host synchronisations in a Hugging Face training step with prefix tuning: none on CUDA; and
no graph break under torch.compile.

A host read per layer (or per step) waits for the GPU and keeps the step out of a CUDA graph.
The integration reads nothing back: prefix_index's range is checked by the attention ops
(a device assert on CUDA), and the padding mask is not tested for "all ones" on CUDA.
On CPU the step runs its CUDA path with the device decision forced (see tests/test_syncs.py),
on the Python reference backend, whose every op the counter sees: item / bool / int / float
reach the dispatcher (HostReads), tolist / numpy do not and are counted at the Python level.
On a GPU (the GPU tier), torch.cuda.set_sync_debug_mode("error") checks the real step, and the
step is captured in a CUDA graph and replayed.
"""
import contextlib

import pytest
import torch

from attn_testing import HostReads, assert_no_cuda_sync, kernel_backends
from hf_testing import padded_batch, tiny_model
from prefix_attn import _inputs
from prefix_attn.integrations.transformers import add_prefix_tuning, remove_prefix_tuning

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _bank_model(device="cpu", dtype=torch.float32):
    return add_prefix_tuning(tiny_model("llama").to(device=device, dtype=dtype), 4, num_tasks=3)


@contextlib.contextmanager
def _python_reads(monkeypatch):
    """Counts Tensor.tolist() and Tensor.numpy(): host reads that never reach the dispatcher."""
    seen = []
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            seen.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    try:
        yield seen
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_training_step_cuda_path_reads_nothing_back(monkeypatch, checkpointing):
    monkeypatch.setattr(_inputs, "_host_reads_are_free", lambda t: False)
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "reference")
    model = _bank_model()
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids, mask = padded_batch(batch=2)
    task = torch.tensor([2, 0])
    model(input_ids=ids, attention_mask=mask, labels=ids, prefix_index=task).loss.backward()  # warm-up
    layers = model.config.num_hidden_layers
    for attention_mask in (mask, torch.ones_like(mask), None):
        with pytest.MonkeyPatch.context() as patch, _python_reads(patch) as python_reads, HostReads() as counter:
            model(input_ids=ids, attention_mask=attention_mask, labels=ids, prefix_index=task).loss.backward()
        assert counter.reads == [] and python_reads == [], f"host reads in one step: {counter.reads + python_reads}"
        # one range check per layer on the device, and again for each layer recomputed by checkpointing
        assert counter.asserts == layers * (2 if checkpointing else 1)
    remove_prefix_tuning(model)


def test_the_counters_see_host_reads(monkeypatch):
    """The counters are not blind: a step that reads a value back is caught (else the test above
    would pass for any code)."""
    monkeypatch.setattr(_inputs, "_host_reads_are_free", lambda t: False)
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "reference")
    model = _bank_model()
    ids, mask = padded_batch(batch=2)
    task = torch.tensor([2, 0])
    with pytest.MonkeyPatch.context() as patch, _python_reads(patch) as python_reads, HostReads() as counter:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, prefix_index=task).loss
        bool(mask.all()), task.tolist(), loss.item()
    assert counter.reads.count("aten._local_scalar_dense") + counter.reads.count("aten.is_nonzero") >= 2
    assert python_reads == ["tolist"]
    remove_prefix_tuning(model)


# --------------------------------------------------------------------------- torch.compile

def _explain(model, **inputs):
    explanation = torch._dynamo.explain(model)(**inputs)
    reasons = [str(b.reason) for b in explanation.break_reasons]
    return explanation, reasons


def test_no_graph_break_training_forward_and_decode_step(fresh_dynamo):
    """torch._dynamo.explain over the training forward (loss included) and over one decoding
    step on a DynamicCache: one graph, no break (the attention function, the mask function and
    the decoder's hook all trace). Backward and the compiled result are checked against eager in
    test_hf_training.py (fullgraph=True)."""
    model = _bank_model()
    model.train()
    ids, mask = padded_batch(batch=3)
    task = torch.tensor([2, 0, 1])
    explanation, reasons = _explain(model, input_ids=ids, attention_mask=mask, labels=ids, prefix_index=task)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons
    model.eval()
    torch._dynamo.reset()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, prefix_index=task)
        cache = getattr(out, "cache", None) or out.past_key_values
        step = out.logits[:, -1:].argmax(-1)
        explanation, reasons = _explain(model, input_ids=step, attention_mask=torch.cat([mask, torch.ones_like(step)], 1),
                                        past_key_values=cache, use_cache=True, prefix_index=task)
    assert not [r for r in reasons if "prefix_attn" in r or "attention" in r.lower()], reasons
    assert explanation.graph_break_count == 0, reasons
    remove_prefix_tuning(model)


# --------------------------------------------------------------------------- on a GPU

CUDA_BACKENDS = [b for b in kernel_backends() if b in ("triton", "cuda")] or \
    [pytest.param("triton", marks=pytest.mark.skip("no CUDA backend"))]


@pytest.mark.gpu_tier
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16-checkpointing"])
def test_cuda_training_step_never_synchronises(backend, mode, monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", backend)
    model = _bank_model("cuda", torch.bfloat16 if mode.startswith("bf16") else torch.float32)
    model.train()
    if mode.endswith("checkpointing"):
        model.gradient_checkpointing_enable()
    ids, mask = (t.cuda() for t in padded_batch(batch=2))
    task = torch.tensor([2, 0], device="cuda")

    def step():
        model(input_ids=ids, attention_mask=mask, labels=ids, prefix_index=task).loss.backward()

    assert_no_cuda_sync(step)
    torch.cuda.synchronize()
    remove_prefix_tuning(model)


@pytest.mark.gpu_tier
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_training_step_in_a_cuda_graph(backend, monkeypatch):
    """Forward and backward of the prefix-tuned model captured whole in a CUDA graph (possible only
    with no host synchronisation) and replayed: the same loss and prefix gradient as eager."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", backend)
    model = _bank_model("cuda", torch.bfloat16)
    model.train()
    ids, mask = (t.cuda() for t in padded_batch(batch=2))
    task = torch.tensor([2, 0], device="cuda")
    weight = model.prefix_encoder.weight

    def step():
        return model(input_ids=ids, attention_mask=mask, labels=ids, prefix_index=task).loss

    weight.grad = None
    expected_loss = step()
    expected_loss.backward()
    expected_grad = weight.grad.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            weight.grad = None
            step().backward()
    torch.cuda.current_stream().wait_stream(side)
    weight.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    # bf16 attention with float atomics (deterministic=False): equal up to summation order
    torch.testing.assert_close(loss, expected_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(weight.grad, expected_grad, rtol=1e-2, atol=1e-4)
    assert expected_grad.abs().sum() > 0
    remove_prefix_tuning(model)
