"""The models add_prefix_tuning and add_prompt_tuning refuse at the call, before changing
anything, with one line that says why."""
from __future__ import annotations

from torch import Tensor, nn

from ._state import is_encoder_decoder, text_config


#: Layer kinds (config.layer_types and its kin) of softmax attention, which a prefix extends.
_ATTENTION_LAYER_KINDS = ("attention", "full_attention", "sliding_attention", "chunked_attention")
#: Config fields that name each layer's kind, in the model families that mix kinds.
_LAYER_KIND_FIELDS = ("layer_types", "layers_block_type", "block_types")
#: What a model's main input must be: the stack's hook reads the batch and length from it.
_TOKEN_INPUTS = ("input_ids", "inputs_embeds")


def _state_space_fields(config) -> list:
    """The config fields that describe state-space (Mamba-style) layers, if any."""
    return sorted(key for key in config.to_dict()
                  if key.startswith(("mamba_", "ssm_", "n_mamba")) or key in ("state_size", "time_step_rank"))


def check_supported(model: nn.Module) -> None:
    """Refuse, by name and with one line that says why, the models whose attention this integration
    would get wrong or could not reach. Runs before anything is changed."""
    config = text_config(model)
    name = f"{type(model).__name__} (model_type {getattr(config, 'model_type', '?')!r})"
    encoder_decoder = is_encoder_decoder(model)
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input not in _TOKEN_INPUTS:
        raise NotImplementedError(
            f"prefix_attn: {name} takes {main_input} (a vision or audio model); prefix and prompt tuning here "
            f"are for token models, whose stack takes {' or '.join(_TOKEN_INPUTS)}")
    if getattr(config, "num_attention_heads", None) is None:
        raise NotImplementedError(
            f"prefix_attn: {name} has no attention layers (its config has no num_attention_heads: a state-space or "
            "recurrent model), so there are no attention keys and values for a prefix to extend")
    kinds = set()
    for field_name in _LAYER_KIND_FIELDS:
        value = getattr(config, field_name, None)
        if isinstance(value, (list, tuple)):
            kinds.update(str(kind) for kind in value)
    other = sorted(kinds.difference(_ATTENTION_LAYER_KINDS))
    state_space = _state_space_fields(config)
    if other or state_space:
        what = f"layers of kind {other}" if other else f"state-space layers ({', '.join(state_space[:3])}, ...)"
        raise NotImplementedError(
            f"prefix_attn: {name} mixes attention with {what}, which carry what they read from token to token "
            "in a state that a prefix of attention keys and values does not reach; only all-attention models "
            "are supported")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        raise NotImplementedError(
            f"prefix_attn: {name} soft-caps its attention scores (attn_logit_softcapping={softcap}), which "
            "prefix_attn's kernels do not implement")
    sinks = next((module_name for module_name, module in model.named_modules()
                  if isinstance(getattr(module, "sinks", None), Tensor)), None)
    if sinks is not None:
        raise NotImplementedError(
            f"prefix_attn: {name} gives its attention learned sinks ({sinks}.sinks), extra softmax terms that "
            "prefix_attn's kernels do not implement")
    if hasattr(config, "relative_attention_num_buckets") and not encoder_decoder:
        raise NotImplementedError(
            f"prefix_attn: {name} adds a relative position bias (T5's position_bias) to its attention scores, and "
            "its prefix keys need a bias of their own: add_prefix_tuning sets that up for encoder-decoder models "
            "(T5ForConditionalGeneration and its kin) only")
    if not encoder_decoder and not getattr(type(model), "_supports_attention_backend", False):
        # The class's own word that its layers hand attention kwargs (our prefix) through to a
        # registered attention function. Some models that dispatch there do not (StableLM: its
        # attention would run without the prefix). Encoder-decoders are checked by model type.
        raise NotImplementedError(
            f"prefix_attn: {name} does not support custom attention functions (_supports_attention_backend is "
            "False: its attention is its own, or its layers do not pass attention kwargs through), so its "
            "attention would never see the prefix")
