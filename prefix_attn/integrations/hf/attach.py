"""Attaching prefix tuning to a model and removing it: add_prefix_tuning, remove_prefix_tuning and
what they change (the config copy, the attention implementation, the hooks, the encoder-decoder
slots, requires_grad, generate)."""
from __future__ import annotations

import contextlib
import copy
import functools
import types
from typing import Callable, Optional

import torch
from torch import nn

from transformers import PretrainedConfig

from ...prefix_encoder import PrefixEncoder
from ._state import (ATTN_IMPLEMENTATION, BIAS_ATTR, NO_PREFIX, SLOT_ATTR, STATE_ATTR, Geometry, PrefixSource,
                     PrefixTuning, get_tuning, has_peft_adapters, hf_model, require_tuning, text_config)
from .attention import register, unregister
from .bart import shift_positions
from .geometry import encoder_decoder_attention, model_geometry, stacks
from .head import head_parameters, task_head
from .hooks import generate_with_prefix_index, stack_pre_hook
from .quantized import mark_adapter_trained, unmark_adapter_trained
from .refusals import check_supported
from .t5 import bias_owner


def get_prefix_encoder(model: nn.Module) -> Optional[PrefixSource]:
    """The PrefixEncoder add_prefix_tuning attached to model (the SoftPrompt of add_prompt_tuning),
    or None."""
    state = get_tuning(model)
    return None if state is None else state.encoder


@contextlib.contextmanager
def prefix_disabled(model: nn.Module):
    """Within the block the model runs without its prefix, as the base model (positions from 0),
    still through prefix_attn's kernels. E.g. to compare generations before and after tuning."""
    state = require_tuning(model, "prefix_disabled")
    previous, state.enabled = state.enabled, False
    try:
        yield model
    finally:
        state.enabled = previous


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
        except (ValueError, KeyError, ImportError) as exc:
            raise ValueError(f"prefix_attn: {type(model).__name__} refused attention implementation {name!r}: {exc}")
    if model.config._attn_implementation != name:  # older models, or no setter
        model.config._attn_implementation = name
    text = text_config(model)
    if text is not model.config and text._attn_implementation != name:
        text._attn_implementation = name


def _own_config(model: nn.Module, outer: nn.Module) -> list:
    """Give the model a config object of its own, shared by its submodules (and a PEFT wrapper,
    `outer`) as the old one was; returns what was replaced, [(module, attribute, old config)], to
    undo it.

    transformers reads the attention implementation from the config at every forward, and models
    built from one config object share it: switching it in place would switch every such model to
    "prefix_attn", whose attention fails without the hook. The copy stays with the model after
    remove_prefix_tuning (with the previous implementation), so whatever was set on model.config
    in the meantime is kept. copy.deepcopy(model), FSDP and save_pretrained see an ordinary config."""
    memo: dict = {}
    copy.deepcopy(model.config, memo)  # memo: id of the config and of each sub-config -> its copy
    replaced = []
    for module in {id(m): m for m in (*outer.modules(), *model.modules())}.values():
        for attr, value in list(module.__dict__.items()):
            if isinstance(value, PretrainedConfig) and isinstance(memo.get(id(value)), PretrainedConfig):
                replaced.append((module, attr, value))
                module.__dict__[attr] = memo[id(value)]
    return replaced


def add_prefix_tuning(model: nn.Module, num_virtual_tokens: int, *, prefix_projection: bool = False,
                      encoder_hidden_size: Optional[int] = None, num_tasks: int = 1,
                      position_offset: bool = True, dropout: float = 0.0, sites=None,
                      train_head: bool = True) -> nn.Module:
    """Prefix-tune a transformers model with prefix_attn; returns the same model, modified in place.

    - Every existing parameter is frozen; a trainable `PrefixEncoder` is attached as
      `model.prefix_encoder` (P = num_virtual_tokens prefix keys/values for every layer and KV
      head; see PrefixEncoder for prefix_projection, encoder_hidden_size, num_tasks, dropout).
    - train_head=True (the default): the task head of a `...ForSequenceClassification`,
      `...ForTokenClassification` or `...ForQuestionAnswering` model (whatever sits beside the
      base model: `classifier`, `score`, `qa_outputs`) trains with the prefix, as in P-Tuning v2
      and PEFT's SEQ_CLS / TOKEN_CLS / QUESTION_ANS task types; save_prefix saves it and
      load_prefix loads it. train_head=False freezes it too (the prefix trains alone). Models
      without a task head (language models) are not affected; a task model whose head is not
      recognised is refused unless train_head=False. On a PEFT model the head keeps PEFT's flags
      (its modules_to_save).
    - A quantized base (e.g. `from_pretrained(..., quantization_config=...)`, or a GGUF file)
      is marked as carrying trainable adapters, so the HF Trainer accepts it, as it does PEFT's;
      nothing else sees the mark (save_pretrained saves as before).
    - The model gets its own copy of its config (the attention implementation is switched there),
      so other models built from the same config object are not affected.
    - Refused at the call, with a line that says why: models it cannot run correctly (attention
      soft-capping, attention sinks, state-space or recurrent layers, vision and audio models,
      decoders and encoders that do not support custom attention functions).
    - On a PEFT model (e.g. LoRA: a `peft.PeftModel`, or adapters added with `model.add_adapter`)
      the adapters' trainable parameters stay trainable, so both train; the prefix goes on the
      transformers model inside, and every function here accepts the wrapper. LoRA added after
      (`get_peft_model(model, LoraConfig(...))`) freezes the prefix, as it freezes everything but
      LoRA: `get_prefix_encoder(peft_model).requires_grad_(True)` trains it again.
    - Attention runs through prefix_attn (config._attn_implementation = "prefix_attn").
    - num_tasks > 1: each row picks its prefix: `model(..., prefix_index=task_ids)`,
      `model.generate(..., prefix_index=task_ids)` (an int tensor [B], or one int for all rows).
    - position_offset=True: real tokens take positions P, P+1, ... as with PEFT prefix tuning
      (PEFT adapters loaded with `load_peft_prefix` give PEFT's logits); False: 0, 1, ...
    - Encoder-decoder models (BART and its kin): `sites` says which attention gets a prefix, any of
      "encoder" (the encoder's self-attention), "decoder" (the decoder's causal self-attention)
      and "cross" (the decoder's attention to the encoder); all three by default, as Li & Liang.
      Each prefixed attention module has its own prefix: the table holds L_enc + 2 L_dec layers
      with all three, in that order. `sites=("decoder",)` is what PEFT's SEQ_2_SEQ_LM prefix
      tuning computes (under transformers 5 it prefixes only the decoder's self-attention):
      load_peft_prefix and save_peft_prefix use it. position_offset shifts the positions of each
      stack whose self-attention has a prefix.

    Works with model.generate (the prefix stays out of the KV cache), gradient checkpointing
    (non-reentrant, transformers' default), torch.compile, the HF Trainer and DDP. Multi-task
    training with the Trainer needs remove_unused_columns=False so prefix_index reaches the
    model. Under FSDP2 (`fully_shard`), call it before sharding: the prefix then shards with the
    unit that holds it (the root, unless the encoder gets a unit of its own). Undo with
    `remove_prefix_tuning(model)`.
    """
    def make_encoder(model: nn.Module, geometry: Geometry) -> PrefixEncoder:
        reference = next(model.parameters(), None)
        device = reference.device if reference is not None else None
        dtype = reference.dtype if reference is not None and reference.dtype.is_floating_point else torch.float32
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # train the prefix in float32; attention casts it to the model's dtype
        return PrefixEncoder(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, num_virtual_tokens,
                             prefix_projection=prefix_projection, encoder_hidden_size=encoder_hidden_size,
                             num_tasks=num_tasks, dropout=dropout, device=device, dtype=dtype)

    return attach(model, make_encoder, position_offset=position_offset, sites=sites, train_head=train_head)


def attach(model: nn.Module, make_source: Callable[[nn.Module, Geometry], PrefixSource], *,
           position_offset: bool = True, sites=None, train_head: bool = True) -> nn.Module:
    """add_prefix_tuning with the prefix from any PrefixSource: make_source(model, geometry) builds
    it once the model has passed every check (the transformers model, a PEFT wrapper's included).
    The rest is add_prefix_tuning's: frozen parameters, the task head, the config copy, the
    attention implementation, the hooks, generate; remove_prefix_tuning undoes it and returns the
    source. prompt.add_prompt_tuning attaches its SoftPrompt this way."""
    outer, model = model, hf_model(model)
    if get_tuning(model) is not None:
        raise ValueError("prefix_attn: this model already has prefix tuning; call remove_prefix_tuning(model) first")
    if not hasattr(model, "config") or not hasattr(model.config, "_attn_implementation"):
        raise TypeError(f"prefix_attn: add_prefix_tuning needs a transformers PreTrainedModel, got {type(model).__name__}")
    if hasattr(model, "prefix_encoder"):
        raise ValueError(f"prefix_attn: {type(model).__name__} already has an attribute 'prefix_encoder'")
    check_supported(model)
    geometry = model_geometry(model, sites)
    keep_adapters = has_peft_adapters(outer, model)  # PEFT froze the base already; its adapters train on
    head = task_head(model) if train_head and not keep_adapters else ()
    encoder = make_source(model, geometry)

    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    state = PrefixTuning(encoder, bool(position_offset), geometry, model.config._attn_implementation, previous)
    register(state)
    replaced = _own_config(model, outer)
    try:
        _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    except Exception:
        for module, attr, config in replaced:
            module.__dict__[attr] = config
        unregister(state)
        raise
    for p in model.parameters():
        p.requires_grad_(keep_adapters and p.requires_grad)
    trained_head = head_parameters(model, head)
    for p in trained_head.values():
        p.requires_grad_(True)
    state.head = tuple(trained_head)
    model.prefix_encoder = encoder  # a submodule: .to(), state_dict, DDP and optimizers see it
    model.__dict__[STATE_ATTR] = state
    try:
        if geometry.sites:
            _attach_encoder_decoder(model, state)
        else:
            decoder = getattr(model, "base_model", model)
            state.hooks.append(decoder.register_forward_pre_hook(functools.partial(stack_pre_hook, state, True),
                                                                 with_kwargs=True))
    except Exception:
        remove_prefix_tuning(model)  # leaves the model as it found it
        raise

    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        # A bound method (not a closure), so that copy.deepcopy(model) rebinds it to the copy.
        model.generate = types.MethodType(generate_with_prefix_index, model)
        state.wrapped_generate = True
    mark_adapter_trained(model, state)
    return outer


def _attach_encoder_decoder(model: nn.Module, state: PrefixTuning) -> None:
    """Slots on every attention module (encoder self, decoder self, decoder cross, in layer order;
    NO_PREFIX where the site has none), a pre-hook on each stack (the encoder also runs alone, in
    generate), and the position shift on the stacks whose self-attention has a prefix."""
    sites = state.geometry.sites
    slot = 0
    for site, modules in encoder_decoder_attention(model).items():
        for _, module in modules:
            module.__dict__[SLOT_ATTR] = slot if site in sites else NO_PREFIX
            slot += site in sites
            state.slotted.append(module)
            if hasattr(module, "relative_attention_num_buckets"):  # T5 and its kin: relative position bias
                module.__dict__[BIAS_ATTR] = None if site == "cross" else bias_owner(module, modules[0][1])
                state.relative_bias = True
    for stack_name, stack in stacks(model).items():
        state.hooks.append(stack.register_forward_pre_hook(functools.partial(stack_pre_hook, state, False),
                                                           with_kwargs=True))
        embed = getattr(stack, "embed_positions", None)
        if not state.position_offset or stack_name not in sites or embed is None:
            continue  # T5 and its kin have no absolute positions: relative ones need no shift
        state.hooks.append(shift_positions(model, stack_name, embed, state))  # BART and its kin


def _detach(model: nn.Module, state: PrefixTuning) -> None:
    """Remove the hooks and the slots add_prefix_tuning put on the model's modules."""
    for hook in state.hooks:
        hook.remove()
    for module in state.slotted:
        module.__dict__.pop(SLOT_ATTR, None)
        module.__dict__.pop(BIAS_ATTR, None)
    state.hooks.clear()
    state.slotted.clear()


def remove_prefix_tuning(model: nn.Module) -> PrefixSource:
    """Undo add_prefix_tuning: the previous attention implementation, requires_grad flags and
    generate; the hook and `model.prefix_encoder` go. Returns the detached PrefixEncoder (the
    PrefixSource that was attached)."""
    model = hf_model(model)
    state = get_tuning(model)
    if state is None:
        raise ValueError("prefix_attn: this model has no prefix tuning to remove")
    _detach(model, state)
    unmark_adapter_trained(model, state)
    if state.wrapped_generate:
        model.__dict__.pop("generate", None)
    del model.prefix_encoder
    previous = state.previous_attn_implementation
    if previous is not None:
        _set_attn_implementation(model, previous)
    for name, p in model.named_parameters():
        p.requires_grad_(state.previous_requires_grad.get(name, p.requires_grad))
    del model.__dict__[STATE_ATTR]
    unregister(state)
    return state.encoder
