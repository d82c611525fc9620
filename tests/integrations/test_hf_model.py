"""add_prefix_tuning on transformers models: attaching and undoing, positions, masks (padding,
sliding windows, static caches), generation with the prefix outside the KV cache, multi-task
banks, saving and loading. The oracle (hf_testing.oracle_copy) runs the same model with an
explicit concatenate-and-mask attention in float64 and transformers' own masks."""
from __future__ import annotations

import copy
import gc
import json
import os

import pytest
import torch

import prefix_attn

import hf_testing
from hf_testing import random_prefix as _random_prefix
from hf_testing import (PREFIX_ATTENTION_CALLERS, assert_fp32_close, oracle_copy, padded_batch, prefix_attention,
                        tiny_model)
from prefix_attn.integrations import transformers as hf
from prefix_attn.integrations.transformers import (ATTN_IMPLEMENTATION, add_prefix_tuning, get_prefix_encoder,
                                                   init_prefix_from_text, load_peft_prefix, load_prefix,
                                                   prefix_disabled, remove_prefix_tuning, save_prefix)
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _check_against_oracle(name, model, **inputs):
    """ours (fp32) vs the oracle in fp32 and in fp64."""
    valid = inputs.get("attention_mask")
    with torch.no_grad():
        got = model(**inputs).logits
        ref32 = oracle_copy(model)(**inputs).logits
        ref64 = oracle_copy(model).double()(**inputs).logits
    return assert_fp32_close(name, got, ref32, ref64, valid=valid)


# --------------------------------------------------------------------------- attach / undo

def test_attach_freezes_the_model_and_undo_restores_it():
    gc.collect()  # models of earlier tests, dropped without remove_prefix_tuning, stop counting as users
    model = tiny_model("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    previous = model.config._attn_implementation
    model.lm_head.weight.requires_grad_(False)  # a flag the user set: undo must keep it
    assert add_prefix_tuning(model, 4) is model
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
    assert ATTN_IMPLEMENTATION in AttentionMaskInterface._global_mapping
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prefix_encoder.weight"]
    assert isinstance(model.prefix_encoder, hf.PrefixEncoder)
    with pytest.raises(ValueError, match="already has prefix tuning"):
        add_prefix_tuning(model, 4)

    encoder = remove_prefix_tuning(model)
    assert isinstance(encoder, hf.PrefixEncoder)
    assert model.config._attn_implementation == previous
    assert not hasattr(model, "prefix_encoder") and "generate" not in model.__dict__
    assert ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping
    assert ATTN_IMPLEMENTATION not in AttentionMaskInterface._global_mapping
    assert not model.lm_head.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "lm_head.weight")
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="no prefix tuning"):
        remove_prefix_tuning(model)


def test_registration_outlives_one_of_two_models():
    """The name stays registered while a model uses it: another model, or a deep copy (which never
    went through add_prefix_tuning), or the model after an add_prefix_tuning that failed."""
    gc.collect()
    a, b = add_prefix_tuning(tiny_model("llama"), 4), add_prefix_tuning(tiny_model("qwen2"), 4)
    c = copy.deepcopy(a)
    with pytest.raises(ValueError, match="already has prefix tuning"):
        add_prefix_tuning(a, 4)
    ids, mask = padded_batch()
    for first, then in ((a, b), (b, c)):
        remove_prefix_tuning(first)
        assert ATTN_IMPLEMENTATION in AttentionInterface._global_mapping
        then(input_ids=ids, attention_mask=mask)
    remove_prefix_tuning(c)
    assert ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping


def test_prefix_disabled_is_the_base_model():
    base = tiny_model("llama")
    model = _random_prefix(add_prefix_tuning(copy.deepcopy(base), 4))
    ids, mask = padded_batch()
    with torch.no_grad(), prefix_disabled(model):
        got = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-3)
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- positions and masks

@pytest.mark.parametrize("position_offset", [True, False], ids=["offset", "from0"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_matches_oracle(family, position_offset):
    model = _random_prefix(add_prefix_tuning(tiny_model(family), 5, position_offset=position_offset))
    ids, mask = padded_batch()
    _check_against_oracle(f"{family}", model, input_ids=ids, attention_mask=mask)
    _check_against_oracle(f"{family} no mask", model, input_ids=ids)


def test_position_offset_shifts_positions_by_P():
    """With a zero prefix value the prefix only dilutes attention; what the offset changes is
    RoPE. Positions P.. with offset == explicit position_ids P.. without it."""
    base = tiny_model("llama")
    shifted = _random_prefix(add_prefix_tuning(copy.deepcopy(base), 5))
    plain = add_prefix_tuning(copy.deepcopy(base), 5, position_offset=False)
    plain.prefix_encoder.load_state_dict(shifted.prefix_encoder.state_dict())
    ids, mask = padded_batch()
    positions = torch.arange(5, 5 + ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        a = shifted(input_ids=ids, attention_mask=mask).logits
        b = plain(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        c = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_narrow_sliding_window_matches_oracle(family):
    """A window of 4 < sequence: the full-mask path; the prefix stays visible to every query
    (unlike PEFT, whose prefix, sitting in the cache, slides out of the window)."""
    model = _random_prefix(add_prefix_tuning(tiny_model(family, sliding_window=4), 5))
    ids, mask = padded_batch(length=13)
    _check_against_oracle(family, model, input_ids=ids, attention_mask=mask)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    ref = oracle_copy(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, ref)


def test_mask_function_hands_over_padding_only_when_it_can():
    mask2d = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    out = hf.prefix_attention_mask(2, 4, 4, 0, 0, attention_mask=mask2d)
    assert out.shape == (2, 4) and torch.equal(out, mask2d)
    assert hf.prefix_attention_mask(2, 1, 4, 3, 0, attention_mask=None) is None  # decode, no mask
    assert hf.prefix_attention_mask(2, 4, 4, 0, 0, attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    from transformers.masking_utils import sliding_window_causal_mask_function

    full = hf.prefix_attention_mask(2, 4, 4, 0, 0, mask_function=sliding_window_causal_mask_function(2),
                                    attention_mask=mask2d)
    assert full.shape == (2, 1, 4, 4) and full.dtype == torch.bool
    assert not full[1, 0, 3, 0] and full[1, 0, 3, 2]
    static = hf.prefix_attention_mask(2, 1, 8, torch.tensor(3), 0, attention_mask=None)  # static cache
    assert static.shape == (2, 1, 1, 8) and static[0, 0, 0, :4].all() and not static[0, 0, 0, 4:].any()
    # bidirectional (encoders, cross-attention): the padding as one row for every query, or nothing
    from transformers.masking_utils import and_masks, bidirectional_mask_function

    row = hf.prefix_attention_mask(2, 3, 4, mask_function=bidirectional_mask_function, attention_mask=mask2d)
    assert row.shape == (2, 1, 1, 4) and torch.equal(row[:, 0, 0], mask2d)
    assert hf.prefix_attention_mask(2, 3, 4, mask_function=bidirectional_mask_function,
                                    attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    custom = hf.prefix_attention_mask(2, 3, 4, mask_function=and_masks(bidirectional_mask_function,
                                                                        lambda b, h, q, k: k <= q),
                                      attention_mask=mask2d)
    assert custom.shape == (2, 1, 3, 4) and not custom[1, 0, 0, 1]  # a custom function: the full mask


# --------------------------------------------------------------------------- generation

def test_decoding_attends_to_prefix_and_cache_in_the_kernel(monkeypatch):
    """Prefill: causal over the prompt. Every decode step: the new token's 4 query heads (as 2 KV
    heads x 2 queries, which one query position allows) against the whole cache plus the shared
    [Hkv, P, D] prefix, padding as key_padding_mask; and the cache holds no prefix."""
    model = _random_prefix(add_prefix_tuning(tiny_model("llama"), 5))
    calls = []
    real = prefix_attention

    def spy(q, k, v, prefix_k, prefix_v, **kwargs):
        kpm = kwargs.get("key_padding_mask")
        calls.append((tuple(q.shape), k.shape[2], tuple(prefix_k.shape), kwargs["causal"],
                      None if kpm is None else tuple(kpm.shape), kwargs.get("attn_mask") is None))
        return real(q, k, v, prefix_k, prefix_v, **kwargs)

    for caller in PREFIX_ATTENTION_CALLERS:
        monkeypatch.setattr(caller, "prefix_attention", spy)
    ids, mask = padded_batch(batch=3, length=9)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True)
    layers = model.config.num_hidden_layers
    assert len(calls) == 4 * layers
    for step in range(4):
        for q_shape, nk, prefix_shape, causal, kpm, no_full_mask in calls[step * layers:(step + 1) * layers]:
            if step == 0:
                assert (q_shape, nk, causal) == ((3, 4, 9, 24), 9, True)
            else:
                assert (q_shape, nk, causal) == ((3, 2, 2, 24), 9 + step, False)
            assert prefix_shape == (2, 5, 24) and kpm == (3, nk) and no_full_mask
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.get_seq_length() == 9 + 4 - 1
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (3, 2, 12, 24)


@pytest.mark.parametrize("tasks", [1, 3])
def test_decode_step_matches_full_forward(tasks):
    """One cached decode step (the grouped-query path) gives the full forward's last logits."""
    model = _random_prefix(add_prefix_tuning(tiny_model("llama"), 5, num_tasks=tasks))
    ids, mask = padded_batch(batch=3, length=10)
    index = {"prefix_index": torch.tensor([2, 0, 1])} if tasks > 1 else {}
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, **index).logits[:, -1]
        prefill = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **index)
        cache = prefill.cache if hasattr(prefill, "cache") else prefill.past_key_values
        # the full forward numbers positions 0 .. N-1 whatever the padding: so does this step
        step = model(input_ids=ids[:, -1:], attention_mask=mask, cache=cache, use_cache=True,
                     position_ids=torch.full((3, 1), ids.shape[1] - 1), **index).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_generation_is_the_same_with_any_cache():
    model = _random_prefix(add_prefix_tuning(tiny_model("llama"), 5))
    ids, mask = padded_batch()
    dynamic = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    static = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                            cache_implementation="static")
    no_cache = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
    oracle = oracle_copy(model).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(dynamic, static) and torch.equal(dynamic, no_cache) and torch.equal(dynamic, oracle)


def test_init_prefix_from_text_is_prepending_the_text():
    """A prefix made of the model's own keys/values for a text T, positions offset by P: the model
    then computes exactly what it computes on T + x."""
    base = tiny_model("llama")
    model = add_prefix_tuning(copy.deepcopy(base), 6)
    text = torch.randint(1, 128, (6,), generator=torch.Generator().manual_seed(9))
    init_prefix_from_text(model, text)
    ids, _ = padded_batch(batch=2, seed=5)
    ids[ids == 0] = 3
    with torch.no_grad():
        got = model(input_ids=ids).logits
        ref = base(input_ids=torch.cat([text.expand(2, -1), ids], 1)).logits[:, 6:]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly num_virtual_tokens=6"):
        init_prefix_from_text(model, text[:5])


# --------------------------------------------------------------------------- multi-task banks

def _bank_model(T=3, P=4):
    return _random_prefix(add_prefix_tuning(tiny_model("llama"), P, num_tasks=T))


def test_bank_routes_rows_to_their_task():
    model = _bank_model()
    ids, mask = padded_batch(batch=4)
    task = torch.tensor([2, 0, 2, 1])
    _check_against_oracle("bank", model, input_ids=ids, attention_mask=mask, prefix_index=task)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, prefix_index=task).logits
        for b in range(4):
            alone = model(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], prefix_index=task[b:b + 1]).logits
            torch.testing.assert_close(alone[0][mask[b].bool()], batched[b][mask[b].bool()], rtol=1e-5, atol=1e-5)
        every_row = model(input_ids=ids, attention_mask=mask, prefix_index=1).logits  # one int: all rows
        torch.testing.assert_close(every_row[3], batched[3])


def test_bank_gradient_reaches_only_the_tasks_used():
    model = _bank_model()
    model.train()
    ids, mask = padded_batch(batch=2)
    model(input_ids=ids, attention_mask=mask, labels=ids, prefix_index=torch.tensor([2, 2])).loss.backward()
    grad = model.prefix_encoder.weight.grad  # [L, 2, T, Hkv, P, D]
    assert grad[:, :, 2].abs().sum() > 0
    assert grad[:, :, :2].abs().sum() == 0


def test_bank_generate_keeps_each_rows_task_through_expansion():
    model = _bank_model()
    ids, mask = padded_batch(batch=2)
    task = torch.tensor([1, 2])
    together = model.generate(input_ids=ids, attention_mask=mask, prefix_index=task, max_new_tokens=5,
                              do_sample=False, num_beams=2, num_return_sequences=2)
    assert together.shape[0] == 4
    for b in range(2):
        alone = model.generate(input_ids=ids[b:b + 1], attention_mask=mask[b:b + 1], prefix_index=task[b:b + 1],
                               max_new_tokens=5, do_sample=False, num_beams=2, num_return_sequences=2)
        assert torch.equal(together[2 * b:2 * b + 2, ids.shape[1]:], alone[:, ids.shape[1]:])


@pytest.mark.parametrize("index, match", [
    (None, "prefix_index is required"),
    (torch.tensor([0, 3, 1, 0]), r"prefix_index values must lie in \[0, 3\).*\[0, 3\]"),
    (torch.tensor([0, -1, 1, 0]), r"prefix_index values must lie in \[0, 3\)"),
    (torch.tensor([0, 1]), r"prefix_index must have shape \[B\] = \[4\]"),
    (torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), r"prefix_index must have shape \[B\] = \[4\]"),
], ids=["missing", "too-big", "negative", "too-short", "too-long"])
def test_bad_prefix_index(index, match):
    model = _bank_model()
    ids, mask = padded_batch(batch=4)
    with pytest.raises(ValueError, match=match):
        model(input_ids=ids, attention_mask=mask, prefix_index=index)
    with pytest.raises(ValueError, match=match):
        model.generate(input_ids=ids, attention_mask=mask, prefix_index=index, max_new_tokens=2)


@pytest.mark.parametrize("index", [torch.tensor([0.0, 1.0, 2.0, 0.0]), torch.tensor([True, False, True, True]),
                                   [0.5, 1.0, 2.0, 0.0]], ids=["float", "bool", "float-list"])
def test_non_integer_prefix_index_is_a_type_error(index):
    """The same exception as prefix_attention's for a non-integer prefix_index (tests/test_api.py)."""
    model = _bank_model()
    ids, mask = padded_batch(batch=4)
    with pytest.raises(TypeError, match="prefix_index must hold integer task ids"):
        model(input_ids=ids, attention_mask=mask, prefix_index=index)
    with pytest.raises(TypeError, match="prefix_index must hold integer task ids"):
        model.generate(input_ids=ids, attention_mask=mask, prefix_index=index, max_new_tokens=2)
    with pytest.raises(TypeError, match="prefix_index must be an integer tensor"):
        prefix_attn.prefix_attention(*(torch.randn(4, 2, 3, 8) for _ in range(3)), torch.randn(3, 2, 5, 8),
                                     torch.randn(3, 2, 5, 8), prefix_index=torch.as_tensor(index))


def test_prefix_index_without_a_bank():
    model = add_prefix_tuning(tiny_model("llama"), 4)
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="single task"):
        model(input_ids=ids, attention_mask=mask, prefix_index=torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
def test_save_and_load_round_trip(projection, tmp_path):
    model = _random_prefix(add_prefix_tuning(tiny_model("llama"), 4, prefix_projection=projection,
                                             encoder_hidden_size=16, num_tasks=2))
    save_prefix(model, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["prefix_config.json", "prefix_model.safetensors"]
    config = json.loads((tmp_path / "prefix_config.json").read_text())
    assert config["encoder"]["num_tasks"] == 2 and config["encoder"]["prefix_projection"] == projection
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "prefix_model.safetensors")))
    assert names == set(model.prefix_encoder.state_dict())  # the MLP too: training can resume

    fresh = load_prefix(tiny_model("llama"), str(tmp_path))  # adds prefix tuning with the saved settings
    assert get_prefix_encoder(fresh).config() == get_prefix_encoder(model).config()
    again = load_prefix(add_prefix_tuning(tiny_model("llama"), 4, prefix_projection=projection,
                                          encoder_hidden_size=16, num_tasks=2), str(tmp_path))
    ids, mask = padded_batch()
    task = torch.tensor([1, 0, 1])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, prefix_index=task).logits
        for loaded in (fresh, again):
            assert torch.equal(loaded(input_ids=ids, attention_mask=mask, prefix_index=task).logits, expected)


def test_load_says_what_does_not_fit(tmp_path):
    model = add_prefix_tuning(tiny_model("llama"), 4)
    save_prefix(model, str(tmp_path / "p"))
    with pytest.raises(ValueError, match=r"num_layers: file has 3, model has 2"):
        load_prefix(tiny_model("llama", num_hidden_layers=2), str(tmp_path / "p"))
    with pytest.raises(ValueError, match=r"num_kv_heads: file has 2, model has 4"):
        load_prefix(tiny_model("llama", num_key_value_heads=4), str(tmp_path / "p"))
    with pytest.raises(ValueError, match=r"head_dim: file has 24, model has 16"):
        load_prefix(tiny_model("llama", head_dim=16), str(tmp_path / "p"))
    with pytest.raises(ValueError, match=r"num_virtual_tokens: file has 4, model has 6"):
        load_prefix(add_prefix_tuning(tiny_model("llama"), 6), str(tmp_path / "p"))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3, 2, 1, 2, 5, 24)}, str(tmp_path / "p" / "prefix_model.safetensors"))
    with pytest.raises(ValueError, match=r"weight: file has \[3, 2, 1, 2, 5, 24\], model has \[3, 2, 1, 2, 4, 24\]"):
        load_prefix(tiny_model("llama"), str(tmp_path / "p"))


def test_load_peft_prefix_errors(tmp_path):
    from hf_testing import peft_twin

    peft_twin(tiny_model("llama"), 4, str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"num_layers: file has 3, model has 2"):
        load_peft_prefix(tiny_model("llama", num_hidden_layers=2), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"bank of 2 tasks; pass task="):
        load_peft_prefix(add_prefix_tuning(tiny_model("llama"), 4, num_tasks=2), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"num_virtual_tokens: file has 4, model has 5"):
        load_peft_prefix(add_prefix_tuning(tiny_model("llama"), 5), str(tmp_path / "a"))
    os.rename(tmp_path / "a" / "adapter_model.safetensors", tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        load_peft_prefix(tiny_model("llama"), str(tmp_path / "a"))


# --------------------------------------------------------------------------- dtypes, inputs

def test_bfloat16_model_with_float32_prefix():
    base = tiny_model("llama")
    model32 = _random_prefix(add_prefix_tuning(copy.deepcopy(base), 4), std=0.5)
    model16 = add_prefix_tuning(copy.deepcopy(base).to(torch.bfloat16), 4)
    assert model16.prefix_encoder.weight.dtype == torch.float32
    model16.prefix_encoder.load_state_dict(model32.prefix_encoder.state_dict())
    ids, mask = padded_batch()
    with torch.no_grad():
        a = model32(input_ids=ids, attention_mask=mask).logits
        b = model16(input_ids=ids, attention_mask=mask).logits
    assert b.dtype == torch.bfloat16
    assert hf_testing.max_err(a, b, mask) < 0.1 * a.abs().max()


def test_inputs_embeds():
    model = _random_prefix(add_prefix_tuning(tiny_model("llama"), 4))
    ids, mask = padded_batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
