"""Prompt-tune SmolLM2-135M-Instruct to answer questions over retrieved passages (RAG), on CPU.

    python examples/rag_prompt_tuning.py                  # a few minutes on 2 CPU cores
    python examples/rag_prompt_tuning.py --steps 60 --num-virtual-tokens 32

The corpus (examples/data/rag_islands.json) describes a made-up archipelago: no model knows these
facts, so every answer has to come from the passages. For each question BM25 retrieves the top
passages (the `bm25s` library; without it, the small Okapi BM25 below, with the same formula), and
the model sees them in its chat prompt. Before tuning, SmolLM2 answers in long sentences, or
wanders off; the task asks for the answer's exact words (SQuAD's exact match: lower case, no
punctuation or articles). A soft prompt of P virtual tokens is then trained through prefix_attn's
prompt tuning (the prompt runs once per step as a batch of one, its keys and values are every
row's shared prefix: prefix_attn.integrations.prompt_tuning), on the questions about the first
20 passages; exact match is reported on the questions about the other 10, which training never
saw, before and after. Finally the trained prompt is exported as a fixed prefix
(export_prompt_as_prefix), which answers the same.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import string
import sys
import time
from collections import Counter
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from smollm2 import load_smollm2  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "rag_islands.json")
TRAIN_PASSAGES = 20  # questions about passages p00 .. p19 train; the rest evaluate
SYSTEM = "Answer from the passages."  # shorter than SmolLM2's default system prompt: fewer tokens per step
INIT_TEXT = "Answer the question with the exact words from the passages, nothing else."
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset("a an and are as at be by for from has have how in is it its of on or that the their there "
                       "these this to was were what when where which who whose why with".split())


# --------------------------------------------------------------------------- retrieval

def _terms(text: str) -> List[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]


class OkapiBM25:
    """Okapi BM25 (Robertson et al.), the formula bm25s uses by default ("lucene" variant):
    score(q, d) = sum over query terms t of idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5)). Only for when bm25s is not installed; on this
    corpus it ranks the same passage first as bm25s for every question (its tokenizer differs)."""

    def __init__(self, docs: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs = [Counter(_terms(d)) for d in docs]
        self.lengths = [sum(c.values()) for c in self.docs]
        self.avgdl = sum(self.lengths) / len(self.docs)
        df = Counter(t for c in self.docs for t in c)
        n = len(self.docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def top(self, query: str, k: int) -> List[int]:
        scores = []
        for i, (counts, length) in enumerate(zip(self.docs, self.lengths)):
            s = 0.0
            for t in _terms(query):
                tf = counts.get(t, 0)
                if tf:
                    s += self.idf[t] * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / self.avgdl))
            scores.append((s, -i))
        return [-i for _, i in sorted(scores, reverse=True)[:k]]


def retriever(passages: Sequence[str]):
    """(name, function query -> top-k passage indices)."""
    try:
        import bm25s
    except ImportError:
        index = OkapiBM25(passages)
        return "OkapiBM25 (examples/rag_prompt_tuning.py; pip install bm25s to use bm25s)", index.top

    model = bm25s.BM25()
    model.index(bm25s.tokenize(list(passages), stopwords=sorted(_STOPWORDS), show_progress=False),
                show_progress=False)

    def top(query: str, k: int) -> List[int]:
        found, _ = model.retrieve(bm25s.tokenize([query], stopwords=sorted(_STOPWORDS), show_progress=False), k=k,
                                  show_progress=False)
        return [int(i) for i in found[0]]

    return f"bm25s {bm25s.__version__}", top


# --------------------------------------------------------------------------- the task

def chat_prompt(tokenizer, passages: Sequence[Dict[str, str]], question: str) -> str:
    context = "\n".join(f"[{i + 1}] {p['title']}: {p['text']}" for i, p in enumerate(passages))
    content = f"Passages:\n{context}\n\nQuestion: {question}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    return sum(normalize(p) == normalize(a) for p, a in zip(predictions, answers)) / len(answers)


def encode_examples(tokenizer, examples):
    """input_ids and labels (the answer and its end-of-turn token only) per example."""
    rows = []
    for ex in examples:
        prompt_ids = tokenizer(ex["prompt"], add_special_tokens=False).input_ids
        answer_ids = tokenizer(ex["answer"] + tokenizer.eos_token, add_special_tokens=False).input_ids
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return rows


def batch_of(rows, pad_id: int):
    """Right-padded batch; padded positions are masked and carry no loss."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def answer_all(model, tokenizer, prompts: Sequence[str], batch_size: int = 10, max_new_tokens: int = 16) -> List[str]:
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True,
                          add_special_tokens=False)
        tokens = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        for row in tokens[:, batch["input_ids"].shape[1]:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--num-virtual-tokens", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=1, help="passages retrieved per question")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in logs)")
    args = ap.parse_args(argv)

    from tqdm.auto import tqdm

    from prefix_attn.integrations.prompt_tuning import add_prompt_tuning, export_prompt_as_prefix
    from prefix_attn.integrations.transformers import prefix_disabled

    torch.manual_seed(args.seed)
    with open(DATA) as f:
        data = json.load(f)
    passages = data["passages"]
    position = {p["id"]: i for i, p in enumerate(passages)}
    name, top = retriever([f"{p['title']}. {p['text']}" for p in passages])

    model, tokenizer = load_smollm2()
    examples = {"train": [], "test": []}
    hits = Counter()
    for q in data["questions"]:
        found = top(q["question"], args.top_k)
        split = "train" if position[q["passage"]] < TRAIN_PASSAGES else "test"
        hits[split] += position[q["passage"]] in found
        examples[split].append({"prompt": chat_prompt(tokenizer, [passages[i] for i in found], q["question"]),
                                "answer": q["answer"], "question": q["question"]})
    print(f"retrieval: {name}; the right passage is in the top {args.top_k} for "
          f"{hits['train']}/{len(examples['train'])} training and {hits['test']}/{len(examples['test'])} held-out "
          "questions")

    add_prompt_tuning(model, args.num_virtual_tokens, init_text=INIT_TEXT, tokenizer=tokenizer)
    print(f"prompt tuning: {model.prefix_encoder}; "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    test_prompts = [ex["prompt"] for ex in examples["test"]]
    test_answers = [ex["answer"] for ex in examples["test"]]
    model.eval()
    with prefix_disabled(model):
        before = answer_all(model, tokenizer, test_prompts)
    em_before = exact_match(before, test_answers)
    print(f"exact match before tuning (held-out questions): {em_before:.0%}")

    rows = encode_examples(tokenizer, examples["train"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, args.steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    losses, t0 = [], time.time()
    bar = tqdm(range(args.steps), desc="prompt tuning", disable=args.no_progress)
    for step in bar:
        pick = torch.randint(0, len(rows), (args.batch_size,), generator=g).tolist()
        loss = model(**batch_of([rows[i] for i in pick], tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    print(f"trained {args.steps} steps in {time.time() - t0:.0f} s; loss {first:.3f} -> {last:.3f} "
          "(means of the first and last 5 steps)")

    model.eval()
    after = answer_all(model, tokenizer, test_prompts)
    em_after = exact_match(after, test_answers)
    print("\nheld-out questions (their passages were never in training):")
    for ex, b, a in list(zip(examples["test"], before, after))[:6]:
        print(f"  Q: {ex['question']}  (answer: {ex['answer']})\n    before: {b[:80]!r}\n    after:  {a[:80]!r}")
    print(f"\nexact match on {len(test_answers)} held-out questions: {em_before:.0%} before tuning, "
          f"{em_after:.0%} after")

    export_prompt_as_prefix(model)
    exported = answer_all(model, tokenizer, test_prompts)
    print(f"exported as a fixed prefix ({model.prefix_encoder.__class__.__name__}, no prompt pass per call): "
          f"same answers: {exported == after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
