"""An OpenAI-compatible server for many prefix-tuned adapters on one base model:
`python -m prefix_attn.serve BASE --adapters [NAME=]DIR ...` (see __main__.py).

engine.py: transformers' continuous batching with a bank of prefixes (needs transformers);
app.py: the HTTP layer (needs starlette and uvicorn: the `serve` extra). Nothing is imported
here, so the package imports without them."""
