"""BART and its kin: positions computed inside the stack, by its position embedding, from the
cache length. With position_offset they are shifted by P there, as if the prefix were P past
tokens of the cache."""
from __future__ import annotations

import functools
import inspect

from torch import nn

from ._state import PrefixTuning

#: What position embeddings of encoder-decoder models call the number of tokens before the first.
CACHE_LENGTH_NAMES = ("cache_length", "past_key_values_length", "past_length")


def shift_positions(model: nn.Module, stack_name: str, embed: nn.Module, state: PrefixTuning):
    """A forward pre-hook on a stack's position embedding that shifts its positions by P; returns
    its handle. NotImplementedError if the embedding takes neither position ids nor a cache length."""
    names = inspect.signature(embed.forward).parameters
    if "position_ids" not in names and not any(name in names for name in CACHE_LENGTH_NAMES):
        raise NotImplementedError(
            f"prefix_attn: cannot shift the positions of {type(model).__name__}'s {stack_name} by the prefix "
            f"length: its {type(embed).__name__} takes neither position_ids nor a cache length; use "
            "position_offset=False")
    return embed.register_forward_pre_hook(functools.partial(_position_shift_hook, state), with_kwargs=True)


def _position_shift_hook(state: PrefixTuning, module: nn.Module, args, kwargs):
    """Before an encoder-decoder stack's position embedding (BART and its kin, which compute positions
    inside the stack, from the cache length): positions shifted by P, as if the prefix were P past
    tokens. Binds (input_ids, cache length, position_ids) by name; the cache length's name varies."""
    if not state.enabled:
        return args, kwargs
    names = list(inspect.signature(module.forward).parameters)
    kwargs = {**dict(zip(names, args)), **kwargs}
    P = state.encoder.num_virtual_tokens
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + P
    else:
        length = next(name for name in CACHE_LENGTH_NAMES if name in names)
        kwargs[length] = kwargs.get(length, 0) + P
    return (), kwargs
