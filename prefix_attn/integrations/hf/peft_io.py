"""PEFT I/O: PEFT prefix-tuning adapters (adapter_config.json and adapter_model.safetensors) loaded
into and saved from a prefix-tuned model, in PEFT's layout and (for encoder-decoders) its layer
order."""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from ._state import get_tuning, hf_model, is_encoder_decoder, require_prefix_tuning, text_config
from .attach import add_prefix_tuning
from .geometry import model_geometry
from .io import check_geometry, mismatch_error

#: The sites of PEFT's encoder-decoder prefix tuning (SEQ_2_SEQ_LM), as PEFT 0.21 runs under
#: transformers 5: it builds the cross-attention prefix too, then discards it (it resets the
#: cross-attention cache), and the encoder never had one.
_PEFT_SITES = ("decoder",)


def _peft_seq2seq_layers(num_layers: int) -> list:
    """For each decoder layer l, the layer of a PEFT SEQ_2_SEQ_LM adapter's table its self-attention
    reads: 2 l mod L, not l. PEFT 0.21 views the table [P, L * 2, H, D], concatenates it with itself
    along the layer axis (meant for the cross-attention copy) and hands decoder layer l the
    (key, value) pair at rows 4 l, 4 l + 1 of that; rows 4 l + 2, 4 l + 3 go to the cross-attention
    cache, which it then resets. So with an even L, decoder layers l and l + L / 2 share a prefix
    and half the table is never read (measured against PEFT: tests/integrations/test_hf_encdec.py)."""
    return [(2 * layer) % num_layers for layer in range(num_layers)]


def read_peft_adapter(path: str) -> Tuple[Dict[str, Any], str, str]:
    """(adapter_config.json's contents, its path, the path of adapter_model.safetensors) of the PEFT
    adapter directory `path`. A pickled adapter_model.bin is refused, never loaded."""
    config_file = os.path.join(path, "adapter_config.json")
    weights_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_file):
        if os.path.isfile(os.path.join(path, "adapter_model.bin")):
            raise ValueError(f"prefix_attn: {path} holds adapter_model.bin, a pickle, which prefix_attn does not "
                             "load; re-save the adapter with safe_serialization=True")
        raise FileNotFoundError(f"prefix_attn: no adapter_model.safetensors in {path}")
    with open(config_file) as f:
        return json.load(f), config_file, weights_file


def load_peft_prefix(model: nn.Module, path: str, *, task: Optional[int] = None) -> nn.Module:
    """Load a PEFT prefix-tuning adapter (a directory with adapter_config.json and
    adapter_model.safetensors) into model; returns the model.

    PEFT stores `prompt_embeddings` [P, L * 2 * Hkv * D], each virtual token's vector laid out
    [L, 2 (key, value), Hkv, D], already projected when PEFT trained with prefix_projection.
    An encoder-decoder adapter (SEQ_2_SEQ_LM) prefixes the decoder's self-attention only (what
    PEFT computes under transformers 5), so the model gets sites=("decoder",).
    A model without prefix tuning gets add_prefix_tuning(model, P) (position_offset=True, as
    PEFT); one with a plain-table prefix of length P gets it loaded; with num_tasks > 1, `task`
    says which bank entry receives it (so several PEFT adapters can serve one batch).
    """
    from safetensors.torch import load_file

    config, config_file, weights_file = read_peft_adapter(path)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"prefix_attn: {config_file} is a {config.get('peft_type')!r} adapter, not PREFIX_TUNING")
    encoder_decoder = is_encoder_decoder(model)
    submodules = config.get("num_transformer_submodules", 1)
    if submodules != (2 if encoder_decoder else 1):
        kind = "an encoder-decoder" if encoder_decoder else "a decoder-only or encoder-only"
        raise ValueError(f"prefix_attn: {config_file} has num_transformer_submodules={submodules} (PEFT writes 2 for "
                         f"encoder-decoder models, 1 otherwise), but {type(hf_model(model)).__name__} is {kind} model")
    sites = _PEFT_SITES if encoder_decoder else None
    geometry = model_geometry(model, sites)
    kv_heads = config.get("num_attention_heads")
    head_dim = config["token_dim"] // kv_heads if kv_heads else None
    check_geometry(geometry, config.get("num_layers"), kv_heads, head_dim, "the PEFT adapter", path)

    tensors = load_file(weights_file)
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"prefix_attn: {weights_file} has no 'prompt_embeddings' tensor (found {sorted(tensors)})")
    embeddings = tensors["prompt_embeddings"]
    P = config["num_virtual_tokens"]
    L, H, D = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
    if tuple(embeddings.shape) != (P, L * 2 * H * D):
        raise mismatch_error("the PEFT adapter", path,
                              [("prompt_embeddings", list(embeddings.shape), [P, L * 2 * H * D])])

    state = get_tuning(model)
    if state is None:
        add_prefix_tuning(model, P, sites=sites)
        state = get_tuning(model)
    else:
        encoder = require_prefix_tuning(model, "load_peft_prefix").encoder
        if state.geometry.sites != geometry.sites:
            raise mismatch_error("the PEFT adapter", path, [("sites", geometry.sites, state.geometry.sites)])
        if encoder.prefix_projection:
            raise ValueError("prefix_attn: the model's prefix uses prefix_projection; a PEFT adapter is a plain "
                             "table (merge the encoder with model.prefix_encoder.merge() first)")
        if encoder.num_virtual_tokens != P:
            raise mismatch_error("the PEFT adapter", path, [("num_virtual_tokens", P, encoder.num_virtual_tokens)])
        if encoder.num_tasks > 1 and task is None:
            raise ValueError(f"prefix_attn: the model's prefix is a bank of {encoder.num_tasks} tasks; pass task= to "
                             "say which entry the adapter goes into")
        if not state.position_offset:
            warnings.warn("prefix_attn: the model uses position_offset=False, while PEFT's prefix shifts positions by "
                          "P; its outputs will differ from PEFT's", stacklevel=2)
    table = embeddings.view(P, L, 2, H, D).permute(1, 2, 3, 0, 4)  # [L, 2, Hkv, P, D]
    if encoder_decoder:  # the decoder layers read PEFT's table in its own order (see _peft_seq2seq_layers)
        table = table[_peft_seq2seq_layers(L)]
    weight = state.encoder.weight
    state.encoder.load_table(table.to(device=weight.device, dtype=weight.dtype), task=task)
    return model


def save_peft_prefix(model: nn.Module, path: str, *, task: Optional[int] = None) -> None:
    """Save the prefix as a PEFT prefix-tuning adapter (adapter_config.json and
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads: PEFT's layout, a
    plain table (prefix_projection is folded), one task (`task` picks it from a bank).
    Its outputs equal this model's when position_offset=True (PEFT's positions)."""
    from safetensors.torch import save_file

    state = require_prefix_tuning(model, "save_peft_prefix")
    if state.head:
        warnings.warn(f"prefix_attn: save_peft_prefix writes the prefix alone; the trained task head "
                      f"({', '.join(state.head)}) is not in it (save_prefix keeps both)", stacklevel=2)
    encoder = state.encoder
    encoder_decoder = bool(state.geometry.sites)
    if encoder_decoder and state.geometry.sites != _PEFT_SITES:
        raise ValueError(f"prefix_attn: this model's prefix covers sites {state.geometry.sites}; a PEFT prefix-tuning "
                         "adapter of an encoder-decoder model prefixes only the decoder's self-attention (under "
                         "transformers 5), so it can hold only a prefix trained with sites=('decoder',)")
    if encoder.num_tasks > 1 and task is None:
        raise ValueError(f"prefix_attn: the prefix is a bank of {encoder.num_tasks} tasks; pass task= to choose one "
                         "(a PEFT prefix-tuning adapter holds one prefix)")
    task = 0 if task is None else task
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < encoder.num_tasks:
        raise ValueError(f"prefix_attn: task must be an int in [0, {encoder.num_tasks}), got {task!r}")
    with torch.no_grad():
        table = encoder.table()[:, :, task]  # [L, 2, Hkv, P, D]
    L, _, H, P, D = table.shape
    if encoder_decoder:  # PEFT's decoder layer l reads its table's layer 2 l mod L (see _peft_seq2seq_layers)
        peft_table = torch.zeros_like(table)  # layers PEFT never reads stay zero
        written = {}
        for layer, row in enumerate(_peft_seq2seq_layers(L)):
            if row in written and not torch.equal(table[layer], table[written[row]]):
                raise ValueError(
                    f"prefix_attn: a PEFT SEQ_2_SEQ_LM adapter cannot hold this prefix: PEFT 0.21 gives decoder layers "
                    f"{written[row]} and {layer} the same entry of its table (layer 2 l mod {L}), but their prefixes "
                    "differ. Save it with save_prefix instead")
            written[row] = layer
            peft_table[row] = table[layer]
        table = peft_table
    embeddings = table.permute(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D)  # PEFT: token-major [P, L, 2, Hkv, D]
    config = {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM",
              "num_virtual_tokens": P, "token_dim": H * D, "num_attention_heads": H, "num_layers": L,
              "num_transformer_submodules": 2 if encoder_decoder else 1,
              "encoder_hidden_size": H * D, "prefix_projection": False, "inference_mode": True,
              "base_model_name_or_path": getattr(text_config(hf_model(model)), "_name_or_path", None) or None,
              "revision": None, "modules_to_save": None, "auto_mapping": None}
    os.makedirs(path, exist_ok=True)
    save_file({"prompt_embeddings": embeddings.detach().contiguous().cpu()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
