"""Encoder-decoder prefix tuning: BART and T5, with Li & Liang's three prefixes (the
encoder's self-attention, the decoder's causal self-attention, the decoder's cross-attention) or
any subset. T5 adds a relative position bias to its scores, which the prefix keys get too.

Oracles, each independent of what it checks:
- the decoder's prefix is P past tokens in the self-attention cache: the plain model given that
  cache (BART then numbers the real tokens from P; T5 computes the prefix keys' bias itself);
- the cross-attention prefix, built from each layer's own key / value projections of P extra
  encoder states, is those states prepended to the encoder's output: the plain model reading them;
- PEFT's SEQ_2_SEQ_LM prefix tuning (decoder self-attention only, under transformers 5) for the
  import, the export and greedy generation (by repeated PEFT forward passes);
- hf_testing's float64 concatenate-and-mask attention (with T5's own compute_bias over
  [prefix ; sequence] keys) for everything at once: all three sites, a bank, dropout, gradients;
- for T5's two-call path, float64 attention over explicitly concatenated keys, dropout masks
  included (test_prefix_bias_merge_is_exact).
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from hf_testing import random_prefix as _random_prefix
from hf_testing import ORACLE_CALLS, assert_fp32_close, encoder_batch, oracle_copy, peft_float64, tiny_model
from prefix_attn import _dropout
from prefix_attn.integrations import transformers as hf
from prefix_attn.integrations.hf import peft_io, t5
from prefix_attn.integrations.hf._state import SLOT_ATTR, get_tuning
from prefix_attn.integrations.transformers import (add_prefix_tuning, get_prefix_encoder, load_peft_prefix,
                                                   load_prefix, prefix_disabled, remove_prefix_tuning,
                                                   save_peft_prefix, save_prefix)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

FAMILIES = ["bart", "t5"]
H, D, L = 4, 16, 3  # tiny_model("bart") and tiny_model("t5"): heads, head dim, layers per stack
GREEDY = dict(do_sample=False, num_beams=1, min_length=0, no_repeat_ngram_size=0)
# Larger random weights: at the configs' own scale every row of a tiny random model predicts the
# same token, and generation tests would compare constant sequences.
LIVELY = {"bart": dict(init_std=0.2), "t5": dict(initializer_factor=5.0)}


def _model(family, lively=False, **overrides):
    return tiny_model(family, **{**(LIVELY[family] if lively else {}), **overrides})


def _generating(model):
    """No end-of-sequence token, so that every row runs to the end."""
    model.generation_config.eos_token_id = None
    return model


def _inputs(model, batch=3, source=9, target=6, seed=1):
    """Right-padded source ids and mask (row 0 full), and target ids that start with the decoder's
    start token."""
    ids, mask = encoder_batch(model, batch=batch, length=source, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    decoder_ids = torch.randint(3, model.config.vocab_size, (batch, target), generator=g)
    decoder_ids[:, 0] = model.config.decoder_start_token_id
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _check_against_oracle(name, model, inputs):
    got = _logits(model, inputs)
    calls = ORACLE_CALLS[0]
    ref32 = _logits(oracle_copy(model), inputs)
    assert ORACLE_CALLS[0] - calls == 3 * L, "the oracle did not run every attention"
    ref64 = _logits(oracle_copy(model).double(), inputs)
    assert_fp32_close(name, got, ref32, ref64)
    return got


def _cross_attention(model):
    return [m for name, m in model.get_decoder().named_modules() if name.endswith(("encoder_attn", "EncDecAttention"))]


def _key_value_projections(attention):
    return (attention.k_proj, attention.v_proj) if hasattr(attention, "k_proj") else (attention.k, attention.v)


# --------------------------------------------------------------------------- geometry and slots

NAMES = {"bart": ("model.encoder.layers.{}.self_attn", "model.decoder.layers.{}.self_attn",
                  "model.decoder.layers.{}.encoder_attn"),
         "t5": ("encoder.block.{}.layer.0.SelfAttention", "decoder.block.{}.layer.0.SelfAttention",
                "decoder.block.{}.layer.1.EncDecAttention")}


@pytest.mark.parametrize("family", FAMILIES)
def test_three_prefixes_by_default_each_attention_its_own(family):
    model = add_prefix_tuning(_model(family), 4)
    encoder = get_prefix_encoder(model)
    assert (encoder.num_layers, encoder.num_kv_heads, encoder.head_dim) == (3 * L, H, D)
    slots = {name: hf.prefix_slot(m) for name, m in model.named_modules() if SLOT_ATTR in m.__dict__}
    assert slots == {names.format(i): site * L + i for site, names in enumerate(NAMES[family]) for i in range(L)}
    remove_prefix_tuning(model)
    model = add_prefix_tuning(model, 4, sites=("cross", "encoder"))  # any order: stored in the canonical one
    assert get_tuning(model).geometry.sites == ("encoder", "cross") and get_prefix_encoder(model).num_layers == 2 * L
    assert all(hf.prefix_slot(model.get_submodule(NAMES[family][1].format(i))) == hf.NO_PREFIX for i in range(L))


@pytest.mark.parametrize("sites", [None, ("encoder",), ("decoder",), ("cross",)], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_oracle(family, sites):
    model = _random_prefix(add_prefix_tuning(_model(family), 5, sites=sites))
    base = _logits(_model(family), _inputs(model))
    got = _check_against_oracle(f"sites {sites}", model, _inputs(model))
    assert (got - base).abs().max() > 1e-3  # the prefix does something (fp32 rounding: ~1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bank_matches_oracle_and_routes_rows(family):
    model = _random_prefix(add_prefix_tuning(_model(family), 4, num_tasks=3))
    inputs = dict(_inputs(model), prefix_index=torch.tensor([2, 0, 1]))
    got = _check_against_oracle("bank", model, inputs)
    for row, task in enumerate([2, 0, 1]):
        one = {k: v[row:row + 1] for k, v in inputs.items() if k != "prefix_index"}
        torch.testing.assert_close(_logits(model, dict(one, prefix_index=task))[0], got[row], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_prefix_is_p_past_tokens_in_the_cache(family):
    """Independent of our hooks: the plain model with the prefix as P past tokens of every decoder
    layer's self-attention cache (BART then numbers the real tokens from P, as we do; T5 gives the
    prefix keys the relative position bias of P past tokens, as we do)."""
    base = _model(family)
    model = _random_prefix(add_prefix_tuning(copy.deepcopy(base), 5, sites="decoder"))
    inputs = _inputs(model)
    B = inputs["input_ids"].shape[0]

    def cached(reference):
        cache = transformers.EncoderDecoderCache(transformers.DynamicCache(), transformers.DynamicCache())
        for layer, (k, v) in enumerate(get_prefix_encoder(model)()):
            k, v = (t.to(next(reference.parameters()).dtype).expand(B, -1, -1, -1).contiguous() for t in (k, v))
            cache.self_attention_cache.update(k, v, layer)
        return _logits(reference, dict(inputs, cache=cache))

    assert_fp32_close("decoder prefix", _logits(model, inputs), cached(base), cached(copy.deepcopy(base).double()))


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_attention_prefix_is_extra_encoder_states(family):
    """Independent of our hooks: a cross-attention prefix whose keys and values are each decoder
    layer's own key / value projections of P extra encoder states equals the plain model reading
    those states in front of the encoder's output (its mask extended with ones)."""
    base = _model(family)
    model = add_prefix_tuning(copy.deepcopy(base), 4, sites="cross")
    extra = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        table = torch.stack([torch.stack([proj(extra) for proj in _key_value_projections(attn)])
                             .view(2, 4, H, D).transpose(1, 2) for attn in _cross_attention(base)])
    get_prefix_encoder(model).load_table(table)  # [L, 2, H, P, D]
    inputs = _inputs(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]

    def extended(reference):
        with torch.no_grad():
            states = reference.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            states = torch.cat([extra.to(states.dtype).expand(ids.shape[0], -1, -1), states], 1)
            return reference(encoder_outputs=(states,), attention_mask=torch.cat([torch.ones_like(mask[:, :4]), mask], 1),
                             decoder_input_ids=inputs["decoder_input_ids"]).logits

    assert_fp32_close("cross prefix", _logits(model, inputs), extended(base), extended(copy.deepcopy(base).double()))


def test_t5_positions_are_relative_so_position_offset_changes_nothing():
    inputs = _inputs(_model("t5"))
    shifted, unshifted = (_random_prefix(add_prefix_tuning(_model("t5"), 5, position_offset=offset))
                          for offset in (True, False))
    assert torch.equal(_logits(shifted, inputs), _logits(unshifted, inputs))


def test_positions_shift_by_p_where_the_self_attention_has_a_prefix():
    """position_offset=True: each stack whose self-attention has a prefix numbers its tokens from
    P, as if the prefix were P tokens before them; a cross-attention prefix shifts nothing."""
    seen = {}

    def record(stack):
        def hook(module, args, kwargs, output):
            seen[stack] = output[0] if output.dim() == 3 else output
        return hook

    for sites, shifted in ((None, {"encoder", "decoder"}), ("cross", set()), ("encoder", {"encoder"})):
        for offset in (True, False):
            model = add_prefix_tuning(tiny_model("bart"), 5, sites=sites, position_offset=offset)
            handles = [model.get_encoder().embed_positions.register_forward_hook(record("encoder"), with_kwargs=True),
                       model.get_decoder().embed_positions.register_forward_hook(record("decoder"), with_kwargs=True)]
            _logits(model, _inputs(model, source=9, target=6))
            for stack, n in (("encoder", 9), ("decoder", 6)):
                table = getattr(model.model, stack).embed_positions.weight
                start = 2 + (5 if offset and stack in shifted else 0)  # BART's embedding offset is 2
                assert torch.equal(seen[stack].reshape(-1, n, 64)[0], table[start:start + n]), (sites, offset, stack)
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------- PEFT

def _peft_twin(base, path, P=5, layers=None):
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                       num_virtual_tokens=P))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in peft_model.prompt_encoder["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    peft_model.eval().save_pretrained(path)
    return peft_model


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_imports_with_peft_logits(family, tmp_path):
    """An odd number of layers, so PEFT's layer order (2 l mod L: 0, 2, 1) differs from 0, 1, 2 and
    a load in plain order would fail."""
    base = _model(family)
    peft_model = _peft_twin(base, str(tmp_path / "peft"))
    ours = load_peft_prefix(copy.deepcopy(base), str(tmp_path / "peft"))
    assert get_tuning(ours).geometry.sites == ("decoder",)
    inputs = _inputs(base)
    assert_fp32_close("PEFT import", _logits(ours, inputs), _logits(peft_model, inputs),
                      _logits(peft_float64(base, str(tmp_path / "peft")), inputs))
    assert peft_io._peft_seq2seq_layers(3) == [0, 2, 1] and peft_io._peft_seq2seq_layers(4) == [0, 2, 0, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_peft_forward_passes(family, tmp_path):
    """PEFT 0.21's own generate() is not the oracle (it drops the prefix under transformers 5):
    greedy decoding by repeated full forward passes of the PEFT model is."""
    base = _generating(_model(family, lively=True))
    peft_model = _peft_twin(base, str(tmp_path / "peft"))
    ours = load_peft_prefix(copy.deepcopy(base), str(tmp_path / "peft"))
    inputs = _inputs(base)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tokens = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **GREEDY)
    expected = torch.full((ids.shape[0], 1), base.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(6):
            logits = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=expected).logits[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_round_trips(family, tmp_path):
    """save_peft_prefix writes PEFT's table in PEFT's layer order: PEFT loads it and computes our
    logits, and it imports back to the same prefix."""
    from peft import PeftModel

    base = _model(family)
    model = _random_prefix(add_prefix_tuning(copy.deepcopy(base), 4, sites="decoder"))
    save_peft_prefix(model, str(tmp_path / "peft"))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "peft")).eval()
    inputs = _inputs(base)
    assert_fp32_close("PEFT export", _logits(model, inputs), _logits(peft_model, inputs),
                      _logits(peft_float64(base, str(tmp_path / "peft")), inputs))
    back = load_peft_prefix(copy.deepcopy(base), str(tmp_path / "peft"))
    assert torch.equal(get_prefix_encoder(back).weight, get_prefix_encoder(model).weight)


def test_peft_export_refuses_what_peft_cannot_hold(tmp_path):
    three = add_prefix_tuning(tiny_model("bart"), 4)
    with pytest.raises(ValueError, match=r"sites \('encoder', 'decoder', 'cross'\).*sites=\('decoder',\)"):
        save_peft_prefix(three, str(tmp_path / "a"))
    # 4 layers: PEFT gives decoder layers 0 and 2 one table entry (2 l mod 4), so they must agree
    even = _random_prefix(add_prefix_tuning(tiny_model("bart", encoder_layers=4, decoder_layers=4), 4,
                                            sites="decoder"))
    with pytest.raises(ValueError, match=r"decoder layers 0 and 2 the same entry"):
        save_peft_prefix(even, str(tmp_path / "b"))
    with torch.no_grad():
        weight = get_prefix_encoder(even).weight
        weight[2:4] = weight[0:2]
    save_peft_prefix(even, str(tmp_path / "c"))  # representable now


def test_peft_adapter_of_the_wrong_kind_is_refused(tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    llama = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    llama.save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(ValueError, match=r"num_transformer_submodules=1.*BartForConditionalGeneration is an "
                                         r"encoder-decoder"):
        load_peft_prefix(tiny_model("bart"), str(tmp_path / "llama"))
    _peft_twin(tiny_model("bart"), str(tmp_path / "bart"))
    with pytest.raises(ValueError, match=r"num_transformer_submodules=2.*LlamaForCausalLM"):
        load_peft_prefix(tiny_model("llama"), str(tmp_path / "bart"))
    with pytest.raises(ValueError, match=r"sites"):
        load_peft_prefix(add_prefix_tuning(tiny_model("bart"), 5), str(tmp_path / "bart"))


# --------------------------------------------------------------------------- generation

@pytest.mark.parametrize("family", FAMILIES)
def test_generation_keeps_the_prefixes_out_of_the_cache(family):
    """All three prefixes: generate() (cached decoding) gives the tokens of greedy decoding by full
    forward passes and of the float64 oracle's generate; the self-attention cache holds only the
    generated tokens, the cross-attention cache only the source."""
    model = _random_prefix(add_prefix_tuning(_generating(_model(family, lively=True)), 5))
    inputs = _inputs(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True,
                         **GREEDY)
    tokens = out.sequences
    expected = tokens[:, :1]
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=expected, use_cache=False).logits
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, expected) and len(set(tokens[:, 1:].flatten().tolist())) > 2
    assert torch.equal(oracle_copy(model).double().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                            **GREEDY), tokens)
    cache = getattr(out, "cache", None) or out.past_key_values
    assert cache.self_attention_cache.get_seq_length() == tokens.shape[1] - 1
    assert cache.cross_attention_cache.layers[0].keys.shape[2] == ids.shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_steps_match_the_full_forward(family):
    """Logits of decoding with the cache, two tokens then one at a time, equal the full forward's:
    the cache (no prefix in it) and what is computed from its length (BART's positions, T5's bias of
    the prefix keys: P + cache length - j places back) line up."""
    model = _random_prefix(add_prefix_tuning(_model(family), 5))
    inputs = _inputs(model)
    full = _logits(model, inputs)
    decoder_ids = inputs.pop("decoder_input_ids")
    with torch.no_grad():
        out = model(**inputs, decoder_input_ids=decoder_ids[:, :2], use_cache=True)
        steps = [out.logits]
        for t in range(2, decoder_ids.shape[1]):
            out = model(**inputs, decoder_input_ids=decoder_ids[:, t:t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bank_generation_keeps_each_rows_task_through_beams(family):
    model = _random_prefix(add_prefix_tuning(_generating(_model(family, lively=True)), 4, num_tasks=2))
    inputs = _inputs(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    index = torch.tensor([1, 0, 1])
    kwargs = dict(max_new_tokens=5, num_beams=2, do_sample=False, min_length=0, no_repeat_ngram_size=0)
    tokens = model.generate(input_ids=ids, attention_mask=mask, prefix_index=index, **kwargs)
    assert not torch.equal(model.generate(input_ids=ids, attention_mask=mask, prefix_index=1 - index, **kwargs),
                           tokens)  # the tasks differ, so a row that took the wrong one would show
    for row in range(3):
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                               prefix_index=int(index[row]), **kwargs)
        assert torch.equal(alone[0], tokens[row, :alone.shape[1]])


# --------------------------------------------------------------------------- training

# T5's prefix keys carry a bias, so its attention runs as two kernel calls, each with its own dropout
# stream, which the oracle's single stream cannot reproduce: here T5 runs without dropout, and
# test_prefix_bias_merge_is_exact checks the two calls' dropout against the concatenated softmax.
NO_T5_DROPOUT = {"bart": dict(attention_dropout=0.1), "t5": dict(dropout_rate=0.0)}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_prefix_and_only_the_prefixes(family):
    """Train mode (BART: its 0.1 residual dropout and attention dropout 0.1 in every attention; the
    float64 oracle, seeded alike, drops the same entries): the loss and all three prefixes'
    gradients match the oracle; every slot's keys and values get a gradient, nothing else does."""
    model = add_prefix_tuning(_model(family, **NO_T5_DROPOUT[family]), 4).train()
    inputs = _inputs(model)
    inputs["labels"] = inputs.pop("decoder_input_ids")

    def grads(m):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = m(**inputs).loss
        loss.backward()
        return loss.detach(), get_prefix_encoder(m).weight.grad.clone()

    loss, got = grads(model)
    calls = ORACLE_CALLS[0]
    oracle_loss, expected = grads(oracle_copy(model).double())
    assert ORACLE_CALLS[0] - calls == 3 * L, "the oracle did not run every attention"
    torch.testing.assert_close(loss, oracle_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-6)
    assert (got.abs().sum(dim=(2, 3, 4, 5)) > 0).all(), "a slot's prefix keys or values got no gradient"
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["prefix_encoder.weight"]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_with_a_bank(family):
    """Checkpointing (which PEFT's prefix tuning refuses) changes neither loss nor gradients, with the
    dropouts on (the recomputation redraws the same stream); the bank's unused entry gets none."""
    overrides = {"bart": dict(attention_dropout=0.1), "t5": {}}[family]  # T5: its default 0.1 everywhere
    model = add_prefix_tuning(_model(family, **overrides), 4, num_tasks=3).train()
    inputs = _inputs(model)
    inputs["labels"] = inputs.pop("decoder_input_ids")
    inputs["prefix_index"] = torch.tensor([2, 0, 2])

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), get_prefix_encoder(model).weight.grad.clone()

    loss, expected = grads()
    model.gradient_checkpointing_enable()
    loss_gc, got = grads()
    assert torch.equal(loss_gc, loss) and torch.equal(got, expected)
    assert got[:, :, 1].abs().sum() == 0 and got[:, :, [0, 2]].abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_with_its_default_config(family):
    """The default dropouts (BART: 0.1 residual; T5: 0.1 residual and attention): 25 AdamW steps on a
    copy task cut the loss by a quarter or more; the model's own weights do not move. (BART with
    lively random weights, as in test_hf_models.py; T5's own initialisation is lively enough.)"""
    torch.manual_seed(0)
    model = add_prefix_tuning(_model(family, lively=family == "bart"), 8).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("prefix_encoder")}
    ids = torch.randint(3, 11, (8, 10), generator=torch.Generator().manual_seed(0))  # a small alphabet
    optimizer = torch.optim.AdamW(get_prefix_encoder(model).parameters(), lr=1e-1)
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# --------------------------------------------------------------------------- saving, undoing, errors

@pytest.mark.parametrize("sites", [None, ("encoder", "cross")], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trips(family, sites, tmp_path):
    model = _random_prefix(add_prefix_tuning(_model(family), 4, sites=sites, prefix_projection=True,
                                             encoder_hidden_size=16, num_tasks=2))
    save_prefix(model, str(tmp_path))
    loaded = load_prefix(_model(family), str(tmp_path))
    assert get_tuning(loaded).geometry == get_tuning(model).geometry
    inputs = dict(_inputs(model), prefix_index=torch.tensor([1, 0, 1]))
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    other = add_prefix_tuning(_model(family), 4, sites="decoder", prefix_projection=True, encoder_hidden_size=16,
                              num_tasks=2)
    with pytest.raises(ValueError, match="sites"):
        load_prefix(other, str(tmp_path))
    with pytest.raises(ValueError, match="encoder-decoder model"):
        load_prefix(tiny_model("llama"), str(tmp_path))


@pytest.mark.parametrize("family", FAMILIES)
def test_disabled_and_removed_is_the_base_model(family):
    base = _model(family)
    model = _random_prefix(add_prefix_tuning(copy.deepcopy(base), 4))
    inputs = _inputs(base)
    expected = _logits(base, inputs)
    with prefix_disabled(model):
        torch.testing.assert_close(_logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    remove_prefix_tuning(model)
    assert not any(SLOT_ATTR in m.__dict__ for m in model.modules())
    assert model.config._attn_implementation == base.config._attn_implementation
    assert torch.equal(_logits(model, inputs), expected)
    assert all(p.requires_grad for p in model.parameters())


def test_bad_sites_and_shapes_are_refused():
    with pytest.raises(ValueError, match=r"sites must name one or more of .*got \('decoder', 'self'\)"):
        add_prefix_tuning(tiny_model("bart"), 4, sites=("decoder", "self"))
    with pytest.raises(ValueError, match=r"got \(\)"):
        add_prefix_tuning(tiny_model("bart"), 4, sites=())
    with pytest.raises(ValueError, match="sites=.*is for encoder-decoder models"):
        add_prefix_tuning(tiny_model("llama"), 4, sites="decoder")
    uneven = tiny_model("bart", decoder_attention_heads=2)
    with pytest.raises(ValueError, match=r"4 heads of dim 16.*2 heads of dim 32"):
        add_prefix_tuning(uneven, 4)
    model = add_prefix_tuning(uneven, 4, sites="encoder")  # the prefixed attention agrees
    assert get_prefix_encoder(model).num_kv_heads == 4
    assert uneven.config._attn_implementation == "prefix_attn"
    fresh = tiny_model("bart")
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        hf.init_prefix_from_text(add_prefix_tuning(fresh, 2), torch.tensor([5, 6]))


# --------------------------------------------------------------------------- T5's prefix bias

@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("prefix_kind", ["shared", "bank", "per-row"])
def test_prefix_bias_merge_is_exact(prefix_kind, backend):
    """T5's path (two kernel calls, the sequence and the prefix keys each with their own bias, merged
    by log-sum-exp) against float64 attention over explicitly concatenated [prefix ; sequence] keys
    and [prefix bias ; sequence bias]: outputs and the gradients of q, k, v and the prefix. With
    dropout 0.3, the two calls' own masks (recorded), concatenated, applied to the float64
    softmax; causal, and a row whose sequence keys are all padding (only the prefix is left)."""
    B, Hq, Nq, Nk, P, Dh, p = 3, 4, 5, 7, 3, 16, 0.3
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()

    q, k, v = rand(B, Hq, Nq, Dh), rand(B, Hq, Nk, Dh), rand(B, Hq, Nk, Dh)
    rows = {"shared": (Hq, P, Dh), "bank": (2, Hq, P, Dh), "per-row": (B, Hq, P, Dh)}[prefix_kind]
    pk, pv = rand(*rows), rand(*rows)
    index = torch.tensor([1, 0, 1]) if prefix_kind == "bank" else None
    seq_bias, prefix_bias = torch.randn(1, Hq, Nq, Nk, generator=g), torch.randn(1, Hq, Nq, P, generator=g)
    padding = torch.ones(B, Nk, dtype=torch.bool)
    padding[2] = False
    with _dropout.record_masks() as calls:
        out = t5.attend_with_prefix_bias(q, k, v, pk, pv, prefix_bias, index, causal=True, softmax_scale=1.0,
                                         key_padding_mask=padding, attn_mask=seq_bias, dropout_p=p, backend=backend)
    assert [c.shape for c in calls] == [(B, Hq, Nq, 0, Nk), (B, Hq, Nq, 0, P)]
    keep = torch.cat([calls[1].mask(), calls[0].mask()], -1)  # prefix keys first

    def reference(q, k, v, pk, pv):
        if prefix_kind == "shared":
            pk, pv = pk.expand(B, -1, -1, -1), pv.expand(B, -1, -1, -1)
        elif prefix_kind == "bank":
            pk, pv = pk[index], pv[index]
        keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        scores = q @ keys.transpose(-1, -2) + torch.cat([prefix_bias, seq_bias], -1).double()
        causal = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + (Nk - Nq)
        visible = torch.cat([torch.ones(B, 1, Nq, P, dtype=torch.bool), (causal & padding[:, None, None, :])], -1)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) * keep / (1 - p)
        return probs @ values

    inputs = [t.detach().double().requires_grad_() for t in (q, k, v, pk, pv)]
    expected = reference(*inputs)
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-5)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    (expected * w.double()).sum().backward()
    for name, got, ref in zip(("q", "k", "v", "prefix_k", "prefix_v"), (q, k, v, pk, pv), inputs):
        torch.testing.assert_close(got.grad, ref.grad.float(), rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_t5_refusals():
    encoder_only = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4))
    with pytest.raises(NotImplementedError, match=r"T5EncoderModel.*relative position bias.*encoder-decoder"):
        add_prefix_tuning(encoder_only, 4)
    model = add_prefix_tuning(_model("t5"), 4)
    model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="relative position bias requires grad"):
        model(**_inputs(model))


# --------------------------------------------------------------------------- the benchmark

@pytest.mark.parametrize("model_name", ["t5-small-config", "bart-base-config"])
def test_seq2seq_benchmark_compares_like_with_like(model_name):
    """benchmarks/bench_seq2seq.py at tiny shapes: its "ours" and "peft" models compute the same
    logits from the same prefix values (so its ratios compare one computation), "ours-all" a
    different one; a training step runs for each."""
    import os
    import sys

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import bench_seq2seq

    base = bench_seq2seq.base_model(model_name, tiny=True).eval()
    shape = bench_seq2seq.TINY_SHAPE
    models = {impl: bench_seq2seq.build(impl, copy.deepcopy(base), shape["prefix"]).eval()
              for impl in bench_seq2seq.IMPLS}
    inputs = _inputs(base, batch=2, source=shape["source"], target=shape["target"])
    logits = {impl: _logits(model, inputs) for impl, model in models.items()}
    torch.testing.assert_close(logits["ours"], logits["peft"], rtol=1e-4, atol=1e-4)
    assert (logits["ours-all"] - logits["peft"]).abs().max() > 1e-3
    for impl, model in models.items():
        loss = bench_seq2seq.make_step(model, shape)()
        assert torch.isfinite(loss), impl


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generation_matches_dynamic(family):
    """A StaticCache's keys span its whole buffer, so the key count does not say where the queries
    are: T5's prefix bias takes the cache length the hook passes. Scores of static-cache generation
    stay as close to the dynamic cache's as the plain model's do (transformers' own static T5 path
    differs by ~1e-3 from its dynamic one)."""
    kwargs = dict(max_new_tokens=6, output_scores=True, return_dict_in_generate=True, **GREEDY)

    def drift(model):
        inputs = _inputs(model)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        dynamic = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        static = model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
        return dynamic, static, max((a - b).abs().max().item() for a, b in zip(dynamic.scores, static.scores))

    _, _, plain = drift(_generating(_model(family, lively=True)))
    dynamic, static, ours = drift(_random_prefix(add_prefix_tuning(_generating(_model(family, lively=True)), 5)))
    assert ours <= 2 * plain + 1e-5, (ours, plain)
    assert torch.equal(dynamic.sequences, static.sequences)


def test_unchecked_encoder_decoders_are_refused_by_name():
    umt5 = transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=1, num_heads=4))
    with pytest.raises(NotImplementedError, match=r"UMT5ForConditionalGeneration \(model_type 'umt5'\).*not been "
                                                  r"checked on; supported: bart"):
        add_prefix_tuning(umt5, 4)
    assert umt5.config._attn_implementation != "prefix_attn"
    bart = _model("bart")
    bart.model.decoder.layers[1].self_attn.is_causal = False  # as BigBirdPegasus and PegasusX build it
    with pytest.raises(NotImplementedError, match=r"decoder.layers.1.self_attn.*is_causal=False.*should be True"):
        add_prefix_tuning(bart, 4)
