"""The task head of sequence classification, token classification and question answering models
trains with the prefix by default (P-Tuning v2, and PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS task
types), is saved and loaded with it, and train_head=False freezes it.

The models keep their configs' own init (std 0.02): the freshly initialised head then predicts a
near-uniform distribution, which a prefix alone cannot move far in 25 steps (the loss goes from
1.106 to 1.107 on the BERT task below), and which a trained head moves quickly."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from hf_testing import encoder_batch, tiny_config, tiny_model
from prefix_attn.integrations.transformers import (add_prefix_tuning, get_prefix_encoder, load_peft_prefix,
                                                   load_prefix, remove_prefix_tuning, save_peft_prefix, save_prefix)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _qa_model(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertForQuestionAnswering(tiny_config("bert-seq", num_labels=2)).eval()


def _llama_classifier(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.LlamaForSequenceClassification(tiny_config("llama", num_labels=3)).eval()


#: (model, the head's parameter names, labels for an encoder batch of 8 rows)
CASES = {
    "bert-seq": (lambda: tiny_model("bert-seq"), ["classifier.weight", "classifier.bias"],
                 lambda ids, mask: dict(labels=torch.arange(ids.shape[0]) % 3)),
    "roberta-token": (lambda: tiny_model("roberta-token"), ["classifier.weight", "classifier.bias"],
                      lambda ids, mask: dict(labels=(ids % 3).masked_fill(mask == 0, -100))),
    "bert-qa": (_qa_model, ["qa_outputs.weight", "qa_outputs.bias"],
                lambda ids, mask: dict(start_positions=torch.arange(ids.shape[0]) % 5,
                                       end_positions=torch.arange(ids.shape[0]) % 5 + 3)),
    "roberta-seq": (lambda: tiny_model("roberta-seq"), ["classifier.dense.weight", "classifier.dense.bias",
                                                        "classifier.out_proj.weight", "classifier.out_proj.bias"],
                    lambda ids, mask: dict(labels=torch.arange(ids.shape[0]) % 3)),
    "llama-seq": (_llama_classifier, ["score.weight"], lambda ids, mask: dict(labels=torch.arange(ids.shape[0]) % 3)),
}


def _inputs(case, model):
    ids, mask = encoder_batch(model, batch=8, length=12)
    return dict(input_ids=ids, attention_mask=mask, **CASES[case][2](ids, mask))


def _train(model, inputs, steps=25):
    """AdamW over whatever add_prefix_tuning left trainable, as a user's optimizer would be built."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("case", ["bert-seq", "roberta-token", "bert-qa"])
def test_default_call_trains_the_head_and_the_loss_falls(case):
    """The default call: the head and the prefix train, nothing else; 25 AdamW steps cut the loss by
    more than a third (with the head frozen it stays within 0.02 of where it started)."""
    make, head, _ = CASES[case]
    model = add_prefix_tuning(make(), 8).train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == head + ["prefix_encoder.weight"]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model, _inputs(case, model))
    assert sum(losses[-3:]) / 3 < 0.65 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("case", ["bert-seq", "roberta-token", "bert-qa"])
def test_train_head_false_freezes_it(case):
    """train_head=False: the prefix trains alone; the head gets no gradient and does not move, and the
    loss barely does (what the default call avoids)."""
    make, head, _ = CASES[case]
    model = add_prefix_tuning(make(), 8, train_head=False).train()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix_encoder.weight"]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in head}
    losses = _train(model, _inputs(case, model))
    params = dict(model.named_parameters())
    assert all(params[n].grad is None and torch.equal(params[n], before[n]) for n in head)
    assert sum(losses[-3:]) / 3 > 0.9 * losses[0], losses


@pytest.mark.parametrize("case", ["roberta-seq", "llama-seq"])
def test_head_found_whatever_its_module(case):
    """RoBERTa's sequence head is a module of two linears (dense, out_proj); Llama's is `score`."""
    make, head, _ = CASES[case]
    model = add_prefix_tuning(make(), 4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == head + ["prefix_encoder.weight"]
    remove_prefix_tuning(model)
    assert all(p.requires_grad for p in model.parameters())


def test_language_models_keep_their_lm_head_frozen():
    model = add_prefix_tuning(tiny_model("llama"), 4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prefix_encoder.weight"]


def test_unrecognised_head_is_refused():
    """A task model whose head is none of classifier / score / qa_outputs: refused, with the way out;
    train_head=False then works."""
    model = tiny_model("bert-seq")
    model.head = model.classifier  # renamed: no module the integration recognises
    del model.classifier
    with pytest.raises(NotImplementedError, match="cannot find the task head of BertForSequenceClassification.*"
                                                  "train_head=False"):
        add_prefix_tuning(model, 4)
    assert model.config._attn_implementation != "prefix_attn" and all(p.requires_grad for p in model.parameters())
    add_prefix_tuning(model, 4, train_head=False)


def test_head_saved_and_loaded_with_the_prefix(tmp_path):
    """save_prefix writes the trained head beside the prefix (safetensors); load_prefix into a fresh
    model gives the same logits and trains the head on; a model with prefix tuning (head frozen or
    not) gets the head loaded; PEFT export and import of the prefix still work."""
    case = "bert-seq"
    make, head, _ = CASES[case]
    model = add_prefix_tuning(make(), 6).train()
    inputs = _inputs(case, model)
    _train(model, inputs, steps=5)
    model.eval()
    save_prefix(model, str(tmp_path / "p"))
    config = json.loads((tmp_path / "p" / "prefix_config.json").read_text())
    assert config["head"] == sorted(head) and config["format_version"] == 2
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / "p" / "prefix_model.safetensors"))) == \
        sorted(["weight"] + [f"task_head.{n}" for n in head])
    with torch.no_grad():
        expected = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        for into in (make(), add_prefix_tuning(make(), 6, train_head=False)):
            loaded = load_prefix(into, str(tmp_path / "p")).eval()
            assert torch.equal(loaded(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits,
                               expected)
    fresh = load_prefix(make(), str(tmp_path / "p"))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == head + ["prefix_encoder.weight"]

    # PEFT's format holds the prefix alone: exported and imported as before
    with pytest.warns(UserWarning, match="the trained task head .*classifier.weight.* is not in it"):
        save_peft_prefix(model, str(tmp_path / "peft"))
    again = load_peft_prefix(make(), str(tmp_path / "peft"))
    assert torch.equal(get_prefix_encoder(again).weight, get_prefix_encoder(model).weight)


def test_file_without_head_loads(tmp_path):
    """A prefix saved with the head frozen (or by an older prefix_attn: format version 1) has no head
    tensors: it loads into a fresh model, which keeps its own head, frozen, as it was saved."""
    case = "bert-seq"
    make, head, _ = CASES[case]
    model = add_prefix_tuning(make(), 6, train_head=False)
    save_prefix(model, str(tmp_path / "p"))
    config = json.loads((tmp_path / "p" / "prefix_config.json").read_text())
    assert "head" not in config and config["format_version"] == 1
    fresh = make()
    own_head = {n: p.detach().clone() for n, p in fresh.named_parameters() if n in head}
    load_prefix(fresh, str(tmp_path / "p"))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["prefix_encoder.weight"]
    assert all(torch.equal(p, own_head[n]) for n, p in fresh.named_parameters() if n in head)
    assert torch.equal(get_prefix_encoder(fresh).weight, get_prefix_encoder(model).weight)


def test_head_file_refused_where_it_does_not_fit(tmp_path):
    """A head is written only into the model's own task head, of the same shapes: a model without a
    head, or with another number of labels, is refused before anything is loaded."""
    model = add_prefix_tuning(tiny_model("bert-seq"), 4)
    save_prefix(model, str(tmp_path / "p"))
    torch.manual_seed(0)
    other = transformers.BertForSequenceClassification(tiny_config("bert-seq", num_labels=5))
    with pytest.raises(ValueError, match=r"the task head .*\n  classifier.bias: file has \[3\], model has \[5\]"):
        load_prefix(other, str(tmp_path / "p"))
    torch.manual_seed(0)
    no_head = transformers.BertModel(tiny_config("bert-seq"))
    with pytest.raises(ValueError, match="comes with a task head"):
        load_prefix(no_head, str(tmp_path / "p"))


def test_remove_restores_the_head_flags():
    model = copy.deepcopy(tiny_model("bert-seq"))
    model.classifier.bias.requires_grad_(False)  # whatever the user had
    add_prefix_tuning(model, 4)
    remove_prefix_tuning(model)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["classifier.bias"]
