"""Prompt tuning (Lester et al. 2021) and P-tuning for causal decoders, run through the prefix kernel.

    from prefix_attn.integrations.prompt_tuning import add_prompt_tuning, export_prompt_as_prefix
    model = add_prompt_tuning(model, num_virtual_tokens=64, init_text="Answer briefly.", tokenizer=tok)
    loss = model(input_ids, attention_mask=mask, labels=labels).loss   # only the soft prompt trains
    model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    export_prompt_as_prefix(model)    # after training: a fixed prefix, served as cheaply as prefix tuning

Why it is cheaper than prepending the prompt to every row (what PEFT does):

In a causal decoder the P soft-prompt tokens sit in front of the sequence and attend only to
each other, so their hidden states, and so their keys and values at every layer, are the same
for every row of the batch. PEFT still prepends them to each row: every layer runs on
B * (P + N) tokens, and the lm_head on all of them. Here, once per forward call, the frozen
model runs on the P prompt embeddings alone, as a batch of one, and attention stores each
layer's keys and values as it goes (after rotary; per KV head, as GQA has them). Those are
the per-layer prefix that prefix_attention gives every row, shared and never expanded or
concatenated. The real tokens take positions P, P+1, ... as in PEFT; the gradient of the loss
reaches the prompt through the kernels' prefix gradients and then back through the batch-1
pass. Per step the model runs on B * N + P tokens instead of B * (P + N).

How it plugs in: `add_prompt_tuning` is `add_prefix_tuning` (the attention function, mask
function, decoder hook, positions, generate and freezing: attach.attach) with a `SoftPrompt`, which
computes the prefix keys and values, as the PrefixSource instead of a table. The `SoftPrompt` is
`model.prefix_encoder`; `remove_prompt_tuning` undoes it all.

- P-tuning (Liu et al. 2021, PEFT's "P_TUNING"): `reparameterization="mlp"` or `"lstm"` puts
  PEFT's prompt encoder (MLP, or bidirectional LSTM + MLP) in front of the prompt; it runs once
  per step on the P virtual tokens.
- `load_peft_prompt` imports PEFT PROMPT_TUNING and P_TUNING adapters (both store the final
  prompt embeddings [P, hidden]); `save_peft_prompt` writes a PROMPT_TUNING adapter.
- Generation: the prompt's keys and values are computed once per generate() (they are cached
  while no gradient is recorded and no parameter changed) and are never in any row's KV cache.
- The loss: PEFT also scores each row's first token, from the prompt's last position (it puts
  P labels of -100 in front of the row's and shifts by one). Here, as in prefix tuning and in
  the plain model, the loss starts at the second token. The two agree whenever the first label
  is -100 (a masked instruction, a BOS token), the usual case; logits always agree.
- Dropout: in training mode the model's dropout applies to the prompt pass once, shared by
  every row (PEFT draws it independently per row). In eval mode the two are identical.
- Encoders (BERT, RoBERTa) and encoder-decoders (T5, BART): the prompt tokens attend to the
  sequence (bidirectional attention), so their keys and values depend on each row and this
  method does not apply; `add_prompt_tuning` refuses them with an error that says so.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._state import KV_SINK_KWARG, Geometry, get_tuning, hf_model, require_tuning, text_config
from .attach import add_prefix_tuning, attach, get_prefix_encoder, prefix_disabled, remove_prefix_tuning
from .io import mismatch_error
from .peft_io import read_peft_adapter
from .refusals import check_supported

__all__ = ["SoftPrompt", "add_prompt_tuning", "remove_prompt_tuning", "get_soft_prompt", "export_prompt_as_prefix",
           "load_peft_prompt", "save_peft_prompt"]

_REPARAMETERIZATIONS = (None, "mlp", "lstm")


class SoftPrompt(nn.Module):
    """The trainable soft prompt of a prompt-tuned model, and the per-layer prefix it yields.

    Args:
        model: the transformers model it belongs to (held, not registered as a submodule).
        num_virtual_tokens: P.
        token_dim: the model's hidden size (the prompt is P input embeddings).
        reparameterization: None (prompt tuning: the embeddings are the parameters), "mlp" or
            "lstm" (P-tuning: PEFT's prompt encoder turns the embeddings into the prompt).
        encoder_hidden_size, encoder_num_layers, encoder_dropout: P-tuning's encoder, as PEFT's
            PromptEncoderConfig (hidden size defaults to token_dim).

    `prompt()` is the prompt [P, token_dim]; calling the module runs the model on it (a batch of
    one, positions 0 .. P-1, the prefix switched off) and returns a tuple of one (key, value)
    pair per layer, each [Hkv, P, D]: the prefix every row attends to. It is the PrefixSource
    of a prompt-tuned model (as a PrefixEncoder is of a prefix-tuned one).
    """

    num_tasks = 1  # PrefixSource: one prompt for every row, no bank

    def __init__(self, model: nn.Module, num_virtual_tokens: int, token_dim: int, *,
                 reparameterization: Optional[str] = None, encoder_hidden_size: Optional[int] = None,
                 encoder_num_layers: int = 2, encoder_dropout: float = 0.0,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise ValueError(f"prefix_attn: num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
        if reparameterization not in _REPARAMETERIZATIONS:
            raise ValueError(f"prefix_attn: reparameterization must be one of {_REPARAMETERIZATIONS}, got "
                             f"{reparameterization!r}")
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = token_dim
        self.reparameterization = reparameterization
        factory = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, **factory)
        hidden = encoder_hidden_size or token_dim
        self.encoder_hidden_size = hidden
        # PEFT's PromptEncoder, layer for layer (and its state-dict names)
        if reparameterization == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden, **factory), nn.ReLU(),
                                          nn.Linear(hidden, hidden, **factory), nn.ReLU(),
                                          nn.Linear(hidden, token_dim, **factory))
        elif reparameterization == "lstm":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=encoder_num_layers, dropout=encoder_dropout,
                                     bidirectional=True, batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim, **factory))
        # Not a submodule: the model owns this module, not the other way round. Plain __dict__
        # entries, so that copy.deepcopy(model) points the copy's SoftPrompt at the copy.
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_cache", None)

    def prompt(self) -> Tensor:
        """The soft prompt [P, token_dim], differentiable (P-tuning's encoder runs here, once)."""
        weight = self.embedding.weight
        if self.reparameterization == "mlp":
            return self.mlp_head(weight)
        if self.reparameterization == "lstm":
            return self.mlp_head(self.lstm_head(weight.unsqueeze(0))[0])[0]
        return weight

    def forward(self) -> Tuple[Tuple[Tensor, Tensor], ...]:
        model = self._model
        if model is None:
            raise RuntimeError("prefix_attn: this SoftPrompt was removed from its model (remove_prompt_tuning)")
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        key = None
        if not recording and not model.training:
            # Inference (generate calls this at every decoding step): the prefix only changes when
            # a parameter does. In-place updates bump _version; .to() or loading replaces tensors.
            key = tuple((id(p), p._version) for p in model.parameters())
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        layers = self._run(model)
        object.__setattr__(self, "_cache", None if key is None else (key, layers))
        return layers

    def _run(self, model: nn.Module) -> Tuple[Tuple[Tensor, Tensor], ...]:
        embeddings = model.get_input_embeddings().weight
        prompt = self.prompt().to(embeddings.dtype).unsqueeze(0)  # [1, P, hidden], as PEFT casts it
        P = self.num_virtual_tokens
        num_layers = require_tuning(model, "SoftPrompt").geometry.num_layers
        sink: list = [None] * num_layers
        decoder = getattr(model, "base_model", model)
        with prefix_disabled(model):  # positions 0 .. P-1, no prefix: the prompt is the prefix
            decoder(inputs_embeds=prompt, attention_mask=torch.ones(1, P, dtype=torch.long, device=prompt.device),
                    use_cache=False, **{KV_SINK_KWARG: sink})
        missing = [i for i, kv in enumerate(sink) if kv is None]
        if missing:
            raise RuntimeError(f"prefix_attn: the prompt pass did not reach the attention of layers {missing}; "
                               f"{type(model).__name__} does not forward attention kwargs to every layer")
        layers = tuple((k[0], v[0]) for k, v in sink)  # [Hkv, P, D] each
        if torch.is_grad_enabled() and prompt.requires_grad and not layers[0][0].requires_grad:
            raise RuntimeError("prefix_attn: the prompt's keys and values came back without a gradient path. "
                               "Reentrant gradient checkpointing hides them from autograd; use the non-reentrant "
                               "kind (transformers' default: gradient_checkpointing_enable() without "
                               "use_reentrant=True)")
        return layers

    def clear_cache(self) -> None:
        object.__setattr__(self, "_cache", None)

    def extra_repr(self) -> str:
        text = f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}"
        if self.reparameterization:
            text += f", reparameterization={self.reparameterization!r}, encoder_hidden_size={self.encoder_hidden_size}"
        return text


# ----------------------------------------------------------------------------------------------
# Attaching


def _check_causal_decoder(model: nn.Module) -> None:
    config = text_config(model)
    name = type(model).__name__
    if getattr(model.config, "is_encoder_decoder", False) or getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"prefix_attn: add_prompt_tuning needs a causal decoder; {name} is an encoder-decoder. Its soft prompt "
            "goes through the encoder, where every token attends to the whole input, so the prompt's keys and "
            "values differ from row to row and cannot be computed once as a shared prefix. Use add_prefix_tuning, "
            "or PEFT's prompt tuning, which prepends the prompt to every row")
    for module_name, module in model.named_modules():
        if getattr(module, "layer_idx", None) is not None and getattr(module, "is_causal", True) is False:
            raise ValueError(
                f"prefix_attn: add_prompt_tuning needs a causal decoder, but {module_name} "
                f"({type(module).__name__}) attends bidirectionally (is_causal=False), as in BERT-style encoders. "
                "There the soft-prompt tokens see the sequence, so their keys and values differ from row to row "
                "and cannot be computed once as a shared prefix. Use add_prefix_tuning, or PEFT's prompt tuning, "
                "which prepends the prompt to every row")
    if getattr(config, "is_decoder", True) is False and getattr(config, "model_type", "") in (
            "bert", "roberta", "deberta", "deberta-v2", "distilbert", "electra", "xlm-roberta"):
        raise ValueError(f"prefix_attn: add_prompt_tuning needs a causal decoder; {name} is a bidirectional "
                         f"encoder ({config.model_type}), whose soft-prompt tokens would see the sequence")


def _init_ids(num_virtual_tokens: int, vocab_size: int, init_text, tokenizer) -> Tensor:
    """Token ids whose embeddings start the prompt: init_text's, repeated or cut to P (PEFT's
    TEXT init), or P ids drawn uniformly from the vocabulary (PEFT's SAMPLE_VOCAB)."""
    if init_text is None:
        return torch.randint(0, vocab_size, (num_virtual_tokens,))
    if isinstance(init_text, str):
        if tokenizer is None:
            raise ValueError("prefix_attn: add_prompt_tuning got init_text as a string but no tokenizer; pass "
                             "tokenizer=, or init_text as token ids")
        ids = list(tokenizer(init_text)["input_ids"])
    else:
        ids = torch.as_tensor(init_text).reshape(-1).tolist()
    if not ids:
        raise ValueError("prefix_attn: init_text has no tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"prefix_attn: init_text has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
    return torch.tensor(ids)


def add_prompt_tuning(model: nn.Module, num_virtual_tokens: int, *, init_text: Union[str, Sequence[int], Tensor,
                      None] = None, tokenizer: Any = None, reparameterization: Optional[str] = None,
                      encoder_hidden_size: Optional[int] = None, encoder_num_layers: int = 2,
                      encoder_dropout: float = 0.0, train_head: bool = True) -> nn.Module:
    """Prompt-tune a causal decoder (transformers) through prefix_attn; returns the same model,
    modified in place.

    - Every existing parameter is frozen; a trainable `SoftPrompt` of P = num_virtual_tokens
      input embeddings becomes `model.prefix_encoder`. Each forward call runs the model once on
      it (batch 1) and gives its per-layer keys and values to every row as a shared prefix.
      Real tokens take positions P, P+1, ... and the outputs are PEFT prompt tuning's (the
      logits of the real tokens only: PEFT also returns P logits for the prompt).
    - init_text: a string (with `tokenizer`) or token ids; the prompt starts as their
      embeddings, repeated or cut to P (PEFT's TEXT init). None: the embeddings of P tokens drawn
      uniformly from the vocabulary (PEFT's SAMPLE_VOCAB; torch's global generator).
    - reparameterization="mlp" or "lstm": P-tuning (PEFT's P_TUNING prompt encoder), with
      encoder_hidden_size (default: hidden size), encoder_num_layers and encoder_dropout (LSTM).
    - train_head: as add_prefix_tuning's: the task head of a `...ForSequenceClassification` (and
      token classification, question answering) decoder trains with the prompt unless False.
    - A quantized base is marked as carrying trainable adapters (the HF Trainer accepts it), and
      the model gets its own copy of its config, as with add_prefix_tuning.

    Works with model.generate, the HF Trainer and non-reentrant gradient checkpointing (the
    default). Only causal decoders: encoders and encoder-decoders raise a ValueError saying why,
    and the models add_prefix_tuning refuses are refused at the call, with the same line.
    After training, `export_prompt_as_prefix(model)` turns the prompt into a fixed prefix.
    Undo with `remove_prompt_tuning(model)`.
    """
    outer, model = model, hf_model(model)  # a PEFT (e.g. LoRA) wrapper: the prompt goes on the model inside
    if not hasattr(model, "config") or not hasattr(model.config, "_attn_implementation"):
        raise TypeError(f"prefix_attn: add_prompt_tuning needs a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    check_supported(model)
    _check_causal_decoder(model)
    embeddings = model.get_input_embeddings()
    if embeddings is None or not hasattr(embeddings, "weight"):
        raise ValueError(f"prefix_attn: {type(model).__name__} has no input embedding table "
                         "(get_input_embeddings()); prompt tuning needs one")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"prefix_attn: num_virtual_tokens must be a positive int, got {num_virtual_tokens!r}")
    vocab_size, token_dim = embeddings.weight.shape
    ids = _init_ids(num_virtual_tokens, vocab_size, init_text, tokenizer)
    weight = embeddings.weight
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # train the prompt in float32; it is cast to the model's dtype when used
    soft_prompt = SoftPrompt(model, num_virtual_tokens, token_dim, reparameterization=reparameterization,
                             encoder_hidden_size=encoder_hidden_size, encoder_num_layers=encoder_num_layers,
                             encoder_dropout=encoder_dropout, device=weight.device, dtype=dtype)
    with torch.no_grad():
        soft_prompt.embedding.weight.copy_(embeddings(ids.to(weight.device)))

    # The prefix-tuning machinery (attention and mask functions, the decoder hook, positions
    # shifted by P, generate, frozen parameters), with the prompt's keys and values as the prefix.
    def make_source(model: nn.Module, geometry: Geometry) -> SoftPrompt:
        return soft_prompt

    return attach(outer, make_source, train_head=train_head)


def get_soft_prompt(model: nn.Module) -> Optional[SoftPrompt]:
    """The SoftPrompt add_prompt_tuning attached to model, or None."""
    encoder = get_prefix_encoder(model)
    return encoder if isinstance(encoder, SoftPrompt) else None


def _require_prompt(model: nn.Module, what: str) -> SoftPrompt:
    soft_prompt = get_soft_prompt(model)
    if soft_prompt is None:
        raise ValueError(f"prefix_attn: {what} needs a model prepared with add_prompt_tuning")
    return soft_prompt


def remove_prompt_tuning(model: nn.Module) -> SoftPrompt:
    """Undo add_prompt_tuning (attention implementation, requires_grad flags, generate, the hook);
    returns the detached SoftPrompt."""
    soft_prompt = _require_prompt(model, "remove_prompt_tuning")
    remove_prefix_tuning(model)
    object.__setattr__(soft_prompt, "_model", None)
    soft_prompt.clear_cache()
    return soft_prompt


@torch.no_grad()
def prompt_prefix_table(model: nn.Module) -> Tensor:
    """The prompt's keys and values for every layer, [L, 2, Hkv, P, D], as the model computes
    them in eval mode (no dropout): the prefix table export_prompt_as_prefix installs."""
    soft_prompt = _require_prompt(model, "prompt_prefix_table")
    model = soft_prompt._model
    training = model.training
    model.eval()
    try:
        layers = soft_prompt._run(model)
    finally:
        model.train(training)
    return torch.stack([torch.stack(kv) for kv in layers])


def export_prompt_as_prefix(model: nn.Module) -> nn.Module:
    """Turn a prompt-tuned model into a prefix-tuned one with the same outputs; returns the model.

    Once trained, the prompt's per-layer keys and values no longer change: they become the
    table of a plain `PrefixEncoder` (add_prefix_tuning with P = num_virtual_tokens, positions
    shifted by P as before), so each forward call no longer runs the prompt pass, and the model
    serves exactly as a prefix-tuned one does. save_prefix / save_peft_prefix then save it (the
    latter as a PEFT prefix-tuning adapter with the same outputs). The table is trainable, as
    any prefix; the soft prompt itself is dropped.
    """
    table = prompt_prefix_table(model)
    P = table.shape[3]
    train_head = bool(get_tuning(model).head)  # the task head, if any, goes on training as it did
    remove_prompt_tuning(model)
    add_prefix_tuning(model, P, train_head=train_head)
    encoder = get_prefix_encoder(model)
    encoder.load_table(table.to(device=encoder.weight.device, dtype=encoder.weight.dtype))
    return model


# ----------------------------------------------------------------------------------------------
# PEFT adapters

_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")


def load_peft_prompt(model: nn.Module, path: str) -> nn.Module:
    """Load a PEFT PROMPT_TUNING or P_TUNING adapter (adapter_config.json and
    adapter_model.safetensors) into model; returns the model, with PEFT's outputs.

    Both store `prompt_embeddings` [P, hidden]: for P-tuning, the output of its prompt encoder
    (what PEFT itself uses in inference mode), so the prompt loads as a plain table. A model
    without prompt tuning gets add_prompt_tuning(model, P); a prompt-tuned one must have the
    same P and no reparameterization.
    """
    from safetensors.torch import load_file

    config, config_file, weights_file = read_peft_adapter(path)
    peft_type = config.get("peft_type")
    if peft_type not in _PEFT_TYPES:
        hint = "; use load_peft_prefix" if peft_type == "PREFIX_TUNING" else ""
        raise ValueError(f"prefix_attn: {config_file} is a {peft_type!r} adapter, not one of {_PEFT_TYPES}{hint}")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"prefix_attn: {config_file} has num_transformer_submodules="
                         f"{config['num_transformer_submodules']} (an encoder-decoder adapter); prompt tuning "
                         "through prefix_attn needs a causal decoder")
    tensors = load_file(weights_file)
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"prefix_attn: {weights_file} has no 'prompt_embeddings' tensor (found {sorted(tensors)})")
    embeddings = tensors["prompt_embeddings"]
    P = config["num_virtual_tokens"]
    token_dim = hf_model(model).get_input_embeddings().weight.shape[1]
    if tuple(embeddings.shape) != (P, token_dim):
        raise mismatch_error("the PEFT adapter", path,
                             [("prompt_embeddings", list(embeddings.shape), [P, token_dim])])
    soft_prompt = get_soft_prompt(model)
    if soft_prompt is None:
        add_prompt_tuning(model, P)
        soft_prompt = get_soft_prompt(model)
    elif soft_prompt.num_virtual_tokens != P or soft_prompt.reparameterization is not None:
        raise mismatch_error("the PEFT adapter", path, [
            (name, got, want) for name, got, want in (
                ("num_virtual_tokens", P, soft_prompt.num_virtual_tokens),
                ("reparameterization", None, soft_prompt.reparameterization)) if got != want])
    weight = soft_prompt.embedding.weight
    with torch.no_grad():
        weight.copy_(embeddings.to(device=weight.device, dtype=weight.dtype))
    return model


def save_peft_prompt(model: nn.Module, path: str) -> None:
    """Save the soft prompt as a PEFT PROMPT_TUNING adapter that `peft.PeftModel.from_pretrained`
    loads, with this model's outputs: `prompt_embeddings` [P, hidden] (for P-tuning, its
    encoder's output, as PEFT saves it; such an adapter trains on as plain prompt tuning)."""
    from safetensors.torch import save_file

    soft_prompt = _require_prompt(model, "save_peft_prompt")
    config = text_config(model)
    geometry = get_tuning(model).geometry
    with torch.no_grad():
        embeddings = soft_prompt.prompt().detach().float().contiguous().cpu()
    adapter = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
               "num_virtual_tokens": soft_prompt.num_virtual_tokens, "token_dim": soft_prompt.token_dim,
               "num_transformer_submodules": 1, "num_attention_heads": config.num_attention_heads,
               "num_layers": geometry.num_layers, "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
               "tokenizer_name_or_path": None, "tokenizer_kwargs": None, "inference_mode": True,
               "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
               "revision": None, "modules_to_save": None, "auto_mapping": None}
    os.makedirs(path, exist_ok=True)
    save_file({"prompt_embeddings": embeddings}, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(adapter, f, indent=2, sort_keys=True)
        f.write("\n")
