"""Training a prefix-tuned model: gradients against the oracle, gradient checkpointing,
torch.compile (forward and backward, no graph break), the HF Trainer, and DDP over gloo."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from hf_testing import HERE, Rows, oracle_copy, padded_batch, run_ranks, tiny_model
from prefix_attn.integrations.transformers import add_prefix_tuning, get_prefix_encoder

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _model(family="llama", **kwargs):
    torch.manual_seed(11)
    model = add_prefix_tuning(tiny_model(family), 4, **kwargs)
    model.train()
    return model


def _prefix_grads(model, **inputs):
    for p in model.parameters():
        p.grad = None
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.prefix_encoder.named_parameters()}


def _assert_grads_close(got, expected, rtol=1e-4, atol=1e-6):
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
def test_prefix_gradient_matches_oracle(projection):
    model = _model(prefix_projection=projection, encoder_hidden_size=16)
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    _, got = _prefix_grads(model, **inputs)
    oracle = oracle_copy(model).double()
    _, expected = _prefix_grads(oracle, **inputs)
    _assert_grads_close(got, {n: g.float() for n, g in expected.items()})
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("prefix_encoder"))


def test_attention_dropout_trains_on_the_oracles_stream():
    """A config with attention dropout (GPT-2, BERT and RoBERTa default to 0.1) trains: in train
    mode every layer's attention drops, prefix and sequence probabilities alike, by the stream
    the float64 oracle applies under the same seed; in eval nothing drops."""
    from prefix_attn import _dropout

    torch.manual_seed(11)
    model = add_prefix_tuning(tiny_model(attention_dropout=0.3), 4)
    model.train()
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    torch.manual_seed(5)
    with _dropout.record_masks() as calls:
        loss, got = _prefix_grads(model, **inputs)
    assert [c.dropout_p for c in calls] == [0.3] * model.config.num_hidden_layers
    oracle = oracle_copy(model).double()
    torch.manual_seed(5)
    oracle_loss, expected = _prefix_grads(oracle, **inputs)
    torch.testing.assert_close(loss, oracle_loss.float(), rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, {n: g.float() for n, g in expected.items()})

    model.eval()
    with _dropout.record_masks() as calls, torch.no_grad():
        eval_loss = model(**inputs).loss
    assert calls == [] and not torch.equal(eval_loss, loss), "eval mode must not drop"


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing(reentrant):
    """Same loss and prefix gradients with checkpointing (PEFT's prefix tuning refuses it)."""
    model = _model()
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids)
    loss, expected = _prefix_grads(model, **inputs)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.model.layers[0].gradient_checkpointing
    loss_gc, got = _prefix_grads(model, **inputs)
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    _assert_grads_close(got, expected, rtol=0, atol=0)


def _compiled_vs_eager(model, backend, **inputs):
    _, expected = _prefix_grads(model, **inputs)
    with torch.no_grad():
        expected_logits = model(**inputs).logits
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: any graph break raises
    loss, got = _prefix_grads(compiled, **inputs)
    with torch.no_grad():
        logits = compiled(**inputs).logits
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    _assert_grads_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
def test_compile_fullgraph_forward_and_backward(projection, fresh_dynamo):
    """fullgraph=True: the whole model, attention and its backward included, in one graph.
    aot_eager traces exactly what inductor gets (dynamo + AOT autograd) in a fraction of the time."""
    model = _model(prefix_projection=projection, encoder_hidden_size=16)
    ids, mask = padded_batch()
    _compiled_vs_eager(model, "aot_eager", input_ids=ids, attention_mask=mask, labels=ids)


def test_compile_fullgraph_bank(fresh_dynamo):
    model = _model(num_tasks=3)
    ids, mask = padded_batch()
    _compiled_vs_eager(model, "aot_eager", input_ids=ids, attention_mask=mask, labels=ids,
                       prefix_index=torch.tensor([2, 0, 1]))


@pytest.mark.slow
def test_compile_inductor_forward_and_backward(fresh_dynamo):
    model = _model()
    ids, mask = padded_batch()
    _compiled_vs_eager(model, "inductor", input_ids=ids, attention_mask=mask, labels=ids)


# --------------------------------------------------------------------------- HF Trainer


@pytest.mark.parametrize("mode", ["plain", "checkpointing", "bank"])
def test_trainer_trains_only_the_prefix(mode, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _model(num_tasks=2 if mode == "bank" else 1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("prefix_encoder")}
    prefix_before = model.prefix_encoder.weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        # tokens from a small alphabet: a prefix alone can learn to favour it
        ids = torch.randint(1, 9, (12,), generator=g)
        row = {"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids}
        if mode == "bank":
            row["prefix_index"] = torch.tensor(i % 2)
        rows.append(row)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12,
                             learning_rate=5e-2, logging_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True, gradient_checkpointing=mode == "checkpointing",
                             remove_unused_columns=mode != "bank", dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    changed = (model.prefix_encoder.weight - prefix_before).abs().sum(dim=(0, 1, 3, 4, 5))
    assert (changed > 0).all(), changed  # every task's entry trained


# --------------------------------------------------------------------------- DDP

def test_ddp_prefix_gradients_agree(tmp_path):
    """2 processes, gloo on CPU: after backward both ranks hold the same prefix gradient, the mean
    of the two halves' gradients (with and without gradient checkpointing)."""
    run_ranks(os.path.join(HERE, "ddp_worker.py"), str(tmp_path))
    from safetensors.torch import load_file

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    for key in ("ddp_gc0", "ddp_gc1"):
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], rank0["expected"], rtol=1e-5, atol=1e-7)
    assert rank0["expected"].abs().sum() > 0


# --------------------------------------------------------------------------- SmolLM2

def test_smollm2_training_step_with_checkpointing(smollm2):
    model, tok = smollm2
    model = add_prefix_tuning(copy.deepcopy(model), 8)
    model.train()
    batch = tok(["Prefix tuning keeps the model frozen.", "Only the prefix learns."], return_tensors="pt",
                padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss, expected = _prefix_grads(model, **batch, labels=labels)
    model.gradient_checkpointing_enable()
    loss_gc, got = _prefix_grads(model, **batch, labels=labels)
    assert torch.isfinite(loss) and torch.equal(loss, loss_gc)
    _assert_grads_close(got, expected, rtol=0, atol=0)
    assert get_prefix_encoder(model).weight.grad.abs().sum() > 0
