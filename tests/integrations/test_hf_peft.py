"""Equivalence with PEFT prefix tuning: same adapter, same logits (float32 tolerance rule of
hf_testing.py), same greedy tokens. Tiny random Llama / Qwen2 / Mistral / Qwen3 configs (GQA, head_dim
!= hidden / heads; Qwen3 normalises q and k per head), GPT-2 (MHA, fused QKV, learned absolute
positions), and the real SmolLM2-135M-Instruct. Generation is checked against greedy decoding by
repeated PEFT forward passes (PEFT 0.21's own generate() drops the prefix under transformers 5)."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_testing import (assert_fp32_close, fix_peft_generate, padded_batch, peft_float64, peft_greedy, peft_twin,
                        tiny_model)
from prefix_attn.integrations.transformers import (add_prefix_tuning, get_prefix_encoder, init_prefix_from_text,
                                                   load_peft_prefix, save_peft_prefix)

FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "gpt2"]


def _setup(family, tmp_path, P=6, **peft_config):
    base = tiny_model(family)
    ours = copy.deepcopy(base)
    peft_model = peft_twin(base, P, str(tmp_path / "adapter"), **peft_config)
    load_peft_prefix(ours, str(tmp_path / "adapter"))
    return base, ours, peft_model


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_peft(family, projection, tmp_path):
    """Left-padded batch; PEFT trained with prefix_projection saves the MLP's output table."""
    config = dict(prefix_projection=True, encoder_hidden_size=32) if projection else {}
    base, ours, peft_model = _setup(family, tmp_path, **config)
    peft64 = peft_float64(base, str(tmp_path / "adapter"))
    ids, mask = padded_batch()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        ref32 = peft_model(input_ids=ids, attention_mask=mask).logits
        ref64 = peft64(input_ids=ids, attention_mask=mask).logits
    assert_fp32_close(f"{family} logits", got, ref32, ref64, valid=mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_peft_without_mask_and_with_position_ids(family, tmp_path):
    base, ours, peft_model = _setup(family, tmp_path)
    peft64 = peft_float64(base, str(tmp_path / "adapter"))
    ids, _ = padded_batch(batch=2, seed=3)
    ids[ids == 0] = 7
    positions = torch.arange(3, 3 + ids.shape[1]).unsqueeze(0)
    for kwargs in ({}, {"position_ids": positions}):
        with torch.no_grad():
            got = ours(input_ids=ids, **kwargs).logits
            ref32 = peft_model(input_ids=ids, **kwargs).logits
            ref64 = peft64(input_ids=ids, **kwargs).logits
        assert_fp32_close(f"{family} {sorted(kwargs)}", got, ref32, ref64)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_peft(family, tmp_path):
    base, ours, peft_model = _setup(family, tmp_path)
    fix_peft_generate(peft_model)
    ids, mask = padded_batch(seed=2)
    expected = peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected), f"\nours {got[:, ids.shape[1]:]}\npeft {expected[:, ids.shape[1]:]}"


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_greedy_generation_matches_peft_forward_passes(family, tmp_path):
    """The oracle that needs no fix of PEFT: greedy decoding by full PEFT forward passes, one per token."""
    _, ours, peft_model = _setup(family, tmp_path)
    ids, mask = padded_batch(seed=2)
    expected = peft_greedy(peft_model, ids, mask, max_new_tokens=10)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected), f"\nours {got[:, ids.shape[1]:]}\npeft {expected[:, ids.shape[1]:]}"


def test_bank_rows_match_their_peft_adapters(tmp_path):
    """Two PEFT adapters in one bank; a mixed batch gives each row its adapter's logits and tokens
    (PEFT can serve only one prefix per batch)."""
    base = tiny_model("llama")
    twins = [peft_twin(copy.deepcopy(base), 6, str(tmp_path / f"a{t}"), seed=10 + t) for t in range(2)]
    ours = add_prefix_tuning(copy.deepcopy(base), 6, num_tasks=2)
    for t in range(2):
        load_peft_prefix(ours, str(tmp_path / f"a{t}"), task=t)
    ids, mask = padded_batch(batch=4, seed=4)
    task = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask, prefix_index=task).logits
        for b in range(4):
            ref32 = twins[task[b]](input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
            ref64 = peft_float64(base, str(tmp_path / f"a{task[b]}"))(
                input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1]).logits
            assert_fp32_close(f"row {b}", got[b:b + 1], ref32, ref64, valid=mask[b:b + 1])
    tokens = ours.generate(input_ids=ids, attention_mask=mask, prefix_index=task, max_new_tokens=8, do_sample=False)
    for b in range(4):
        fix_peft_generate(twins[task[b]])
        ref = twins[task[b]].generate(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], max_new_tokens=8,
                                      do_sample=False)
        # a single row carries its own padding; compare the generated part
        assert torch.equal(tokens[b, ids.shape[1]:], ref[0, ids.shape[1]:]), b


def test_save_peft_prefix_loads_in_peft(tmp_path):
    from peft import PeftModel

    base = tiny_model("qwen2")
    ours = add_prefix_tuning(copy.deepcopy(base), 5, prefix_projection=True, encoder_hidden_size=16)
    save_peft_prefix(ours, str(tmp_path / "exported"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "exported")).eval()
    peft64 = peft_float64(base, str(tmp_path / "exported"))
    ids, mask = padded_batch()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        assert_fp32_close("exported", got, peft_model(input_ids=ids, attention_mask=mask).logits,
                          peft64(input_ids=ids, attention_mask=mask).logits, valid=mask)


# --------------------------------------------------------------------------- SmolLM2-135M

PROMPTS = ["The capital of France is", "Hi!", "Write one sentence about the sea:"]


def test_smollm2_logits_match_peft(smollm2, tmp_path):
    """Llama with GQA (9 heads, 3 KV heads, head dim 64, 30 layers), left padding, a random N(0, 1)
    prefix as PEFT initialises it. References: PEFT on SDPA and on eager attention in float32."""
    from peft import PeftModel

    model, tok = smollm2
    ours = copy.deepcopy(model)
    peft_model = peft_twin(copy.deepcopy(model), 16, str(tmp_path / "adapter"))
    load_peft_prefix(ours, str(tmp_path / "adapter"))
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    peft_eager = PeftModel.from_pretrained(eager, str(tmp_path / "adapter")).eval()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        got = ours(**batch).logits
        ref32 = peft_model(**batch).logits
        ref32_eager = peft_eager(**batch).logits
        del peft_eager, eager
        ref64 = peft_float64(model, str(tmp_path / "adapter"))(**batch).logits
    errors = assert_fp32_close("SmolLM2 logits", got, ref32, ref64, valid=batch["attention_mask"],
                               refs32=[ref32_eager])
    assert errors["ours"] < 1e-2  # and absolutely small too: logits here reach ~30


def test_smollm2_greedy_generation_matches_peft(smollm2, tmp_path):
    """A prefix from real activations (a system-style text), exported to PEFT's format: PEFT and
    ours generate the same 24 tokens for a left-padded batch."""
    from peft import PeftModel

    model, tok = smollm2
    ours = copy.deepcopy(model)
    text = tok("You are a helpful assistant who answers in French.", return_tensors="pt").input_ids
    add_prefix_tuning(ours, text.shape[1])
    init_prefix_from_text(ours, text)
    save_peft_prefix(ours, str(tmp_path / "exported"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "exported")).eval()
    fix_peft_generate(peft_model)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    got = ours.generate(**batch, max_new_tokens=24, do_sample=False)
    expected = peft_model.generate(**batch, max_new_tokens=24, do_sample=False)
    assert torch.equal(got, expected), "\n" + "\n".join(
        f"ours {tok.decode(g)!r}\npeft {tok.decode(e)!r}" for g, e in zip(got, expected))
    assert get_prefix_encoder(ours).num_virtual_tokens == text.shape[1]
