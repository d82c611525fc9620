"""Native I/O: the prefix (and the trained task head) saved to and loaded from prefix_attn's own
files, shape-checked against the model first; and init_prefix_from_text, which fills the table
with the model's own keys and values for a text."""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ... import __version__
from ...prefix_encoder import PrefixEncoder
from ._state import Geometry, get_tuning, hf_model, is_encoder_decoder, require_prefix_tuning
from .attach import add_prefix_tuning, prefix_disabled
from .geometry import model_geometry
from .head import head_parameters, task_head

CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix_model.safetensors"
FORMAT_NAME = "prefix_attn.prefix_tuning"
#: 1: the prefix encoder's tensors; 2: also the trained task head's, named HEAD_PREFIX + the name in
#: the model (written only when there is one, so files without a head stay readable by version 1).
FORMAT_VERSION = 2
HEAD_PREFIX = "task_head."


def mismatch_error(what: str, path: str, mismatches) -> ValueError:
    lines = "\n".join(f"  {name}: file has {got}, model has {want}" for name, got, want in mismatches)
    return ValueError(f"prefix_attn: {what} at {path} does not fit this model:\n{lines}")


def check_geometry(geometry: Geometry, num_layers, num_kv_heads, head_dim, what: str, path: str) -> None:
    mismatches = [(name, got, want) for name, got, want in (
        ("num_layers", num_layers, geometry.num_layers),
        ("num_kv_heads", num_kv_heads, geometry.num_kv_heads),
        ("head_dim", head_dim, geometry.head_dim)) if got != want]
    if mismatches:
        raise mismatch_error(what, path, mismatches)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _full_state_dict(tensors: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], bool]:
    """The tensors (the encoder's state dict, the head's parameters), whole and on the CPU, and
    whether any was sharded (a DTensor, as FSDP2 makes them); gathering a sharded one is a
    collective every rank must join."""
    whole, sharded = {}, False
    for name, t in tensors.items():
        if _is_dtensor(t):
            t, sharded = t.full_tensor(), True
        whole[name] = t.detach().contiguous().cpu()
    return whole, sharded


def _like(t: Tensor, target: Tensor) -> Tensor:
    """t, read from a file, on target's device and dtype, and sharded as target is (FSDP2: every
    rank read the whole file and keeps its own shard, no communication)."""
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                 target.placements, src_data_rank=None)
    return t.to(device=target.device, dtype=target.dtype)


def save_prefix(model: nn.Module, path: str) -> None:
    """Save the prefix of a prefix-tuned model to the directory `path`: prefix_model.safetensors
    (the PrefixEncoder's tensors, MLP included, so training can resume, and the task head's when
    it was trained with the prefix: add_prefix_tuning's train_head) and prefix_config.json.

    From a model sharded by FSDP2, call it on every rank: the prefix is gathered whole (a
    collective) and global rank 0 writes the files."""
    from safetensors.torch import save_file

    state = require_prefix_tuning(model, "save_prefix")
    tensors, sharded = _full_state_dict(state.encoder.state_dict())
    parameters = dict(hf_model(model).named_parameters())
    head, head_sharded = _full_state_dict({name: parameters[name] for name in state.head})
    if (sharded or head_sharded) and torch.distributed.get_rank() != 0:
        return
    tensors.update({HEAD_PREFIX + name: t for name, t in head.items()})
    os.makedirs(path, exist_ok=True)
    config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION if head else 1,
              "prefix_attn_version": __version__, "model_type": state.geometry.model_type,
              "position_offset": state.position_offset, "encoder": state.encoder.config()}
    if head:
        config["head"] = sorted(head)
    if state.geometry.sites:  # an encoder-decoder model: which of its attentions have a prefix
        config["sites"] = list(state.geometry.sites)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def load_prefix(model: nn.Module, path: str) -> nn.Module:
    """Load a prefix saved by save_prefix into model; returns the model.

    A model without prefix tuning gets it (add_prefix_tuning with the saved settings; the task
    head trains on if it was saved, i.e. trained); a model that has it must have the same
    settings. A saved task head is loaded into the model's head (whether or not it trains now);
    a file without one leaves the head as it is. Shapes are checked against the model first, and
    a mismatch raises a ValueError that lists every field that does not fit. Into a model sharded
    by FSDP2, every rank loads the file and keeps its own shard (no communication).
    """
    from safetensors.torch import load_file

    with open(os.path.join(path, CONFIG_NAME)) as f:
        config = json.load(f)
    if config.get("format") != FORMAT_NAME:
        raise ValueError(f"prefix_attn: {os.path.join(path, CONFIG_NAME)} is not a prefix_attn prefix "
                         f"(format {config.get('format')!r}); for a PEFT adapter use load_peft_prefix")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"prefix_attn: {path} has format version {config['format_version']}; this prefix_attn "
                         f"reads up to {FORMAT_VERSION}")
    saved = config["encoder"]
    sites = tuple(config["sites"]) if config.get("sites") else None
    if (sites is not None) != is_encoder_decoder(model):
        raise ValueError(f"prefix_attn: the prefix at {path} was saved from "
                         f"{'an encoder-decoder' if sites else 'a decoder-only or encoder-only'} model (sites "
                         f"{sites}), which {type(hf_model(model)).__name__} is not")
    check_geometry(model_geometry(model, sites), saved["num_layers"], saved["num_kv_heads"], saved["head_dim"],
                    "the prefix", path)
    tensors = load_file(os.path.join(path, WEIGHTS_NAME))
    head = {name[len(HEAD_PREFIX):]: t for name, t in tensors.items() if name.startswith(HEAD_PREFIX)}
    _check_head(model, head, config.get("head", []), path)
    state = get_tuning(model)
    if state is None:
        add_prefix_tuning(model, saved["num_virtual_tokens"], prefix_projection=saved["prefix_projection"],
                          encoder_hidden_size=saved["encoder_hidden_size"], num_tasks=saved["num_tasks"],
                          position_offset=config.get("position_offset", True), dropout=saved.get("dropout", 0.0),
                          sites=sites, train_head=bool(head))
        state = get_tuning(model)
    else:
        require_prefix_tuning(model, "load_prefix")  # a PrefixEncoder, whose settings must match
        current = {**state.encoder.config(), "position_offset": state.position_offset,
                   "sites": state.geometry.sites or None}
        wanted = {**saved, "position_offset": config.get("position_offset", True), "sites": sites}
        mismatches = [(k, wanted[k], current[k]) for k in ("num_virtual_tokens", "num_tasks", "prefix_projection",
                                                         "encoder_hidden_size", "position_offset", "sites")
                      if wanted.get(k) != current.get(k) and not (k == "encoder_hidden_size" and
                                                                  not wanted["prefix_projection"])]
        if mismatches:
            raise mismatch_error("the prefix", path, mismatches)

    tensors = {name: t for name, t in tensors.items() if not name.startswith(HEAD_PREFIX)}
    _check_shapes(tensors, state.encoder.state_dict(), "the prefix tensors", path)
    current = state.encoder.state_dict()
    for name, t in tensors.items():
        if _is_dtensor(current[name]):  # sharded by FSDP2: every rank read the file and keeps its own shard
            tensors[name] = _like(t, current[name])
    state.encoder.load_state_dict(tensors)
    if head:
        parameters = dict(hf_model(model).named_parameters())
        with torch.no_grad():
            for name, t in head.items():
                parameters[name].copy_(_like(t, parameters[name]))
    return model


def _check_shapes(got: Dict[str, Tensor], expected: Dict[str, Tensor], what: str, path: str) -> None:
    got = {name: tuple(t.shape) for name, t in got.items()}
    expected = {name: tuple(t.shape) for name, t in expected.items()}
    if got != expected:
        mismatches = [(name, list(got[name]) if name in got else "nothing",
                       list(expected[name]) if name in expected else "nothing")
                      for name in sorted(set(got) | set(expected)) if got.get(name) != expected.get(name)]
        raise mismatch_error(what, path, mismatches)


def _check_head(model: nn.Module, head: Dict[str, Tensor], listed, path: str) -> None:
    """A saved task head must be the one prefix_config.json lists, and fit the model's task head
    exactly (no other parameter of the model can be written by a prefix file)."""
    if sorted(head) != sorted(listed):
        raise ValueError(f"prefix_attn: {path} lists task-head tensors {sorted(listed)} in {CONFIG_NAME} but holds "
                         f"{sorted(head)} in {WEIGHTS_NAME}")
    if not head:
        return
    inner = hf_model(model)
    modules = task_head(inner)
    if not modules:
        raise ValueError(f"prefix_attn: the prefix at {path} comes with a task head ({sorted(head)[0]}, ...), but "
                         f"{type(inner).__name__} has none")
    _check_shapes(head, head_parameters(inner, modules), "the task head", path)


@torch.no_grad()
def init_prefix_from_text(model: nn.Module, input_ids, *, task: Optional[int] = None) -> nn.Module:
    """Initialise the prefix with the keys and values the model itself computes for a text of
    exactly P tokens (Li & Liang's initialisation from real activations); returns the model.

    input_ids: [P] or [1, P]. The text runs at positions 0 .. P-1, so with position_offset=True
    the model then behaves exactly as if the text were prepended to every input. With a bank,
    `task` picks the entry (None: all of them). Needs a plain-table prefix.
    """
    state = require_prefix_tuning(model, "init_prefix_from_text")
    encoder = state.encoder
    if encoder.prefix_projection:
        raise ValueError("prefix_attn: init_prefix_from_text needs a plain-table prefix, not prefix_projection")
    if state.geometry.sites:
        raise NotImplementedError(
            "prefix_attn: init_prefix_from_text is for decoder-only and encoder-only models; an encoder-decoder's "
            "prefixes (encoder, decoder, cross-attention) have no single text whose keys and values they would be")
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    P = encoder.num_virtual_tokens
    if tuple(ids.shape) != (1, P):
        raise ValueError(f"prefix_attn: init_prefix_from_text needs exactly num_virtual_tokens={P} tokens, shape "
                         f"[{P}] or [1, {P}]; got {list(ids.shape)}")
    model = hf_model(model)
    decoder = getattr(model, "base_model", model)
    with prefix_disabled(model):
        out = decoder(input_ids=ids.to(_encoder_device(encoder)), use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    table = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    table = table.to(encoder.weight.dtype)  # [L, 2, Hkv, P, D]
    if task is None:
        table = table.unsqueeze(2).expand(-1, -1, encoder.num_tasks, -1, -1, -1)
    encoder.load_table(table, task=task)
    return model


def _encoder_device(encoder: PrefixEncoder) -> torch.device:
    return next(encoder.parameters()).device
