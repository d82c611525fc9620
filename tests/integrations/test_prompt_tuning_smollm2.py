"""Prompt tuning through the prefix kernel on the real SmolLM2-135M-Instruct (30 layers, GQA 9/3
heads): PEFT's logits for a text-initialised prompt, and (slow) that training halves the loss
on the task of examples/prefix_tune_smollm2.py. Skipped without the model's wheel."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_testing import assert_fp32_close
from prefix_attn.integrations.prompt_tuning import add_prompt_tuning, load_peft_prompt, save_peft_prompt

INIT_TEXT = "Reply with one line of JSON."


def test_smollm2_logits_match_peft(smollm2, tmp_path):
    model, tokenizer = smollm2
    ours = add_prompt_tuning(copy.deepcopy(model), 8, init_text=INIT_TEXT, tokenizer=tokenizer)
    save_peft_prompt(ours, str(tmp_path / "a"))
    from peft import PeftModel

    peft32 = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "a")).eval()
    peft64 = PeftModel.from_pretrained(copy.deepcopy(model).double(), str(tmp_path / "a")).double().eval()
    batch = tokenizer(["What is the capital of Peru?", "Name a colour."], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        ref32 = peft32(input_ids=ids, attention_mask=mask).logits[:, 8:]
        ref64 = peft64(input_ids=ids, attention_mask=mask).logits[:, 8:]
    assert_fp32_close("smollm2 prompt-tuning logits", got, ref32, ref64, valid=mask)
    # and a model that loads the adapter gives the same
    again = load_peft_prompt(copy.deepcopy(model), str(tmp_path / "a"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, attention_mask=mask).logits, got)


@pytest.mark.slow
def test_smollm2_prompt_tuning_halves_the_loss(smollm2):
    """30 AdamW steps on the capitals-in-JSON task (examples/prefix_tune_smollm2.py), a soft prompt
    of 16 tokens initialised from text: the loss of the last 5 steps is at most half that of the
    first 3. One to three minutes on 2 CPU cores (slow-marked)."""
    from prefix_tune_smollm2 import CAPITALS, CapitalsDataset, collate

    model, tokenizer = smollm2
    model = add_prompt_tuning(copy.deepcopy(model), 16, init_text=INIT_TEXT, tokenizer=tokenizer).train()
    data = CapitalsDataset(tokenizer, CAPITALS[:-8])
    make_batch = collate(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.prefix_encoder.parameters(), lr=3e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        pick = torch.randint(0, len(data), (8,), generator=g).tolist()
        loss = model(**make_batch([data[i] for i in pick])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last <= 0.5 * first, [round(x, 3) for x in losses]
