"""Prompt tuning through the prefix kernel (prefix_attn.integrations.prompt_tuning) against PEFT's
prompt tuning, which prepends the soft prompt to every row: same adapter, same logits for the real
tokens (the float32 tolerance rule of hf_testing.py), same gradients, same greedy tokens. Tiny
random Llama (GQA, head_dim != hidden / heads), Qwen2 and Mistral (sliding-window attention),
Qwen3 (q/k RMSNorm per head, before RoPE) and GPT-2 (MHA, fused QKV, learned absolute positions)
configs.

Sliding windows: hf_testing's Qwen2 (layers 1-2) and Mistral configs slide a window of 64 keys,
wider than the P + N tokens of any test here (5 + at most 21), so it masks nothing for either
implementation and the two must agree. With a window shorter than P + N they rightly differ:
PEFT's prompt tokens are keys like any other and slide out of the window, while our prompt is
a prefix, whose keys are never masked (test_sliding_window_narrower_than_the_prompt)."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from hf_testing import VOCAB, assert_fp32_close, oracle_copy, padded_batch, tiny_model
from prefix_attn.integrations import transformers as hf
from prefix_attn.integrations.prompt_tuning import (SoftPrompt, add_prompt_tuning, export_prompt_as_prefix,
                                                    get_soft_prompt, load_peft_prompt, remove_prompt_tuning,
                                                    save_peft_prompt)

P = 5
FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "gpt2"]


def tiny_gpt2(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    return transformers.GPT2LMHeadModel(config).eval()


def _base(family, **overrides):
    return tiny_gpt2(**overrides) if family == "gpt2" else tiny_model(family, **overrides)


def _peft(base, path, peft_type="PROMPT_TUNING", seed=5, **config):
    """A PEFT prompt-learning model on a copy of `base`, its parameters random (prompt of std 0.5,
    about the size of the tiny models' word embeddings times 25: far from zero), saved to path."""
    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model

    cls = PromptTuningConfig if peft_type == "PROMPT_TUNING" else PromptEncoderConfig
    peft_model = get_peft_model(copy.deepcopy(base), cls(task_type="CAUSAL_LM", num_virtual_tokens=P, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.prompt_encoder["default"].named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embedding" in name else 0.2))
    peft_model.eval()
    peft_model.save_pretrained(str(path))
    return peft_model


def _peft64(base, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base).double(), str(path)).double().eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_peft(family, tmp_path):
    """Left-padded batch. PEFT returns P + N logits (the prompt's too); the real tokens' are ours."""
    base = _base(family)
    peft_model = _peft(base, tmp_path / "a")
    ours = load_peft_prompt(copy.deepcopy(base), str(tmp_path / "a"))
    assert isinstance(ours.prefix_encoder, SoftPrompt) and ours.prefix_encoder.num_virtual_tokens == P
    peft64 = _peft64(base, tmp_path / "a")
    ids, mask = padded_batch()
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        ref32 = peft_model(input_ids=ids, attention_mask=mask).logits[:, P:]
        ref64 = peft64(input_ids=ids, attention_mask=mask).logits[:, P:]
    assert got.shape == ref32.shape
    assert_fp32_close(f"{family} logits", got, ref32, ref64, valid=mask)
    # the positions matter: starting the real tokens at 0 instead of P is caught
    with torch.no_grad():
        shifted = ours(input_ids=ids, attention_mask=mask,
                       position_ids=torch.arange(-P, ids.shape[1] - P).unsqueeze(0).clamp(min=0)).logits
    assert (shifted - ref64).abs()[mask.bool()].max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_peft(family, tmp_path):
    """The soft prompt's gradient, summed over the rows by the kernels, is PEFT's; nothing else
    gets a gradient. The first label is -100: PEFT also scores each row's first token from the
    prompt's last position (its labels get P x -100 in front, then shift by one); ours, like
    prefix tuning and the plain model, starts at the second token (see the module docstring)."""
    base = _base(family)
    peft_model = _peft(base, tmp_path / "a")
    ours = load_peft_prompt(copy.deepcopy(base), str(tmp_path / "a"))
    peft64 = _peft64(base, tmp_path / "a")
    for p in peft64.prompt_encoder["default"].parameters():
        p.requires_grad_(True)
    ids, mask = padded_batch(seed=7)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    grads = []
    for model in (ours, peft_model, peft64):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        encoder = model.prefix_encoder if model is ours else model.prompt_encoder["default"]
        grads.append(encoder.embedding.weight.grad)
    assert grads[0].abs().max() > 0
    assert_fp32_close(f"{family} prompt gradient", *grads)
    with_grad = [n for n, p in ours.named_parameters() if p.grad is not None]
    assert with_grad == ["prefix_encoder.embedding.weight"], with_grad


def _greedy_by_forward(model, ids, mask, new_tokens):
    """Greedy decoding by repeated full forward passes (no cache), each row alone without its
    padding: the oracle for generate(). Row by row, because PEFT's prompt tuning ignores
    position_ids (it warns and drops them) and so, in a left-padded batch, numbers its real
    tokens P + their index, pads counted; transformers' generate numbers them by rank among
    the row's real tokens, and so does our generate (P + rank), so that a row's tokens do not
    depend on its padding. Unpadded, the two numberings are the same."""
    rows = []
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        row = ids[b:b + 1, keep]
        for _ in range(new_tokens):
            with torch.no_grad():
                logits = model(input_ids=row).logits[:, -1]
            row = torch.cat([row, logits.argmax(-1, keepdim=True)], 1)
        rows.append(torch.cat([ids[b:b + 1, ~keep], row], 1))  # left padding: the pads go back in front
    return torch.cat(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_peft(family, tmp_path):
    """The oracle is greedy decoding by repeated PEFT forward passes on each row alone: PEFT
    0.21's own prompt-tuning generate() looks for its cache under the old name past_key_values,
    so under transformers 5 it prepends the prompt again at every decoding step (and drifts after
    a few tokens); and PEFT numbers a left-padded row's positions with its pads counted (see
    _greedy_by_forward). Our KV cache never holds the prompt. Weights drawn with std 0.2, not the
    configs' 0.02: with those the tiny GPT-2 repeats its first generated token, and a decoding
    step that lost the prompt would go unseen."""
    base = _base(family, initializer_range=0.2)
    peft_model = _peft(base, tmp_path / "a")
    ours = load_peft_prompt(copy.deepcopy(base), str(tmp_path / "a"))
    ids, mask = padded_batch(seed=2)
    expected = _greedy_by_forward(peft_model, ids, mask, 10)
    got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected), f"\nours {got[:, ids.shape[1]:]}\npeft {expected[:, ids.shape[1]:]}"
    with torch.no_grad():
        cache = ours(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_sliding_window_narrower_than_the_prompt(family, tmp_path):
    """A window of W = 8 keys < P + N = 16 (all layers of Mistral, layers 1-2 of Qwen2): the real
    token at j sits at P + j in PEFT's sequence and sees keys P + j - W + 1 .. P + j, so for
    j < W - P it sees the whole prompt, and our logits there are PEFT's; from j = W - P on, PEFT's
    prompt slides out of the window and ours, a prefix, never does: the logits differ (as the
    README says). At every position ours is hf_testing's oracle (explicit attention, the
    window's mask over the real tokens, the prefix always visible) given the prompt's keys and
    values as a prefix table. This is why the other tests keep the configs' window of 64 > P + N."""
    W = 8
    base = tiny_model(family, sliding_window=W)
    peft_model = _peft(base, tmp_path / "a")
    ours = load_peft_prompt(copy.deepcopy(base), str(tmp_path / "a"))
    peft64 = _peft64(base, tmp_path / "a")
    ids, _ = padded_batch(batch=2, seed=9)
    ids[ids == 0] = 7  # no padding: a window over positions, nothing else
    with torch.no_grad():
        got = ours(input_ids=ids).logits
        ref32 = peft_model(input_ids=ids).logits[:, P:]
        ref64 = peft64(input_ids=ids).logits[:, P:]
    inside = W - P
    assert_fp32_close(f"{family} inside the window", got[:, :inside], ref32[:, :inside], ref64[:, :inside])
    outside = (got[:, inside:] - ref64[:, inside:]).abs().amax(dim=(0, 2))  # per position
    assert (outside > 1e-3).all(), outside
    exported = export_prompt_as_prefix(copy.deepcopy(ours))
    with torch.no_grad():
        oracle32 = oracle_copy(exported)(input_ids=ids).logits
        oracle64 = oracle_copy(exported).double()(input_ids=ids).logits
    assert_fp32_close(f"{family} = oracle", got, oracle32, oracle64)


def test_prompt_pass_runs_once_per_generate(tmp_path):
    """Decoding steps reuse the prompt's keys and values (cached while nothing changes); a changed
    prompt is seen at once."""
    model = add_prompt_tuning(tiny_model("llama"), P)
    soft_prompt = get_soft_prompt(model)
    runs = []
    original = soft_prompt._run
    soft_prompt._run = lambda m: runs.append(1) or original(m)
    ids, mask = padded_batch()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert len(runs) == 1
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        soft_prompt.embedding.weight.mul_(2)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert len(runs) == 2 and not torch.equal(before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_peft_prompt_round_trip(family, tmp_path):
    base = _base(family)
    torch.manual_seed(3)
    ours = add_prompt_tuning(copy.deepcopy(base), P)
    with torch.no_grad():
        ours.prefix_encoder.embedding.weight.normal_(0, 0.5)
    save_peft_prompt(ours, str(tmp_path / "saved"))
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "saved")).eval()
    reloaded = load_peft_prompt(copy.deepcopy(base), str(tmp_path / "saved"))
    ids, mask = padded_batch(seed=4)
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        again = reloaded(input_ids=ids, attention_mask=mask).logits
        peft_logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, P:]
    assert torch.equal(got, again)
    torch.testing.assert_close(got[mask.bool()], peft_logits[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_p_tuning_matches_peft(encoder, tmp_path):
    """PEFT P-tuning: our reparameterization with PEFT's encoder weights gives PEFT's logits
    (training-mode adapter: PEFT runs its encoder); its saved adapter (the encoder's output)
    loads with load_peft_prompt and gives them too."""
    base = tiny_model("llama")
    peft_model = _peft(base, tmp_path / "a", peft_type="P_TUNING", encoder_reparameterization_type=encoder.upper(),
                       encoder_hidden_size=32)
    ours = add_prompt_tuning(copy.deepcopy(base), P, reparameterization=encoder, encoder_hidden_size=32)
    ours.prefix_encoder.load_state_dict(peft_model.prompt_encoder["default"].state_dict())
    loaded = load_peft_prompt(copy.deepcopy(base), str(tmp_path / "a"))
    peft64 = copy.deepcopy(peft_model).double()
    ids, mask = padded_batch(seed=6)
    with torch.no_grad():
        ref32 = peft_model(input_ids=ids, attention_mask=mask).logits[:, P:]
        ref64 = peft64(input_ids=ids, attention_mask=mask).logits[:, P:]
        for name, model in (("reparameterized", ours), ("loaded", loaded)):
            got = model(input_ids=ids, attention_mask=mask).logits
            assert_fp32_close(f"p-tuning {encoder} {name}", got, ref32, ref64, valid=mask)
    assert {n.split(".")[0] for n, _ in ours.prefix_encoder.named_parameters()} >= {"embedding", "mlp_head"}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_prompt_as_prefix(family, tmp_path):
    """After export the model is prefix-tuned (a PrefixEncoder table, no prompt pass) with
    identical outputs and generations; it saves as a PEFT prefix-tuning adapter that PEFT runs
    with the same logits."""
    base = _base(family)
    _peft(base, tmp_path / "a")
    model = load_peft_prompt(copy.deepcopy(base), str(tmp_path / "a"))
    ids, mask = padded_batch(seed=8)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    tokens_before = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    export_prompt_as_prefix(model)
    assert get_soft_prompt(model) is None and isinstance(model.prefix_encoder, hf.PrefixEncoder)
    assert model.prefix_encoder.weight.requires_grad
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after, before)
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **kwargs), tokens_before)

    hf.save_peft_prefix(model, str(tmp_path / "prefix"))
    from peft import PeftModel

    peft_prefix = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "prefix")).eval()
    with torch.no_grad():
        peft_logits = peft_prefix(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(peft_logits[mask.bool()], before[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing(reentrant):
    """Same loss and prompt gradient with non-reentrant checkpointing; the reentrant kind would
    cut the prompt pass out of autograd, and says so instead of training nothing."""
    model = add_prompt_tuning(tiny_model("llama"), P).train()
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), model.prefix_encoder.embedding.weight.grad.clone()

    loss, expected = step()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        with pytest.raises(RuntimeError, match="non-reentrant"):
            step()
        return
    loss_gc, got = step()
    torch.testing.assert_close(loss_gc, loss, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


def test_init_text_and_vocab_init():
    model = tiny_model("llama")
    words = model.get_input_embeddings().weight
    add_prompt_tuning(model, 7, init_text=[11, 12, 13])
    torch.testing.assert_close(model.prefix_encoder.embedding.weight, words[[11, 12, 13, 11, 12, 13, 11]],
                               rtol=0, atol=0)
    remove_prompt_tuning(model)
    torch.manual_seed(0)
    add_prompt_tuning(model, 4)
    prompt = model.prefix_encoder.embedding.weight
    assert all(any(torch.equal(row, w) for w in words) for row in prompt)  # rows of the vocabulary
    remove_prompt_tuning(model)
    with pytest.raises(ValueError, match="no tokenizer"):
        add_prompt_tuning(model, 4, init_text="hello")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        add_prompt_tuning(model, 4, init_text=[VOCAB + 1])
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        add_prompt_tuning(model, 0)
    with pytest.raises(ValueError, match="reparameterization"):
        add_prompt_tuning(model, 4, reparameterization="transformer")
    assert hf.get_prefix_encoder(model) is None


def test_remove_restores_the_model():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    implementation = model.config._attn_implementation
    add_prompt_tuning(model, P)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix_encoder.embedding.weight"]
    soft_prompt = remove_prompt_tuning(model)
    assert isinstance(soft_prompt, SoftPrompt) and not hasattr(model, "prefix_encoder")
    assert model.config._attn_implementation == implementation
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
    with pytest.raises(RuntimeError, match="removed"):
        soft_prompt()


def test_deepcopy_runs_on_the_copy():
    model = add_prompt_tuning(tiny_model("llama"), P)
    twin = copy.deepcopy(model)
    assert twin.prefix_encoder._model is twin
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_prefix_tuning_functions_refuse_a_prompt(tmp_path):
    """What only a PrefixEncoder has (its table, its files) is refused on a SoftPrompt by name, before
    anything is written."""
    hf.save_prefix(hf.add_prefix_tuning(tiny_model("llama"), P), str(tmp_path / "prefix"))
    peft_prefix = tmp_path / "peft_prefix"
    hf.save_peft_prefix(hf.add_prefix_tuning(tiny_model("llama"), P), str(peft_prefix))
    model = add_prompt_tuning(tiny_model("llama"), P)
    for what, call in (("save_prefix", lambda: hf.save_prefix(model, str(tmp_path / "x"))),
                       ("init_prefix_from_text", lambda: hf.init_prefix_from_text(model, torch.arange(P))),
                       ("save_peft_prefix", lambda: hf.save_peft_prefix(model, str(tmp_path / "y"))),
                       ("load_prefix", lambda: hf.load_prefix(model, str(tmp_path / "prefix"))),
                       ("load_peft_prefix", lambda: hf.load_peft_prefix(model, str(peft_prefix)))):
        with pytest.raises(TypeError, match=f"{what} is for prefix tuning.*SoftPrompt.*add_prompt_tuning"):
            call()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="already has prefix tuning"):
        add_prompt_tuning(model, P)


def test_prefix_encoder_and_soft_prompt_are_prefix_sources():
    """Both implement PrefixSource, what the per-call machinery asks of the attached module, and the
    SoftPrompt has none of the PrefixEncoder's table API (no stand-ins that raise)."""
    from prefix_attn.integrations.hf._state import PrefixSource

    prompt_tuned = add_prompt_tuning(tiny_model("llama"), P)
    prefix_tuned = hf.add_prefix_tuning(tiny_model("llama"), P, num_tasks=2)
    for model, tasks in ((prompt_tuned, 1), (prefix_tuned, 2)):
        source = hf.get_prefix_encoder(model)
        assert isinstance(source, PrefixSource) and source is model.prefix_encoder
        assert (source.num_virtual_tokens, source.num_tasks) == (P, tasks)
        layers = source()
        assert len(layers) == model.config.num_hidden_layers
        assert tuple(layers[0][0].shape) == (tasks,) * (tasks > 1) + (2, P, 24)  # [T,] Hkv, P, D
    soft_prompt = get_soft_prompt(prompt_tuned)
    assert not any(hasattr(soft_prompt, name) for name in ("table", "load_table", "merge", "config",
                                                           "prefix_projection"))


def test_load_peft_prompt_refuses_mismatches(tmp_path):
    base = tiny_model("llama")
    _peft(base, tmp_path / "a")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        load_peft_prompt(add_prompt_tuning(copy.deepcopy(base), P + 1), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="prompt_embeddings"):
        load_peft_prompt(tiny_model("llama", hidden_size=32), str(tmp_path / "a"))
    from peft import PrefixTuningConfig, get_peft_model

    get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)) \
        .save_pretrained(str(tmp_path / "prefix"))
    with pytest.raises(ValueError, match="load_peft_prefix"):
        load_peft_prompt(copy.deepcopy(base), str(tmp_path / "prefix"))


def test_encoders_are_refused():
    """BERT's prompt tokens attend to the sequence, T5's go through a bidirectional encoder: their
    keys and values differ per row, and no shared prefix can stand for them."""
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="causal decoder.*(bidirectional|sequence)"):
        add_prompt_tuning(bert, P)
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        add_prompt_tuning(t5, P)
    assert hf.get_prefix_encoder(bert) is None and hf.get_prefix_encoder(t5) is None


def test_bench_e2e_prompt_builders_agree():
    """The model benchmarks' prompt-tuning pair (benchmarks/harness/models.py): the same soft prompt, the same logits for the
    real tokens, and a training step that runs for each."""
    import os
    import sys

    from hf_testing import ROOT

    bench = os.path.join(ROOT, "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    from harness import models as hm

    base = tiny_model("llama")
    models = {impl: hm.METHODS["prompt"](impl, copy.deepcopy(base), P, seed=3) for impl in hm.IMPLS}
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = models["ours"](input_ids=ids, attention_mask=mask).logits
        peft = models["peft"](input_ids=ids, attention_mask=mask).logits[:, P:]
    torch.testing.assert_close(ours[mask.bool()], peft[mask.bool()], rtol=1e-5, atol=1e-5)
    inputs = {"input_ids": ids, "attention_mask": mask}
    for impl, model in models.items():
        before = next(p for p in model.parameters() if p.requires_grad).detach().clone()
        loss = hm.make_call(model, hm.CPU_CASES["prompt_train"], inputs)()
        after = next(p for p in model.parameters() if p.requires_grad)
        assert torch.isfinite(loss) and not torch.equal(before, after), impl


def test_prompt_tuning_on_a_lora_model():
    """On a PEFT LoRA model the prompt goes on the transformers model inside; one backward reaches
    the prompt and the LoRA weights, and nothing else."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert add_prompt_tuning(lora, P) is lora
    soft_prompt = get_soft_prompt(lora)
    assert isinstance(soft_prompt, SoftPrompt) and soft_prompt._model is lora.get_base_model()
    ids, mask = padded_batch()
    lora(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    with_grad = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert any("prefix_encoder.embedding" in n for n in with_grad)
    assert any("lora_A" in n for n in with_grad) and any("lora_B" in n for n in with_grad)
    assert all("lora_" in n or "prefix_encoder" in n for n in with_grad), with_grad
    export_prompt_as_prefix(lora)
    assert isinstance(hf.get_prefix_encoder(lora), hf.PrefixEncoder)
