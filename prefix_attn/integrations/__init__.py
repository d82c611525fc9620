"""Integrations of prefix_attn with other libraries, one module each, imported on demand.

    from prefix_attn.integrations.transformers import add_prefix_tuning   # needs `transformers`

Importing this package imports nothing beyond it; `import prefix_attn` never needs transformers.
The Hugging Face code lives in the package hf/ (its __init__ maps it); transformers.py and
prompt_tuning.py are its public paths.
"""
