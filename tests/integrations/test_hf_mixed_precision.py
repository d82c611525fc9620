"""Mixed precision in the integration: transformers' Trainer with bf16=True (CPU autocast to
bfloat16, float32 master weights) trains every supported family, and its loss curve is PEFT's
within bfloat16 noise.

The rule is the tolerance rule of the kernel tests, over a loss curve: against the float32 run
(the oracle here, bfloat16's error dwarfs float32's), ours under bf16=True may be at most twice
as far as the same-precision reference under bf16=True, plus a floor of 1e-4 of the loss (the loss
is a mean: its bfloat16 noise is far below a bfloat16 unit; a lost prefix or mask moves it
by 1e-2 or more). The same-precision reference is PEFT's prefix tuning where PEFT runs the family
(decoders, BART, T5); for BERT / RoBERTa, which PEFT refuses, the test oracle's attention
(float64 over the concatenated prefix, hf_testing.oracle_copy) in the same model under the same
autocast, against our own float32 run. Dropout is off, so every run sees the same numbers.
"""
from __future__ import annotations

import copy

import pytest
import torch

from hf_testing import VOCAB, Rows, oracle_copy, prefix_attention, prefix_attention_replaced, random_prefix, tiny_model
from prefix_attn.integrations.transformers import add_prefix_tuning, get_prefix_encoder, load_peft_prefix

BF16_U = 2.0 ** -8
P = 5
STEPS = 6

NO_DROPOUT = {
    "llama": {}, "qwen2": {},
    "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bart": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "t5": dict(dropout_rate=0.0),
    "bert-seq": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta-token": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}
PEFT_TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bart": "SEQ_2_SEQ_LM",
             "t5": "SEQ_2_SEQ_LM"}


def _rows(family, model, n=4, length=12):
    """One batch of rows (every step trains on it, so the curve falls and its steps compare like
    with like), from a small alphabet (a prefix alone can learn to favour it), every other row
    with padding (right padding for encoders and encoder-decoders, left for decoders)."""
    g = torch.Generator().manual_seed(0)
    pad = model.config.pad_token_id
    rows = []
    for i in range(n):
        ids = torch.randint(3, 11, (length,), generator=g)
        mask = torch.ones(length, dtype=torch.long)
        if i % 2:
            if PEFT_TASK.get(family) == "CAUSAL_LM":
                mask[: 1 + i % 4] = 0
            else:
                mask[length - 1 - i % 4:] = 0
        ids = ids.masked_fill(mask == 0, pad)
        row = {"input_ids": ids, "attention_mask": mask}
        if family == "bert-seq":
            row["labels"] = torch.tensor(int(ids[1]) % 3)
        elif family == "roberta-token":
            row["labels"] = (ids % 3).masked_fill(mask == 0, -100)
        elif PEFT_TASK[family] == "SEQ_2_SEQ_LM":
            row["labels"] = torch.randint(3, 11, (6,), generator=g)
        else:
            row["labels"] = ids.masked_fill(mask == 0, -100)
        rows.append(row)
    return rows


def _train(model, rows, bf16, tmp_path):
    """Losses of STEPS Trainer steps (batch 4, AdamW), and the model."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / f"run-{bf16}"), per_device_train_batch_size=4,
                             max_steps=STEPS, learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1,
                             report_to="none",
                             save_strategy="no", use_cpu=True, bf16=bf16, disable_tqdm=True,
                             remove_unused_columns=False, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == STEPS
    return torch.tensor(losses, dtype=torch.float64)


def _peft_twin(base, family, path):
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type=PEFT_TASK[family],
                                                                       num_virtual_tokens=P))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in peft_model.prompt_encoder["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(path)
    return peft_model


def assert_curve_within_bf16_noise(name, ours, ref_lo, ref32):
    err_ours = (ours - ref32).abs().max().item()
    err_lo = (ref_lo - ref32).abs().max().item()
    floor = 1e-4 * ref32.abs().max().item()
    assert err_lo > 0, f"{name}: the bf16 reference equals the float32 run: bf16=True did not take effect"
    assert err_ours <= 2 * err_lo + floor, (
        f"{name}: loss curve {ours.tolist()} is {err_ours:.3g} from the float32 run {ref32.tolist()}, more than "
        f"2 x the bf16 reference's {err_lo:.3g} ({ref_lo.tolist()}) + floor {floor:.3g}")


@pytest.mark.parametrize("family", list(NO_DROPOUT))
def test_trainer_bf16_loss_curve(family, tmp_path):
    base = tiny_model(family, **NO_DROPOUT[family])
    rows = _rows(family, base)
    if family in PEFT_TASK:
        peft_model = _peft_twin(base, family, str(tmp_path / "peft"))
        ours = load_peft_prefix(copy.deepcopy(base), str(tmp_path / "peft"))
        ours32 = copy.deepcopy(ours)
        ref_lo, ref32 = copy.deepcopy(peft_model), peft_model
        ref_name = "PEFT"
    else:
        ours = random_prefix(add_prefix_tuning(copy.deepcopy(base), P))
        for p in ours.classifier.parameters():  # P-Tuning v2 trains the task head with the prefix
            p.requires_grad_(True)
        ref_lo, ref32 = oracle_copy(ours), copy.deepcopy(ours)
        ours32 = None
        ref_name = "oracle attention"
    table = get_prefix_encoder(ours).weight
    before = table.detach().clone()

    seen = []  # the dtypes our attention ran in under bf16=True

    def spy(q, *args, **kwargs):
        out = prefix_attention(q, *args, **kwargs)
        seen.append((out[0] if isinstance(out, tuple) else out).dtype)  # T5's calls return lse too
        return out

    with prefix_attention_replaced(spy):
        got = _train(ours, rows, True, tmp_path)
    assert seen and set(seen) == {torch.bfloat16}, seen
    lo = _train(ref_lo, rows, True, tmp_path)
    hi = _train(ref32, rows, False, tmp_path)
    assert_curve_within_bf16_noise(f"{family} vs {ref_name}", got, lo, hi)
    assert (got[1:] < got[:-1]).all(), f"{family}: the loss did not fall at every step: {got.tolist()}"
    # the float32 master table stays float32 and is what trained
    assert table.dtype == torch.float32 and get_prefix_encoder(ours).weight is table
    assert not torch.equal(table.detach(), before)
    if ours32 is not None:  # and our float32 run is PEFT's float32 run
        torch.testing.assert_close(_train(ours32, rows, False, tmp_path), hi, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_trainer_bf16_prompt_tuning_loss_curve(family, tmp_path):
    """Prompt tuning (its prompt pass and the prefix kernel) under bf16=True, against PEFT's prompt
    tuning. The first label is -100: PEFT also scores each row's first token from the prompt
    (see prefix_attn.integrations.prompt_tuning)."""
    from peft import PromptTuningConfig, get_peft_model

    from prefix_attn.integrations.prompt_tuning import load_peft_prompt

    base = tiny_model(family, **NO_DROPOUT[family])
    peft_model = get_peft_model(copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        weight = peft_model.prompt_encoder["default"].embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=g) * 0.5)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ours = load_peft_prompt(copy.deepcopy(base), str(tmp_path / "peft"))
    rows = _rows(family, base)
    for row in rows:
        row["labels"][0] = -100
    table = ours.prefix_encoder.embedding.weight
    before = table.detach().clone()
    got = _train(ours, rows, True, tmp_path)
    lo = _train(copy.deepcopy(peft_model), rows, True, tmp_path)
    hi = _train(peft_model, rows, False, tmp_path)
    assert_curve_within_bf16_noise(f"{family} prompt tuning vs PEFT", got, lo, hi)
    assert (got[1:] < got[:-1]).all(), f"the loss did not fall at every step: {got.tolist()}"
    assert table.dtype == torch.float32 and not torch.equal(table.detach(), before)


def test_compile_fullgraph_under_autocast(fresh_dynamo):
    """torch.compile(fullgraph=True) of a prefix-tuned Llama under CPU bf16 autocast: no graph
    break, the loss and the float32 prefix gradient equal to eager's under the same autocast."""
    model = random_prefix(add_prefix_tuning(tiny_model("llama"), P)).train()
    rows = _rows("llama", model)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(**batch)
        out.loss.backward()
        grad = get_prefix_encoder(model).weight.grad
        assert out.logits.dtype == torch.bfloat16 and grad.dtype == torch.float32
        results.append((out.loss.detach(), grad))
    (eager_loss, eager_grad), (loss, grad) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grad, eager_grad, rtol=2e-2, atol=1e-3)
    assert grad.abs().max() > 0
