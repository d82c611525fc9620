"""What runs at every forward call of a tuned model: the pre-hook on each stack (the prefixes, the
checked task ids, the shifted positions) and model.generate's wrapper, which carries prefix_index
around generate to that hook."""
from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor, nn

from ._state import PAST_KWARG, PREFIX_KWARG, PrefixTuning, get_tuning
from .roberta import padding_aware_positions


def _as_prefix_index(index, num_tasks: int, batch: int, device: torch.device,
                     from_generate: bool = False) -> Optional[Tensor]:
    """Checks prefix_index's type and shape against the batch; an int means every row. from_generate:
    generate() may have expanded each input row into several adjacent rows (beams, samples)."""
    if num_tasks == 1:
        if index is not None:
            raise ValueError("prefix_attn: prefix_index was given, but the prefix has a single task (num_tasks=1); "
                             "use add_prefix_tuning(..., num_tasks=T) for one prefix per task")
        return None
    if index is None:
        raise ValueError(f"prefix_attn: prefix_index is required: the prefix is a bank of num_tasks={num_tasks} "
                         "prefixes; pass model(..., prefix_index=task_ids) (or model.generate(..., "
                         "prefix_index=task_ids)) with one task id per row")
    if not isinstance(index, Tensor):
        index = torch.as_tensor(index)
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        # A TypeError, as prefix_attention's own check of prefix_index gives for the same mistake
        raise TypeError(f"prefix_attn: prefix_index must hold integer task ids, got dtype {index.dtype}")
    if index.dim() == 0:
        index = index.expand(batch)
    expanded = from_generate and index.dim() == 1 and 0 < index.shape[0] < batch and batch % index.shape[0] == 0
    if index.dim() != 1 or (index.shape[0] != batch and not expanded):
        raise ValueError(f"prefix_attn: prefix_index must have shape [B] = [{batch}] (one task id per row), got "
                         f"{list(index.shape)}")
    if expanded:  # num_beams * num_return_sequences adjacent rows per input row
        index = index.repeat_interleave(batch // index.shape[0])
    # Its values are checked against the bank of num_tasks entries by the attention ops that
    # index it, in every layer: on CPU exactly, on CUDA without a host synchronisation (a read
    # here would cost one per step, and keep the step out of a CUDA graph).
    return index.to(device=device, dtype=torch.int64)


def stack_pre_hook(state: PrefixTuning, positions: bool, module: nn.Module, args, kwargs):
    """Before a decoder (or encoder) stack runs: its attention's prefixes, the checked task ids and,
    where `positions` (decoder-only and encoder-only models), the positions shifted by P."""
    if args:  # bind positional arguments to their names so they can be read and replaced
        names = [n for n, p in inspect.signature(module.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        kwargs = {**dict(zip(names, args)), **kwargs}
        args = ()
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("prefix_attn: the decoder got neither input_ids nor inputs_embeds")
    batch, length = inputs.shape[0], inputs.shape[1]

    index = kwargs.pop("prefix_index", None)
    if not state.enabled:
        kwargs[PREFIX_KWARG] = ()
        return args, kwargs
    from_generate = index is None and state.generate_index is not None
    if from_generate:
        index = state.generate_index
    index = _as_prefix_index(index, state.encoder.num_tasks, batch, inputs.device, from_generate)
    if index is not None:
        kwargs["prefix_index"] = index
    if _owns_fsdp_unit(state.encoder):
        # The pairs are views of the encoder's parameters, read by every layer's forward and
        # backward; FSDP2 would free an unit's gathered parameters as soon as its forward returns.
        # Kept until its backward instead (a few MB). In the root unit, the usual setup, they are.
        state.encoder.set_reshard_after_forward(False)
    kwargs[PREFIX_KWARG] = state.encoder()
    if not positions:
        if state.relative_bias:  # T5: where the queries sit, for the prefix keys' bias
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            # A StaticCache answers with a tensor it then advances in place as layers write to it
            kwargs[PAST_KWARG] = past.clone() if isinstance(past, Tensor) else past
        return args, kwargs

    if (kwargs.get("attention_mask") is None and kwargs.get("position_ids") is None
            and kwargs.get("cache", kwargs.get("past_key_values")) is None):
        # With no mask, no positions and no cache, transformers searches the position ids for packed
        # sequences and reads the answer back: a host synchronisation on CUDA, every step.
        # Positions made from a range are never packed; an all-ones mask over the new tokens (all
        # the keys, with no cache) says so, gives the same attention, and skips that search.
        kwargs["attention_mask"] = torch.ones(batch, length, dtype=torch.long, device=inputs.device)
    if state.position_offset:
        P = state.encoder.num_virtual_tokens
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = padding_aware_positions(module, kwargs.get("input_ids"), past + P, length, inputs.device)
            if position_ids is None:
                position_ids = torch.arange(past, past + length, device=inputs.device).unsqueeze(0) + P
        else:
            position_ids = position_ids + P
        # PEFT's prefix is P tokens already in the cache, so its real tokens sit at P, P+1, ...
        kwargs["position_ids"] = position_ids
    return args, kwargs


def _owns_fsdp_unit(module: nn.Module) -> bool:
    """Whether fully_shard (FSDP2) made `module` an FSDP unit of its own."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def generate_with_prefix_index(self, *args, prefix_index=None, **kwargs):
    """model.generate, plus prefix_index (one task id per row, for a bank of prefixes).

    transformers' generate rejects kwargs the model's forward does not name, so prefix_index
    travels around it to the decoder's hook; rows that generate expands (num_beams,
    num_return_sequences) keep their task."""
    state = get_tuning(self)
    if state is None:
        return type(self).generate(self, *args, **kwargs)
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if prefix_index is not None and inputs is not None:  # check against the batch given, before any work
        prefix_index = _as_prefix_index(prefix_index, state.encoder.num_tasks, inputs.shape[0], inputs.device)
    state.generate_index = prefix_index
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        state.generate_index = None
