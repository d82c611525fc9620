"""TRL's SFTTrainer with its default config (bf16=True, which SFTConfig sets whenever fp16 is not
set, on CPU too; gradient checkpointing on) trains the real SmolLM2-135M-Instruct prefix-tuned
by prefix_attn, without and with packing (TRL's default "bfd" packing: padding-free rows with
restarting position_ids, no attention mask), saves the prefix, reloads it into a fresh copy of
the model and generates the same tokens. Skipped without trl (pip install "prefix_attn[test]")
or without the model's wheel."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from hf_testing import prefix_attention, prefix_attention_replaced  # noqa: E402
from prefix_attn.integrations.transformers import (add_prefix_tuning, get_prefix_encoder,  # noqa: E402
                                                   init_prefix_from_text, load_prefix, save_prefix)

# One batch (every step trains on it, so its loss must fall), of different lengths (padding).
TEXTS = [
    "The capital of Peru is Lima, on the coast of the Pacific.",
    "Prefix tuning trains a few key and value vectors per layer.",
    "Mixed precision computes in bfloat16.",
]


class _DtypeSpy:
    """Records the dtype of every prefix_attention result the integration gets."""

    def __enter__(self):
        self.seen = []

        def spy(*args, **kwargs):
            out = prefix_attention(*args, **kwargs)
            self.seen.append((out[0] if isinstance(out, tuple) else out).dtype)
            return out

        self._replaced = prefix_attention_replaced(spy)
        self._replaced.__enter__()
        return self

    def __exit__(self, *exc):
        self._replaced.__exit__(*exc)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sft_trainer_default_config_trains_saves_reloads(smollm2, packing, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    base, tokenizer = smollm2
    model = add_prefix_tuning(copy.deepcopy(base), 8)
    # a prefix the model can read (its own activations for a text), not N(0, 1) noise
    text = tokenizer("Answer every question in one short, clear sentence.", return_tensors="pt")["input_ids"]
    init_prefix_from_text(model, text[:, :8])
    table = get_prefix_encoder(model).weight
    before = table.detach().clone()
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, max_steps=3, per_device_train_batch_size=3,
                     learning_rate=3e-3, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
                     max_length=32, packing=packing, dataloader_num_workers=0, seed=0)
    assert args.bf16 and not args.fp16, "TRL's default is bf16 mixed precision"
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                         processing_class=tokenizer)
    with _DtypeSpy() as spy:
        trainer.train()
    assert spy.seen and set(spy.seen) == {torch.bfloat16}, set(spy.seen)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert table.dtype == torch.float32 and get_prefix_encoder(model).weight is table
    assert not torch.equal(table.detach(), before), "the prefix did not train"

    # Accelerate leaves the model's forward wrapped in its bf16 autocast after training; the
    # comparison below is of float32 runs
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False).eval()
    save_prefix(model, str(tmp_path / "prefix"))
    reloaded = load_prefix(copy.deepcopy(base), str(tmp_path / "prefix")).eval()
    batch = tokenizer(["The capital of Peru is", "Prefix tuning"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model.generate(**batch, max_new_tokens=8, do_sample=False)
        again = reloaded.generate(**batch, max_new_tokens=8, do_sample=False)
        plain = base.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, again), f"\ntrained  {got}\nreloaded {again}"
    assert not torch.equal(got, plain), "the trained prefix changes nothing: the test shows nothing"


def test_padding_free_batch_equals_separate_rows():
    """TRL's packing hands the model one row of several sequences (its padding-free collator:
    position_ids restarting at 0, no attention mask, the varlen kwargs). Each sequence must see
    the prefix and its own earlier tokens only: its logits equal those of the sequence alone.
    transformers looks for packed sequences only without a cache (use_cache=False, as in
    training); with one, plain sdpa attention mixes the sequences too."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from hf_testing import random_prefix, tiny_model

    model = random_prefix(add_prefix_tuning(tiny_model("llama"), 5))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 120, (n,), generator=g) for n in (7, 4, 9)]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": r} for r in rows])
    assert "attention_mask" not in batch and batch["position_ids"].shape == (1, 20)
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=r[None], use_cache=False).logits[0] for r in rows])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
