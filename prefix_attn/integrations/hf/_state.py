"""What the modules of the Hugging Face integration share: the names they agree on, the trainable
thing a tuned model carries (PrefixSource), the record of what add_prefix_tuning changed on a
model (PrefixTuning), its geometry, and how to find both from any model a user hands in (a PEFT
wrapper included). Nothing here changes a model.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field, fields
from typing import Dict, Optional, Protocol, Tuple, runtime_checkable

from torch import Tensor, nn

from transformers import PreTrainedModel

from ...prefix_encoder import PrefixEncoder

#: The name registered in transformers' AttentionInterface and AttentionMaskInterface.
ATTN_IMPLEMENTATION = "prefix_attn"
#: The attention kwarg that carries the per-layer prefixes from the decoder's hook to attention.
PREFIX_KWARG = "prefix_attn_kv"
#: An attention kwarg, a list with a slot per layer: attention stores each layer's (key, value)
#: there, as it attends to them (after rotary, with the KV cache). Prompt tuning's batch-1 pass
#: over the soft prompt collects its per-layer prefix this way (prompt.py).
KV_SINK_KWARG = "prefix_attn_kv_sink"
#: The attribute add_prefix_tuning writes on each attention module of an encoder-decoder model:
#: the index of its prefix in the per-layer list (see attention.prefix_slot).
SLOT_ATTR = "_prefix_attn_slot"
#: Where an encoder-decoder model can take a prefix: the encoder's self-attention, the decoder's
#: self-attention (causal) and the decoder's cross-attention. Li & Liang prefix all three.
ENCODER_DECODER_SITES = ("encoder", "decoder", "cross")
#: prefix_slot's answer for an attention module without a prefix.
NO_PREFIX = -1
#: An attention kwarg for T5 and its kin: the number of tokens in the self-attention cache before
#: this call, which places the queries (StaticCache keys span the whole buffer, not that count).
PAST_KWARG = "prefix_attn_past"
#: The attribute add_prefix_tuning writes on each attention module of T5 and its kin: the module
#: whose relative-position embedding gives its prefix keys their bias (None: cross-attention, which
#: has no position bias).
BIAS_ATTR = "_prefix_attn_bias_owner"
#: The attribute of the model that holds its PrefixTuning.
STATE_ATTR = "_prefix_attn_tuning"


@runtime_checkable
class PrefixSource(Protocol):
    """The trainable thing attached to a tuned model as `model.prefix_encoder` (an nn.Module).

    Called with no argument, once per forward call, it returns the prefix: one (prefix_k,
    prefix_v) pair per prefixed attention module, each [Hkv, P, D], or a bank [T, Hkv, P, D]
    when num_tasks = T > 1 (prefix_index then picks each row's entry). PrefixEncoder (prefix
    tuning: a table, or an MLP over one) and prompt.SoftPrompt (prompt tuning: the model's own
    keys and values for the soft prompt) implement it; the per-call machinery (hooks, attention,
    generate) asks for nothing more. What only a PrefixEncoder has (its file formats, its table)
    is reached through require_prefix_tuning."""

    num_virtual_tokens: int  # P
    num_tasks: int  # T

    def __call__(self) -> Tuple[Tuple[Tensor, Tensor], ...]: ...


@dataclass(frozen=True)
class Geometry:
    num_layers: int  # prefixed attention modules: the layers, or for encoder-decoders the slots
    num_kv_heads: int
    head_dim: int
    model_type: str
    sites: Tuple[str, ...] = ()  # encoder-decoder models: the attentions with a prefix; () otherwise


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(hf_model(model).config, "is_encoder_decoder", False))


# The prefix tunings (one per model, copies included) using the registered name; weak, so that a
# model dropped without remove_prefix_tuning does not keep the name registered forever.
users: "weakref.WeakSet" = weakref.WeakSet()


@dataclass(eq=False)  # compared and hashed by identity: users holds it weakly
class PrefixTuning:
    """What add_prefix_tuning changed on a model, so remove_prefix_tuning can undo it."""
    encoder: PrefixSource
    position_offset: bool
    geometry: Geometry
    previous_attn_implementation: Optional[str]
    previous_requires_grad: Dict[str, bool]
    hooks: list = field(default_factory=list)  # forward pre-hooks on the stacks (and position embeddings)
    slotted: list = field(default_factory=list)  # attention modules given a prefix slot (encoder-decoders)
    relative_bias: bool = False  # T5 and its kin: the hooks pass the cache length (PAST_KWARG)
    enabled: bool = True
    generate_index: Optional[Tensor] = None  # prefix_index of the running model.generate
    wrapped_generate: bool = False
    head: Tuple[str, ...] = ()  # the task head's parameters, trained with the prefix (names in the model)
    marked: bool = False  # a quantized base, marked as adapter-trained for the Trainer (quantized.ADAPTER_MARKER)

    def __deepcopy__(self, memo):
        # copy.deepcopy(model) copies this with the model: the copy uses the registered name too,
        # and must keep it registered after the original's remove_prefix_tuning.
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for f in fields(self):
            setattr(copied, f.name, copy.deepcopy(getattr(self, f.name), memo))
        users.add(copied)
        return copied


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (PeftModel -> LoraModel -> model), else model.

    Prefix tuning always lives on the transformers model itself, so that a LoRA model can get a
    prefix, and a prefix-tuned model can get LoRA, in either order."""
    if isinstance(model, PreTrainedModel):
        return model
    get_base_model = getattr(model, "get_base_model", None)  # peft.PeftModel's
    return get_base_model() if callable(get_base_model) else model


def has_peft_adapters(model: nn.Module, inner: nn.Module) -> bool:
    """A PeftModel wrapper, or a transformers model with adapters injected (model.add_adapter);
    inner is hf_model(model)."""
    return inner is not model or bool(getattr(inner, "_hf_peft_config_loaded", False))


def get_tuning(model: nn.Module) -> Optional[PrefixTuning]:
    return hf_model(model).__dict__.get(STATE_ATTR)


def require_tuning(model: nn.Module, what: str) -> PrefixTuning:
    state = get_tuning(model)
    if state is None:
        raise ValueError(f"prefix_attn: {what} needs a model prepared with add_prefix_tuning")
    return state


def require_prefix_tuning(model: nn.Module, what: str) -> PrefixTuning:
    """require_tuning, for what only a PrefixEncoder has (its table, its file formats): a
    TypeError, before anything is read or written, when the model's prefix comes from another
    PrefixSource (a prompt-tuned model's SoftPrompt)."""
    state = require_tuning(model, what)
    if not isinstance(state.encoder, PrefixEncoder):
        raise TypeError(
            f"prefix_attn: {what} is for prefix tuning (a PrefixEncoder, from add_prefix_tuning); this model's prefix "
            f"comes from a {type(state.encoder).__name__}. A prompt-tuned model (add_prompt_tuning): use "
            "save_peft_prompt / load_peft_prompt, or export_prompt_as_prefix(model) first to turn the trained prompt "
            "into a prefix")
    return state
