"""prefix_attn: attention over [trainable prefix KV ; sequence KV], without the concatenation.

    out = prefix_attn.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True)

See `prefix_attention` for shapes and the mask, and `available_backends` / `select_backend`
for which implementation runs.
"""
from .backends import available_backends, select_backend
from .cascade import merge_attention_states
from .functional import prefix_attention, scaled_dot_product_attention
from .prefix_encoder import PrefixEncoder

from ._version import __version__

__all__ = ["prefix_attention", "scaled_dot_product_attention", "merge_attention_states", "available_backends",
           "select_backend", "PrefixEncoder"]
