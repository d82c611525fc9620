"""Model geometry: how many prefixed attention modules a model has, their KV heads and head dim,
read from its config and checked against its modules; for encoder-decoder models, which attention
modules sit where (sites)."""
from __future__ import annotations

from typing import Dict, Tuple

from torch import nn

from ._state import ENCODER_DECODER_SITES, Geometry, hf_model, is_encoder_decoder, text_config


def model_geometry(model: nn.Module, sites=None) -> Geometry:
    """Layers, KV heads and head dim of the model's attention, from its config, checked against
    its attention modules (GQA and head_dim != hidden / heads are the usual traps). For an
    encoder-decoder model, of the attention at `sites` (see ENCODER_DECODER_SITES)."""
    model = hf_model(model)
    config = text_config(model)
    if is_encoder_decoder(model):
        return _encoder_decoder_geometry(model, sites)
    if sites is not None:
        raise ValueError(f"prefix_attn: sites={sites!r} is for encoder-decoder models (it picks among "
                         f"{ENCODER_DECODER_SITES}); {type(model).__name__} has one attention per layer")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    geometry = Geometry(config.num_hidden_layers, kv_heads, head_dim, getattr(config, "model_type", ""))
    seen = set()
    for name, module in model.named_modules():
        k_proj = getattr(module, "k_proj", None)
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(k_proj, nn.Linear) or layer_idx is None:
            continue
        seen.add(layer_idx)
        module_dim = getattr(module, "head_dim", head_dim)
        if module_dim != head_dim or k_proj.out_features != kv_heads * head_dim:
            raise ValueError(
                f"prefix_attn: {name} has head_dim {module_dim} and k_proj out_features {k_proj.out_features}, but "
                f"the config says {kv_heads} KV heads of dim {head_dim}; layers of different shapes are not supported")
    if seen and seen != set(range(geometry.num_layers)):
        raise ValueError(f"prefix_attn: the model's attention layers have layer_idx {sorted(seen)}, expected "
                         f"0 .. {geometry.num_layers - 1}")
    return geometry


# Encoder-decoder models: where each kind of attention module sits in its layer (BART and its kin;
# T5 and its kin).
_SELF_ATTENTION_NAMES = ("self_attn", "SelfAttention")
_CROSS_ATTENTION_NAMES = ("encoder_attn", "EncDecAttention")


def _check_sites(sites) -> Tuple[str, ...]:
    """sites as a tuple in ENCODER_DECODER_SITES' order; None means all three."""
    if sites is None:
        return ENCODER_DECODER_SITES
    given = (sites,) if isinstance(sites, str) else tuple(sites)
    unknown = [site for site in given if site not in ENCODER_DECODER_SITES]
    if unknown or not given or len(set(given)) != len(given):
        raise ValueError(f"prefix_attn: sites must name one or more of {ENCODER_DECODER_SITES} (encoder "
                         f"self-attention, decoder self-attention, decoder cross-attention), each once; got {sites!r}")
    return tuple(site for site in ENCODER_DECODER_SITES if site in given)


#: Encoder-decoder model types whose attention this integration has been checked on: BART and T5 by
#: tests/integrations/test_hf_encdec.py; the others, which share BART's or T5's attention code, once
#: against the plain model with the prefix as P past tokens of the decoder's cache. Others are
#: refused by name: some build their attention outside transformers' AttentionInterface (LED,
#: PegasusX's encoder, FSMT), make their causal decoder's causality a mask of their own
#: (BigBirdPegasus, PegasusX), or number relative positions differently (UMT5).
ENCODER_DECODER_MODEL_TYPES = ("bart", "mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "plbart",
                               "m2m_100", "t5", "mt5", "switch_transformers")


def stacks(model: nn.Module) -> Dict[str, nn.Module]:
    """{"encoder": the encoder stack, "decoder": the decoder stack} of an encoder-decoder model."""
    model = hf_model(model)
    return {"encoder": model.get_encoder(), "decoder": model.get_decoder()}


def encoder_decoder_attention(model: nn.Module) -> Dict[str, list]:
    """The attention modules of an encoder-decoder model, by site, in layer order: one per layer
    of its stack, or NotImplementedError naming what was not found."""
    found = {site: [] for site in ENCODER_DECODER_SITES}
    expected = {}
    for stack_name, stack in stacks(model).items():
        layers = getattr(stack, "layers", None) or getattr(stack, "block", None)
        expected[stack_name] = len(layers) if layers is not None else None
        for name, module in stack.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in _SELF_ATTENTION_NAMES:
                found[stack_name].append((f"{stack_name}.{name}", module))
            elif leaf in _CROSS_ATTENTION_NAMES and stack_name == "decoder":
                found["cross"].append((f"{stack_name}.{name}", module))
    expected["cross"] = expected["decoder"]
    wrong = {site: len(found[site]) for site in ENCODER_DECODER_SITES
             if expected[site] is None or len(found[site]) != expected[site]}
    if wrong:
        raise NotImplementedError(
            f"prefix_attn: {type(hf_model(model)).__name__} is an encoder-decoder model whose attention modules were "
            f"not found, one per layer, as {_SELF_ATTENTION_NAMES} (self) and {_CROSS_ATTENTION_NAMES} (cross): "
            f"found {wrong} where its stacks have {expected} layers")
    return found


def _attention_shape(name: str, module: nn.Module) -> Tuple[int, int]:
    """(heads, head dim) of an attention module with a k_proj (BART) or k (T5) projection."""
    head_dim = getattr(module, "head_dim", None) or getattr(module, "key_value_proj_dim", None)
    k_proj = getattr(module, "k_proj", None) or getattr(module, "k", None)
    if not isinstance(k_proj, nn.Linear) or not head_dim:
        raise NotImplementedError(f"prefix_attn: cannot read the heads and head dim of {name} "
                                  f"({type(module).__name__}): no k_proj / k linear layer and head_dim")
    return k_proj.out_features // head_dim, head_dim


def _encoder_decoder_geometry(model: nn.Module, sites) -> Geometry:
    sites = _check_sites(sites)
    model_type = getattr(text_config(model), "model_type", "")
    if model_type not in ENCODER_DECODER_MODEL_TYPES:
        raise NotImplementedError(
            f"prefix_attn: {type(model).__name__} (model_type {model_type!r}) is an encoder-decoder model this "
            f"integration has not been checked on; supported: {', '.join(ENCODER_DECODER_MODEL_TYPES)}")
    attention = encoder_decoder_attention(model)
    for site, modules in attention.items():  # the kernels' causal flag comes from is_causal
        for name, module in modules:
            if bool(getattr(module, "is_causal", None)) != (site == "decoder"):
                raise NotImplementedError(
                    f"prefix_attn: {name} ({type(module).__name__}) has is_causal="
                    f"{getattr(module, 'is_causal', None)!r}, but as the {site} attention it should be "
                    f"{site == 'decoder'}: its causality would be lost or invented")
    shapes = {}
    for site in sites:
        for name, module in attention[site]:
            shapes.setdefault(_attention_shape(name, module), []).append(name)
    if len(shapes) != 1:
        described = "; ".join(f"{heads} heads of dim {dim}: {names[0]} and {len(names) - 1} more"
                              for (heads, dim), names in shapes.items())
        raise ValueError(f"prefix_attn: one prefix table needs the same heads and head dim in every prefixed "
                         f"attention, but the attention at sites {sites} has {described}; choose sites that agree")
    (heads, head_dim), = shapes
    return Geometry(sum(len(attention[site]) for site in sites), heads, head_dim,
                     getattr(text_config(model), "model_type", ""), sites)
