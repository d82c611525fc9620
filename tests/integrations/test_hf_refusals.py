"""add_prefix_tuning and add_prompt_tuning refuse, at the call and with one line that says why, the
models they cannot run correctly, and leave them untouched; and a tuned model no longer changes
another model built from the same config object. Tiny configs, no downloads."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from hf_testing import VOCAB, padded_batch, tiny_config, tiny_model
from prefix_attn.integrations.prompt_tuning import add_prompt_tuning, remove_prompt_tuning
from prefix_attn.integrations.transformers import (ATTN_IMPLEMENTATION, add_prefix_tuning, load_prefix,
                                                   remove_prefix_tuning, save_prefix)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _gemma2():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, **ATTENTION))


def _mamba():
    return transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32,
                                                                  num_hidden_layers=2, state_size=4))


def _mamba2():
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_heads=4,
                                                                    head_dim=16, num_hidden_layers=2, state_size=8,
                                                                    n_groups=1))


def _jamba():
    # Mamba layers with one attention layer in two: a hybrid state-space model
    return transformers.JambaForCausalLM(transformers.JambaConfig(
        **SMALL, num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
        expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=4, mamba_dt_rank=4))


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=8, num_labels=3))


def _gpt_oss():
    return transformers.GptOssForCausalLM(transformers.GptOssConfig(
        **SMALL, **ATTENTION, num_local_experts=2, num_experts_per_tok=1, layer_types=["full_attention"] * 2))


def _bloom():
    # ALiBi inside attention code of its own, outside the AttentionInterface
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2,
                                                                  n_head=4))


def _stablelm():
    # dispatches through the AttentionInterface, but its layers do not pass attention kwargs on
    return transformers.StableLmForCausalLM(transformers.StableLmConfig(**SMALL, num_attention_heads=4,
                                                                        num_key_value_heads=2))


#: model -> what the one line must say
REFUSED = {
    "gemma2": (_gemma2, r"soft-caps its attention scores \(attn_logit_softcapping=50.0\)"),
    "mamba": (_mamba, r"MambaForCausalLM .* has no attention layers"),
    "mamba2": (_mamba2, r"Mamba2ForCausalLM .* has no attention layers"),
    "jamba": (_jamba, r"JambaForCausalLM .* mixes attention with layers of kind \['linear_attention', 'mamba'\]"),
    "vit": (_vit, r"ViTForImageClassification .* takes pixel_values \(a vision or audio model\)"),
    "gpt-oss": (_gpt_oss, r"GptOssForCausalLM .* learned sinks"),
    "bloom": (_bloom, r"BloomForCausalLM .* does not support custom attention functions"),
    "stablelm": (_stablelm, r"StableLmForCausalLM .* does not support custom attention functions"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_refused_at_the_call_with_one_line(name, method):
    make, why = REFUSED[name]
    torch.manual_seed(0)
    model = make()
    config = copy.deepcopy(model.config.to_dict())
    flags = [p.requires_grad for p in model.parameters()]
    add = add_prefix_tuning if method == "prefix" else add_prompt_tuning
    with pytest.raises(NotImplementedError, match=why) as raised:
        add(model, 4)
    message = str(raised.value)
    assert message.startswith("prefix_attn: ") and "\n" not in message
    # untouched: same config, same flags, no encoder, and it still runs as before
    assert model.config.to_dict() == config and model.config._attn_implementation != ATTN_IMPLEMENTATION
    assert [p.requires_grad for p in model.parameters()] == flags and not hasattr(model, "prefix_encoder")


def test_gemma2_without_soft_capping_is_accepted():
    """The refusal is about soft-capping, not the family: with attn_logit_softcapping=None Gemma 2's
    attention is plain softmax attention."""
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**SMALL, **ATTENTION,
                                                                     attn_logit_softcapping=None))
    add_prefix_tuning(model, 4)
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert model.prefix_encoder.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- a shared config object

@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_other_models_of_the_same_config_object_are_untouched(method):
    """Two models built from one config object: tuning one leaves the other on its own attention
    (same logits, bit for bit), a third model built from that config object afterwards runs too, and
    removing the tuning restores the tuned model's attention implementation on its own config."""
    config = tiny_config("llama")
    torch.manual_seed(0)
    tuned = transformers.LlamaForCausalLM(config).eval()
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(config).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        before = other(input_ids=ids, attention_mask=mask).logits
    previous = config._attn_implementation
    if method == "prefix":
        add_prefix_tuning(tuned, 4)
    else:
        add_prompt_tuning(tuned, 4)
    assert config._attn_implementation == previous and tuned.config._attn_implementation == ATTN_IMPLEMENTATION
    # every submodule of the tuned model reads the tuned model's config, none the shared one
    assert not [n for n, m in tuned.named_modules() if m.__dict__.get("config") is config]
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids, attention_mask=mask).logits, before)
        third = transformers.LlamaForCausalLM(config).eval()
        third(input_ids=ids, attention_mask=mask)
        tuned(input_ids=ids, attention_mask=mask)
    (remove_prefix_tuning if method == "prefix" else remove_prompt_tuning)(tuned)
    assert tuned.config._attn_implementation == previous
    with torch.no_grad():
        torch.testing.assert_close(tuned(input_ids=ids, attention_mask=mask).logits, before, rtol=0, atol=0)


def test_own_config_with_deepcopy_save_pretrained_and_reload(tmp_path):
    """The tuned model's config copy travels with copy.deepcopy (the copy's modules read the copy's
    config); save_pretrained writes the model's config (the base model's, as before) and the
    model reloads; settings made on model.config while tuned stay after remove_prefix_tuning."""
    config = tiny_config("llama")
    torch.manual_seed(0)
    model = add_prefix_tuning(transformers.LlamaForCausalLM(config).eval(), 4)
    twin = copy.deepcopy(model)
    assert twin.config is not model.config
    assert all(m.__dict__["config"] is twin.config for m in twin.modules() if "config" in m.__dict__)
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(twin(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)
    save_prefix(model, str(tmp_path / "prefix"))
    model.save_pretrained(str(tmp_path / "full"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "full"))
    assert reloaded.config._attn_implementation != ATTN_IMPLEMENTATION
    load_prefix(reloaded, str(tmp_path / "prefix"))
    model.config.use_cache = False
    remove_prefix_tuning(model)
    assert model.config.use_cache is False and config.use_cache is True


def test_failed_attach_gives_the_config_back(monkeypatch):
    """If switching the attention implementation fails, the model is left with the config it had."""
    from prefix_attn.integrations.hf import attach

    model = tiny_model("llama")
    config = model.config

    def refuse(*args, **kwargs):
        raise ValueError("refused")

    monkeypatch.setattr(attach, "_set_attn_implementation", refuse)
    with pytest.raises(ValueError, match="refused"):
        add_prefix_tuning(model, 4)
    assert all(m.__dict__["config"] is config for m in model.modules() if "config" in m.__dict__)
