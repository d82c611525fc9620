"""Model coverage beyond Llama / Qwen2 / Mistral: GPT-2 and Qwen3 (decoders, whose PEFT
equivalence lives in test_hf_peft.py), BERT and RoBERTa (bidirectional encoders, which PEFT 0.21
no longer prefix-tunes under transformers 5), and prefix tuning together with LoRA. Encoder-decoders
(BART, T5) are in test_hf_encdec.py.

Where PEFT has no equivalent (encoders, gradient checkpointing, the bank), the oracle is the same
model with hf_testing's float64 concatenate-and-mask attention, or the reference backend."""
from __future__ import annotations

import copy

import pytest
import torch

from hf_testing import random_prefix as _random_prefix
from hf_testing import (PREFIX_ATTENTION_CALLERS, assert_fp32_close, encoder_batch, oracle_copy, padded_batch,
                        peft_float64, prefix_attention, tiny_model)
from prefix_attn.integrations.transformers import (add_prefix_tuning, get_prefix_encoder, load_peft_prefix,
                                                   load_prefix, prefix_disabled, remove_prefix_tuning,
                                                   save_peft_prefix, save_prefix)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

DECODERS = ["gpt2", "qwen3"]
ENCODERS = ["bert-seq", "bert-token", "roberta-seq", "roberta-token"]


def _prefixed(family, P=5, **kwargs):
    return _random_prefix(add_prefix_tuning(tiny_model(family), P, **kwargs))


def _batch(model, family, **kwargs):
    return encoder_batch(model, **kwargs) if family in ENCODERS else padded_batch(**kwargs)


def _labels(family, ids, mask):
    if family.endswith("-seq"):
        return torch.arange(ids.shape[0]) % 3
    if family.endswith("-token"):
        return (ids % 3).masked_fill(mask == 0, -100)
    return ids.masked_fill(mask == 0, -100)


def _valid(family, logits, mask):
    return None if family.endswith("-seq") else mask  # sequence classification: one row of logits


def _prefix_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in get_prefix_encoder(model).named_parameters()}


def _assert_grads_close(got, expected, rtol=1e-4, atol=1e-6):
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------- logits and gradients

@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_logits_match_oracle(family):
    """Padded batch (left for decoders, right for encoders), and for a bank of 3 prefixes."""
    for kwargs in ({}, {"num_tasks": 3}):
        model = _prefixed(family, **kwargs)
        ids, mask = _batch(model, family)
        inputs = dict(input_ids=ids, attention_mask=mask)
        if kwargs:
            inputs["prefix_index"] = torch.tensor([2, 0, 1])
        with torch.no_grad():
            got = model(**inputs).logits
            ref32 = oracle_copy(model)(**inputs).logits
            ref64 = oracle_copy(model).double()(**inputs).logits
        assert_fp32_close(f"{family} {kwargs}", got, ref32, ref64, valid=_valid(family, got, mask))


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_gradients_reach_every_prefix_and_only_the_prefixes(family):
    """Train mode with the config's own dropouts (GPT-2, BERT, RoBERTa: 0.1 attention, residual and
    embedding dropout): the oracle, seeded alike, drops the same entries, so loss and prefix
    gradients match it; every layer's prefix (keys and values) gets a gradient, and nothing else but
    the encoders' task head (which trains with the prefix by default: test_hf_task_head.py)."""
    model = add_prefix_tuning(tiny_model(family), 4).train()
    ids, mask = _batch(model, family)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_labels(family, ids, mask))
    torch.manual_seed(7)
    loss, got = _prefix_grads(model, **inputs)
    oracle = oracle_copy(model).double()
    torch.manual_seed(7)
    oracle_loss, expected = _prefix_grads(oracle, **inputs)
    torch.testing.assert_close(loss, oracle_loss.float(), rtol=1e-5, atol=1e-6)
    _assert_grads_close(got, {n: g.float() for n, g in expected.items()})
    grad = got["weight"]  # [L, 2, T, Hkv, P, D]
    assert (grad.abs().sum(dim=(2, 3, 4, 5)) > 0).all(), "a layer's prefix keys or values got no gradient"
    head = {"roberta-seq": ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                            "classifier.out_proj.bias"]}.get(family, ["classifier.weight", "classifier.bias"])
    head = head if family in ENCODERS else []
    assert [n for n, p in model.named_parameters() if p.grad is not None] == head + ["prefix_encoder.weight"]


@pytest.mark.parametrize("family", ["gpt2", "qwen3", "roberta-token"])
def test_gradient_checkpointing_and_bank(family):
    """Checkpointing (which PEFT's prefix tuning refuses) changes neither loss nor gradients, with a
    bank and the config's dropouts on (the recomputation redraws the same dropout stream); the
    bank's gradient stays in the entries the batch used."""
    model = add_prefix_tuning(tiny_model(family), 4, num_tasks=3).train()
    ids, mask = _batch(model, family)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_labels(family, ids, mask),
                  prefix_index=torch.tensor([2, 0, 2]))
    torch.manual_seed(3)
    loss, expected = _prefix_grads(model, **inputs)
    model.gradient_checkpointing_enable()
    torch.manual_seed(3)
    loss_gc, got = _prefix_grads(model, **inputs)
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    _assert_grads_close(got, expected, rtol=0, atol=0)
    assert got["weight"][:, :, 1].abs().sum() == 0 and got["weight"][:, :, [0, 2]].abs().sum() > 0


# --------------------------------------------------------------------------- training

@pytest.mark.parametrize("family", ["gpt2", "qwen3", "bert-seq", "roberta-token"])
def test_trains_with_its_default_config(family):
    """The default config (GPT-2's, BERT's and RoBERTa's attention dropout 0.1 included; Qwen3 has
    none): 25 AdamW steps on a small task cut the loss by a quarter or more; the model's own
    weights do not move. (The random weights are drawn with std 0.2, not the configs' 0.02: a
    tiny random model with 0.02 predicts a near-uniform distribution that no prefix can move far.)"""
    torch.manual_seed(0)
    model = add_prefix_tuning(tiny_model(family, initializer_range=0.2), 8).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("prefix_encoder")}
    g = torch.Generator().manual_seed(0)
    if family in ENCODERS:
        ids, mask = encoder_batch(model, batch=8, length=12)
    else:
        ids = torch.randint(1, 9, (8, 12), generator=g)  # a small alphabet: the prefix can learn it
        mask = torch.ones_like(ids)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=_labels(family, ids, mask))
    optimizer = torch.optim.AdamW(model.prefix_encoder.parameters(), lr=1e-1)
    losses = []
    for _ in range(25):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --------------------------------------------------------------------------- encoders

@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_padding_invariance_and_backends(family, monkeypatch):
    """Each padded row's logits equal that row's alone, unpadded (RoBERTa numbers positions past
    its padding, so its token logits are left-padding invariant too; sequence classification reads
    the first token, a pad under left padding); the reference backend agrees with the cpu one."""
    model = _prefixed(family)
    sides = ["right", "left"] if family == "roberta-token" else ["right"]
    with torch.no_grad():
        for side in sides:
            ids, mask = encoder_batch(model, side=side)
            batched = model(input_ids=ids, attention_mask=mask).logits
            for b in range(ids.shape[0]):
                keep = mask[b].bool()
                alone = model(input_ids=ids[b:b + 1, keep]).logits[0]
                got = batched[b] if family.endswith("-seq") else batched[b, keep]
                torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5, msg=lambda m: f"{side} row {b}: {m}")
        real = prefix_attention
        backends = []

        def on_reference(*args, **kwargs):
            backends.append(kwargs["backend"])
            return real(*args, **{**kwargs, "backend": "reference"})

        for caller in PREFIX_ATTENTION_CALLERS:
            monkeypatch.setattr(caller, "prefix_attention", on_reference)
        reference = model(input_ids=ids, attention_mask=mask).logits
    assert backends == ["cpu"] * model.config.num_hidden_layers  # what auto picks, replaced
    valid = None if family.endswith("-seq") else mask.bool()
    torch.testing.assert_close(reference if valid is None else reference[valid],
                               batched if valid is None else batched[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert-seq", "roberta-token"])
def test_peft_refuses_prefix_tuning_on_encoders(family):
    """What PEFT 0.21 cannot do under transformers 5, and we do (the README says so)."""
    from peft import PrefixTuningConfig, get_peft_model

    task = "SEQ_CLS" if family.endswith("-seq") else "TOKEN_CLS"
    model = tiny_model(family)
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type=task, num_virtual_tokens=4))
    ids, mask = encoder_batch(model)
    with pytest.raises(ValueError, match="does not support past key values"):
        peft_model(input_ids=ids, attention_mask=mask)


# --------------------------------------------------------------------------- saving and loading

@pytest.mark.parametrize("family", DECODERS + ["bert-token"])
def test_save_load_round_trips(family, tmp_path):
    """Ours (a bank with the MLP reparametrisation), and for decoders PEFT's format both ways:
    exported, PEFT loads it and computes our logits; imported back, so do we."""
    model = _prefixed(family, 4, prefix_projection=True, encoder_hidden_size=16, num_tasks=2)
    ids, mask = _batch(model, family)
    index = torch.tensor([1, 0, 1])
    save_prefix(model, str(tmp_path / "ours"))
    loaded = load_prefix(tiny_model(family), str(tmp_path / "ours"))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, prefix_index=index).logits
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask, prefix_index=index).logits, expected)
    if family in ENCODERS:
        return
    from peft import PeftModel

    save_peft_prefix(model, str(tmp_path / "peft"), task=1)
    base = tiny_model(family)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    back = load_peft_prefix(tiny_model(family), str(tmp_path / "peft"))
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, prefix_index=1).logits
        assert_fp32_close(f"{family} exported", ours, peft_model(input_ids=ids, attention_mask=mask).logits,
                          peft_float64(base, str(tmp_path / "peft"))(input_ids=ids, attention_mask=mask).logits,
                          valid=mask)
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask).logits, ours, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- prefix tuning with LoRA

def _lora_config(family):
    from peft import LoraConfig

    if family == "gpt2":  # the fused QKV projection, a Conv1D (weight stored [in, out])
        return LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def _train_steps(model, steps=4):
    ids = torch.randint(1, 9, (4, 10), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("order", ["lora-first", "prefix-first"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_prefix_tuning_with_lora(family, order, tmp_path):
    """Both orders: the prefix and LoRA both train (nothing else moves), both save (LoRA as a PEFT
    adapter without the prefix, the prefix with save_prefix), and a fresh base model with both
    reloaded computes the same logits and greedy generations, those of the merged LoRA weights
    with the oracle's attention. LoRA on q_proj / v_proj (Llama, Qwen3: before Qwen3's per-head
    q/k norm) and on GPT-2's fused c_attn (a Conv1D), whose config keeps its dropouts (0.1) for
    the training steps. Weights drawn with std 0.2 and a random prefix: with the configs' 0.02,
    greedy decoding only repeats a token, and a prefix lost in the decode steps went unseen."""
    from peft import PeftModel, get_peft_model

    base = tiny_model(family, initializer_range=0.2)
    if order == "lora-first":
        model = add_prefix_tuning(get_peft_model(copy.deepcopy(base), _lora_config(family)), 4)
    else:
        model = get_peft_model(add_prefix_tuning(copy.deepcopy(base), 4), _lora_config(family))
        assert not get_prefix_encoder(model).weight.requires_grad  # PEFT froze it, as everything but LoRA
        get_prefix_encoder(model).requires_grad_(True)
    _random_prefix(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("prefix_encoder" in n for n in trainable)
    assert all("lora_" in n or "prefix_encoder" in n for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable, moved ^ trainable

    model.save_pretrained(str(tmp_path / "lora"))
    save_prefix(model, str(tmp_path / "prefix"))
    from safetensors.torch import load_file

    assert not any("prefix" in k for k in load_file(str(tmp_path / "lora" / "adapter_model.safetensors")))
    reloaded = load_prefix(PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "lora")),
                           str(tmp_path / "prefix"))
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
        with model.disable_adapter():  # the prefix alone: LoRA did change the outputs
            assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-4)
        with prefix_disabled(model):  # LoRA alone: so did the prefix
            assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-2)
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False),
                       tokens)
    # the oracle: the merged LoRA weights, our prefix, explicit attention
    merged = reloaded.merge_and_unload()
    oracle = oracle_copy(merged)
    assert torch.equal(oracle.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False), tokens)
    remove_prefix_tuning(reloaded)
