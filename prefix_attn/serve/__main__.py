"""python -m prefix_attn.serve BASE --adapters [NAME=]DIR ... : the OpenAI-compatible server.

BASE is a transformers checkpoint (a local directory, or a hub id when online; --gguf-file FILE
for a GGUF inside it). Each adapter is a prefix saved by save_prefix, a PEFT prefix-tuning adapter
or a PEFT prompt-tuning adapter; its name (the request's "model") is NAME, else the directory's
name. Every adapter of one server has the same number of virtual tokens P (one bank); P is read
from the first adapter unless --num-virtual-tokens says it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _virtual_tokens(path: str) -> int:
    from ..integrations.transformers import CONFIG_NAME
    for name, read in ((CONFIG_NAME, lambda c: c["encoder"]["num_virtual_tokens"]),
                       ("adapter_config.json", lambda c: c["num_virtual_tokens"])):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                return int(read(json.load(f)))
    raise SystemExit(f"prefix_attn.serve: {path} is not an adapter directory (no {CONFIG_NAME} or "
                     "adapter_config.json)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m prefix_attn.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the base model: a transformers checkpoint directory or hub id")
    p.add_argument("--adapters", nargs="*", default=[], metavar="[NAME=]DIR")
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside BASE to load the weights from")
    p.add_argument("--served-model-name", default=None, help="the base model's name in requests (default: BASE)")
    p.add_argument("--num-virtual-tokens", type=int, default=None, help="P, the prefix length of every adapter")
    p.add_argument("--max-adapters", type=int, default=16, help="bank slots (adapters loaded at once)")
    p.add_argument("--max-queue", type=int, default=256, help="requests admitted at once; more get 429")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the largest max_tokens a request may ask")
    p.add_argument("--max-context", type=int, default=None, help="prompt + max_tokens (default: the model's)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds; a slower request gets 504")
    p.add_argument("--num-blocks", type=int, default=None, help="paged KV cache blocks (default: transformers')")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per step (default: transformers')")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running requests get to finish on shutdown; then they are answered 503")
    return p.parse_args(argv)


def build(args):
    """(app, engine) from parsed arguments."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .app import Limits, build_app
    from .engine import Engine

    adapters = []
    for spec in args.adapters:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        adapters.append((name or os.path.basename(os.path.normpath(path)), path))
    P = args.num_virtual_tokens or (_virtual_tokens(adapters[0][1]) if adapters else None)
    if P is None:
        raise SystemExit("prefix_attn.serve: give --num-virtual-tokens (the prefix length) or at least one adapter")
    extra = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=getattr(torch, args.dtype), **extra)
    model = model.to(args.device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.base, **extra)
    except Exception as exc:  # a model without a tokenizer still serves token-id prompts
        print(f"prefix_attn.serve: no tokenizer ({exc}); prompts must be token ids", file=sys.stderr)
        tokenizer = None
    engine = Engine(model, num_virtual_tokens=P, max_adapters=args.max_adapters, max_queue=args.max_queue,
                    num_blocks=args.num_blocks, max_batch_tokens=args.max_batch_tokens)
    for name, path in adapters:
        try:
            engine.load_adapter(name, path)
            print(f"prefix_attn.serve: adapter {name!r} loaded from {path}", file=sys.stderr)
        except ValueError as exc:  # refused: the server starts with the others
            print(f"prefix_attn.serve: adapter {name!r} refused: {exc}", file=sys.stderr)
    max_context = args.max_context or getattr(model.config.get_text_config(), "max_position_embeddings", 2048)
    limits = Limits(max_new_tokens=args.max_new_tokens, max_context=max_context,
                    request_timeout=args.request_timeout)
    app = build_app(engine, tokenizer, base_name=args.served_model_name or args.base, limits=limits,
                    shutdown_grace=args.shutdown_grace)
    return app, engine


def main(argv=None):
    import uvicorn

    args = parse_args(argv)
    app, _ = build(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=args.shutdown_grace)


if __name__ == "__main__":
    main()
