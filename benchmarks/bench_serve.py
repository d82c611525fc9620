"""Serving many prefix adapters: our server against PEFT grouped per adapter and the base model.

    python benchmarks/bench_serve.py [--requests 64 --prompt-len 64 --new-tokens 64 --adapters 8]

SmolLM2-135M-Instruct on CPU (float32). See benchmarks/README.md ("Serving many adapters") for
what each line measures and the prediction. Prints a markdown table; --out FILE writes it too.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import os
import statistics
import sys
import tempfile
import threading
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def summary(name, latencies, wall, tokens):
    return {"name": name, "tok_s": tokens / wall, "wall": wall, "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99)}


def cache_sizes(jobs, new_tokens, page_size=32, max_batch_tokens=512):
    """The same paged cache for ours and base-cb, sized to hold every request at once (transformers'
    own sizing on CPU reserves most of the free memory and made every step several times slower)."""
    blocks = sum(-(-(len(ids) + new_tokens) // page_size) for _, ids in jobs) + 8
    return {"page_size": page_size, "num_blocks": blocks, "max_batch_tokens": max_batch_tokens}


def make_adapters(base, n, P, root):
    from prefix_attn.integrations import transformers as hf

    paths = []
    for i in range(n):
        model = hf.add_prefix_tuning(copy.deepcopy(base), P)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            w = hf.get_prefix_encoder(model).weight
            w.copy_(torch.randn(w.shape, generator=g))
        path = os.path.join(root, f"task{i}")
        hf.save_peft_prefix(model, path)  # a PEFT adapter: PEFT and our server read the same file
        paths.append(path)
        del model
    return paths


def run_ours(base, tokenizer, paths, jobs, new_tokens, P, with_adapters=True):
    import httpx
    import uvicorn

    from prefix_attn.serve.app import Limits, build_app
    from prefix_attn.serve.engine import Engine

    engine = Engine(copy.deepcopy(base), num_virtual_tokens=P, max_adapters=len(paths), max_queue=len(jobs) + 1,
                    **cache_sizes(jobs, new_tokens))
    for i, path in enumerate(paths):
        engine.load_adapter(f"task{i}", path)
    app = build_app(engine, tokenizer, base_name="base", limits=Limits(max_new_tokens=new_tokens, max_context=4096))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    async def one(client, adapter, ids, t0):
        body = {"prompt": ids, "max_tokens": new_tokens, "temperature": 0}
        if with_adapters:
            body["model"] = f"task{adapter}"
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        assert len(r.json()["choices"][0]["token_ids"]) == new_tokens
        return time.perf_counter() - t0

    async def main():
        limits = httpx.Limits(max_connections=len(jobs) + 4)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600, limits=limits) as client:
            await one(client, 0, jobs[0][1][:4], time.perf_counter())  # warm-up
            t0 = time.perf_counter()
            lat = await asyncio.gather(*(one(client, a, ids, t0) for a, ids in jobs))
            return lat, time.perf_counter() - t0

    lat, wall = asyncio.run(main())
    steps, mixed = engine.stats["steps"], engine.stats["max_distinct_slots"]
    server.should_exit = True
    thread.join(120)
    name = "ours" if with_adapters else "ours-base"
    print(f"  {name}: {steps} steps, at most {mixed} adapters in one step", file=sys.stderr)
    return summary(name, lat, wall, len(jobs) * new_tokens)


def run_peft(base, paths, jobs, new_tokens):
    from peft import PeftModel
    from peft_compat import fix_peft_generate

    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name="task0")
    for i, path in enumerate(paths[1:], 1):
        model.load_adapter(path, adapter_name=f"task{i}")
    model.eval()
    fix_peft_generate(model)
    groups = {}
    for a, ids in jobs:
        groups.setdefault(a, []).append(ids)
    lat = []
    with torch.no_grad():
        model.set_adapter("task0")
        model.generate(input_ids=torch.tensor([jobs[0][1][:4]]), max_new_tokens=2, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        for a in sorted(groups):
            model.set_adapter(f"task{a}")
            ids = torch.tensor(groups[a])  # equal lengths: no padding
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False)
            assert out.shape[1] == ids.shape[1] + new_tokens
            lat += [time.perf_counter() - t0] * len(groups[a])
        wall = time.perf_counter() - t0
    return summary("peft-per-adapter", lat, wall, len(jobs) * new_tokens)


def run_base_cb(base, jobs, new_tokens):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model = copy.deepcopy(base).eval()
    model.config._attn_implementation = "sdpa"
    gen = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(allow_block_sharing=False, auto_switch_to_flash=False, use_async_batching=False,
                                  use_cuda_graph=False, **cache_sizes(jobs, new_tokens))
    with torch.no_grad():
        model.generate_batch([jobs[0][1][:4]], generation_config=gen, continuous_batching_config=cb,
                             progress_bar=False)  # warm-up
        t0 = time.perf_counter()
        out = model.generate_batch([ids for _, ids in jobs], generation_config=gen, continuous_batching_config=cb,
                                   progress_bar=False)
        wall = time.perf_counter() - t0
    lat = [o.lifespan[1] - t0 if o.lifespan[1] > 0 else wall for o in out.values()]
    assert all(len(o.generated_tokens) == new_tokens for o in out.values())
    return summary("base-cb", lat, wall, len(jobs) * new_tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--virtual-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from smollm2 import load_smollm2

    base, tokenizer = load_smollm2()
    base.generation_config.eos_token_id = None  # every request generates exactly --new-tokens
    base.config.eos_token_id = None
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    jobs = [(i % args.adapters, torch.randint(10, vocab, (args.prompt_len,), generator=g).tolist())
            for i in range(args.requests)]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as root:
        paths = make_adapters(base, args.adapters, args.virtual_tokens, root)
        rows = []
        for run in ("ours", "peft", "base", "ours-base"):
            print(f"running {run} ...", file=sys.stderr)
            if run == "ours":
                rows.append(run_ours(base, tokenizer, paths, jobs, args.new_tokens, args.virtual_tokens))
            elif run == "peft":
                rows.append(run_peft(base, paths, jobs, args.new_tokens))
            elif run == "base":
                rows.append(run_base_cb(base, jobs, args.new_tokens))
            else:
                rows.append(run_ours(base, tokenizer, paths, jobs, args.new_tokens, args.virtual_tokens,
                                     with_adapters=False))
            print(f"  {rows[-1]}", file=sys.stderr)
    load1 = os.getloadavg()
    by = {r["name"]: r for r in rows}
    lines = [f"SmolLM2-135M, CPU float32, torch threads {torch.get_num_threads()}, {args.requests} requests x "
             f"({args.prompt_len} prompt + {args.new_tokens} new tokens), {args.adapters} adapters, "
             f"P = {args.virtual_tokens}; load average {load0[0]:.1f} before, {load1[0]:.1f} after "
             f"({os.cpu_count()} CPUs)", "",
             "| run | tokens/s | wall s | p50 latency s | p99 latency s | ours / this |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['tok_s']:.1f} | {r['wall']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | "
                     f"{by['ours']['tok_s'] / r['tok_s']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
