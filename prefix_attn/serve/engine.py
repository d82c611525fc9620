"""Many prefix-tuned tasks served from one base model on transformers' continuous batching.

The engine is transformers' own: `ContinuousBatchingManager` (its scheduler, its paged KV cache,
its generation thread). prefix_attn adds three things around it, without patching transformers:

- A bank of prefixes: `add_prefix_tuning(model, P, num_tasks=max_adapters)`; each loaded adapter
  takes one bank entry (a slot). Requests that name no adapter attend to no prefix at all.
- An attention function registered in transformers' `AttentionInterface` under PAGED_ATTN_NAME,
  for the paged path: continuous batching packs every request of a step into one row (queries
  [1, Hq, sum q, D], keys [1, Hkv, sum k, D] read back from the paged cache, request boundaries in
  `cu_seq_lens_q` / `cu_seq_lens_k`). The function regroups the packed requests into a padded
  batch, one row per request, and runs one `prefix_attention` call over the whole batch with
  `prefix_index` = each request's slot, so requests of different adapters share the kernel call.
  Rows are padded at the front so that the kernel's bottom-right causal alignment is each
  request's own.
- A forward pre-hook on the decoder that says which slot each packed request uses. transformers'
  paged forward carries no per-request user data to the model (`PagedAttentionArgs` holds token
  and cache tensors only; the per-request logits-processor arguments cover only the requests
  that sample a token in that step), so the slot travels as server-side state: request id ->
  slot, joined with the order of the requests the batch processor just packed
  (`requests_in_batch`, the order of cu_seq_lens_q). That is a read of the batch processor's
  state, the one place this module leans on transformers internals; `_batch_request_ids` is it.

Continuous batching accepts only the attention implementations it knows by name ("sdpa",
"paged|eager", flash): the manager is created with "sdpa" (checked, with the flash switch off),
then the model's config is pointed at PAGED_ATTN_NAME before the batch processor exists, so no
additive mask is built (our function masks per request) and every attention call lands here.

Prefix caching (block sharing) is switched off: a prompt's cached keys and values depend on the
adapter (every layer after the first sees the prefix), and the cache keys blocks by tokens only.
"""
from __future__ import annotations

import copy
import json
import os
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from ..functional import prefix_attention

#: The name of the paged attention function in transformers' AttentionInterface.
PAGED_ATTN_NAME = "prefix_attn_paged"
#: Attention kwarg (set by the engine's hook): the packed batch's regrouping plan (_Plan).
PLAN_KWARG = "prefix_attn_plan"
#: The slot of requests that name no adapter: no prefix.
BASE_SLOT = -1


class AdapterError(ValueError):
    """An adapter that cannot be loaded; the message says why."""


@dataclass
class _Plan:
    """How the packed step regroups into a padded batch [R, ., max, D] (padding at the front)."""
    q_index: Tensor      # [R, max_q] positions in the packed queries (padding repeats a valid one)
    k_index: Tensor      # [R, max_k] positions in the packed keys
    k_valid: Tensor      # [R, max_k] bool
    q_valid: Tensor      # [R, max_q] bool
    slots: Tensor        # [R] int64, BASE_SLOT for no prefix
    with_prefix: Optional[Tensor]  # rows with a prefix, None when all rows have one
    without_prefix: Optional[Tensor]


def _plan(cu_q: Tensor, cu_k: Tensor, slots: List[int], device) -> _Plan:
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    R = len(slots)
    nq = [cu_q[i + 1] - cu_q[i] for i in range(R)]
    nk = [cu_k[i + 1] - cu_k[i] for i in range(R)]
    max_q, max_k = max(nq), max(nk)
    # Front padding: a row's real queries and keys end at the padded tensor's end, so the
    # kernel's bottom-right causal alignment (query i sees key j iff j <= i + Nk - Nq) is the
    # request's own; padded keys are hidden by the key mask, padded queries are dropped.
    ar_q, ar_k = torch.arange(max_q), torch.arange(max_k)
    nq_t, nk_t = torch.tensor(nq).unsqueeze(1), torch.tensor(nk).unsqueeze(1)
    q_valid = ar_q >= max_q - nq_t
    k_valid = ar_k >= max_k - nk_t
    q_index = torch.tensor(cu_q[:R]).unsqueeze(1) + (ar_q - (max_q - nq_t)).clamp(min=0)
    k_index = torch.tensor(cu_k[:R]).unsqueeze(1) + (ar_k - (max_k - nk_t)).clamp(min=0)
    slot_t = torch.tensor(slots, dtype=torch.int64)
    has = slot_t >= 0
    with_prefix = without = None
    if not bool(has.all()):
        with_prefix, without = has.nonzero().squeeze(1), (~has).nonzero().squeeze(1)
        with_prefix, without = with_prefix.to(device), without.to(device)
    return _Plan(q_index.to(device), k_index.to(device), k_valid.to(device), q_valid.to(device), slot_t.to(device),
                 with_prefix, without)


def paged_prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                           dropout: float = 0.0, **kwargs):
    """AttentionInterface function for transformers' paged (continuous batching) path.

    query [1, Hq, sum q, D], key / value [1, Hkv, sum k, D]: every request of the step, packed.
    Outside continuous batching (no plan) it is prefix_attn's own attention function."""
    plan: Optional[_Plan] = kwargs.get(PLAN_KWARG)
    from ..integrations.transformers import PREFIX_KWARG, prefix_attention_forward
    if plan is None:
        return prefix_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    layers = kwargs[PREFIX_KWARG]
    bank_k, bank_v = layers[module.layer_idx]  # [T, Hkv, P, D]
    if bank_k.dtype != query.dtype:
        bank_k, bank_v = bank_k.to(query.dtype), bank_v.to(query.dtype)
    q = query[0][:, plan.q_index].transpose(0, 1)  # [R, Hq, max_q, D]
    k = key[0][:, plan.k_index].transpose(0, 1)    # [R, Hkv, max_k, D]
    v = value[0][:, plan.k_index].transpose(0, 1)
    common = dict(causal=True, softmax_scale=scaling)
    R, Hq, max_q, D = q.shape
    Hkv = k.shape[1]
    grouped = max_q == 1 and Hq != Hkv
    if grouped:
        # A decode step (one query per request): the query heads that share a KV head become
        # that head's queries, so the kernel reads each KV head once (as prefix_attn's own
        # attention function does); one query position masks nothing causally.
        q, common["causal"] = q.reshape(R, Hkv, Hq // Hkv, D), False
    if plan.with_prefix is None:
        out = prefix_attention(q, k, v, bank_k, bank_v, prefix_index=plan.slots, key_padding_mask=plan.k_valid,
                               **common)
    else:
        out = q.new_empty(q.shape)
        rows = plan.with_prefix
        if rows.numel():
            out[rows] = prefix_attention(q[rows], k[rows], v[rows], bank_k, bank_v, prefix_index=plan.slots[rows],
                                         key_padding_mask=plan.k_valid[rows], **common)
        rows = plan.without_prefix
        out[rows] = prefix_attention(q[rows], k[rows], v[rows], key_padding_mask=plan.k_valid[rows], **common)
    if grouped:
        out = out.reshape(R, Hq, 1, D)
    # back to the packed layout [1, sum q, Hq, D]
    out = out.transpose(1, 2)[plan.q_valid]  # [sum q, Hq, D], rows in packed order
    return out.unsqueeze(0), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(PAGED_ATTN_NAME, paged_prefix_attention)


# ----------------------------------------------------------------------------------------------
# Adapters


def _read_table(model: nn.Module, path: str, scratch_factory) -> tuple:
    """(table [L, 2, Hkv, P, D], kind, position_offset) of the adapter at `path`, whatever its format:
    a prefix saved by save_prefix (one task), a PEFT prefix-tuning adapter, or a PEFT prompt-tuning
    adapter (exported as a prefix with export_prompt_as_prefix)."""
    from ..integrations import transformers as hf
    from ..prefix_encoder import PrefixEncoder

    if not os.path.isdir(path):
        raise AdapterError(f"adapter path {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, hf.CONFIG_NAME)):
        from safetensors.torch import load_file
        with open(os.path.join(path, hf.CONFIG_NAME)) as f:
            config = json.load(f)
        if config.get("format") != hf.FORMAT_NAME:
            raise AdapterError(f"{path}: {hf.CONFIG_NAME} is not a prefix_attn prefix (format {config.get('format')!r})")
        if config.get("sites"):
            raise AdapterError(f"{path}: an encoder-decoder prefix; the server serves decoder-only models")
        saved = dict(config["encoder"])
        if saved.get("num_tasks", 1) != 1:
            raise AdapterError(f"{path}: a bank of {saved['num_tasks']} prefixes; the server loads one prefix per "
                               "adapter (save each task on its own)")
        encoder = PrefixEncoder(saved["num_layers"], saved["num_kv_heads"], saved["head_dim"],
                                saved["num_virtual_tokens"], prefix_projection=saved["prefix_projection"],
                                encoder_hidden_size=saved.get("encoder_hidden_size"))
        encoder.load_state_dict(load_file(os.path.join(path, hf.WEIGHTS_NAME)))
        with torch.no_grad():
            return encoder.merge().table()[:, :, 0].clone(), "prefix", bool(config.get("position_offset", True))
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        with open(os.path.join(path, "adapter_config.json")) as f:
            peft_type = json.load(f).get("peft_type")
        scratch = scratch_factory()
        if peft_type == "PREFIX_TUNING":
            hf.load_peft_prefix(scratch, path)
        elif peft_type in ("PROMPT_TUNING", "P_TUNING"):
            from ..integrations.prompt_tuning import export_prompt_as_prefix, load_peft_prompt
            load_peft_prompt(scratch, path)
            export_prompt_as_prefix(scratch)
        else:
            raise AdapterError(f"{path}: a PEFT {peft_type!r} adapter; the server serves PREFIX_TUNING, PROMPT_TUNING "
                               "and P_TUNING adapters")
        with torch.no_grad():
            return hf.get_prefix_encoder(scratch).table()[:, :, 0].clone(), peft_type.lower(), True
    raise AdapterError(f"{path}: neither a prefix_attn prefix ({hf.CONFIG_NAME}) nor a PEFT adapter "
                       "(adapter_config.json)")


# ----------------------------------------------------------------------------------------------
# The engine


class Engine:
    """One base model, a bank of `max_adapters` prefixes, transformers' continuous batching.

    submit() / cancel() are what the HTTP layer calls; load_adapter() / unload_adapter() change
    the bank while requests run."""

    def __init__(self, model: nn.Module, *, num_virtual_tokens: int, max_adapters: int = 8,
                 max_queue: int = 64, num_blocks: Optional[int] = None, max_batch_tokens: Optional[int] = None,
                 page_size: int = 32, eos_token_id=None):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from ..integrations.transformers import add_prefix_tuning, get_prefix_encoder

        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("prefix_attn.serve: encoder-decoder models are not served (continuous batching is "
                             "decoder-only)")
        layer_types = getattr(model.config.get_text_config(), "layer_types", None)
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ValueError(f"prefix_attn.serve: only full-attention models are served, got layer types "
                             f"{sorted(set(layer_types))}")
        # A pristine copy for loading PEFT adapters (their loaders attach prefix or prompt tuning to
        # a model of their own) is made lazily from this one, before it gets the bank.
        self._base_state = {k: v for k, v in model.state_dict().items()}
        self._model_config = model.config
        self._model_class = type(model)
        self.model = model.eval()
        self.num_virtual_tokens = int(num_virtual_tokens)
        self.max_adapters = int(max_adapters)
        add_prefix_tuning(model, self.num_virtual_tokens, num_tasks=self.max_adapters)
        self.encoder = get_prefix_encoder(model)
        with torch.no_grad():
            self.encoder.weight.zero_()
        self.encoder.requires_grad_(False)

        self._lock = threading.Lock()
        self.adapters: Dict[str, int] = {}           # name -> slot
        self._free = list(range(self.max_adapters))[::-1]
        self._refs = [0] * self.max_adapters           # requests in flight per slot
        self._retired = set()                          # slots unloaded while in use
        self._slot_of_request: Dict[str, int] = {}
        #: steps run, and the most distinct slots (adapters, BASE_SLOT included) one step mixed
        self.stats = {"steps": 0, "max_distinct_slots": 0}

        _register_attention()
        decoder = getattr(model, "base_model", model)
        self._hook = decoder.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True)

        gen = GenerationConfig(do_sample=False, max_new_tokens=16,
                               eos_token_id=eos_token_id if eos_token_id is not None else model.config.eos_token_id,
                               pad_token_id=model.config.pad_token_id)
        cb = ContinuousBatchingConfig(allow_block_sharing=False, auto_switch_to_flash=False, use_async_batching=False,
                                      use_cuda_graph=False, max_queue_size=0, page_size=page_size,
                                      num_blocks=num_blocks, max_batch_tokens=max_batch_tokens)
        self.max_queue = int(max_queue)
        self._pending = 0  # admitted requests not finished
        # Continuous batching checks the implementation by name: validate as sdpa, then point the
        # config at the paged prefix attention before the batch processor (and its masks) exists.
        from ..integrations.transformers import ATTN_IMPLEMENTATION
        self._prefix_impl = ATTN_IMPLEMENTATION
        self._set_impl("sdpa")
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self._set_impl(PAGED_ATTN_NAME)
        self.manager.start()

    def _set_impl(self, name: str) -> None:
        for config in {id(c): c for c in (self.model.config, self.model.config.get_text_config())}.values():
            config._attn_implementation = name

    # -- the per-step hook ----------------------------------------------------------------------

    def _batch_request_ids(self) -> List[str]:
        """The ids of the requests transformers packed into this step, in cu_seq_lens_q's order."""
        processor = self.manager.batch_processor
        return [future.state.request_id for future in processor.inputs_and_outputs.requests_in_batch]

    def _pre_hook(self, module, args, kwargs):
        cu_q = kwargs.get("cu_seq_lens_q")
        if cu_q is None:  # not the paged path (e.g. a plain forward on the same model)
            return args, kwargs
        cu_k = kwargs.get("cu_seq_lens_k")
        if isinstance(cu_k, dict):
            cu_k = cu_k["full_attention"] if "full_attention" in cu_k else next(iter(cu_k.values()))
        ids = self._batch_request_ids()
        with self._lock:
            slots = [self._slot_of_request.get(i, BASE_SLOT) for i in ids]
        self.stats["steps"] += 1
        self.stats["max_distinct_slots"] = max(self.stats["max_distinct_slots"], len(set(slots)))
        num = cu_q.shape[0] - 1
        if len(slots) > num:  # the one assumption on transformers' internals, checked every step
            raise RuntimeError(f"prefix_attn.serve: the batch processor lists {len(slots)} requests in this step but "
                               f"cu_seq_lens_q holds {num}; this transformers version packs steps differently")
        slots = slots + [BASE_SLOT] * (num - len(slots))  # zero-length padding sequences, if any
        device = kwargs["input_ids"].device if kwargs.get("input_ids") is not None else cu_q.device
        kwargs[PLAN_KWARG] = plan = _plan(cu_q, cu_k, slots, device)
        # prefix_attn's own hook (next) wants one task id per packed row; the plan carries the real ones
        kwargs["prefix_index"] = torch.zeros(1, dtype=torch.int64, device=device)
        if plan.without_prefix is not None and kwargs.get("position_ids") is not None:
            # That hook shifts every position by P (PEFT's positions); requests with no adapter are
            # the base model, whose positions start at 0.
            P = self.num_virtual_tokens
            per_token = torch.repeat_interleave(plan.slots < 0, torch.diff(cu_q.to(plan.slots.device)))
            kwargs["position_ids"] = kwargs["position_ids"] - P * per_token.to(kwargs["position_ids"].dtype)
        return args, kwargs

    # -- adapters -------------------------------------------------------------------------------

    def _scratch_model(self) -> nn.Module:
        scratch = self._model_class(copy.deepcopy(self._model_config))
        scratch.load_state_dict(self._base_state, strict=False)
        for config in {id(c): c for c in (scratch.config, scratch.config.get_text_config())}.values():
            config._attn_implementation = "sdpa"
        return scratch.eval()

    def load_adapter(self, name: str, path: str) -> int:
        """Load the adapter at `path` under `name` into a free slot; returns the slot. AdapterError
        (the server answers 400) when it does not fit this model; nothing changes then."""
        if not name or name in ("base",):
            raise AdapterError(f"adapter name {name!r} is reserved")
        with self._lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named {name!r} is loaded already; unload it first")
        try:
            table, kind, position_offset = _read_table(self.model, path, self._scratch_model)
        except AdapterError:
            raise
        except Exception as exc:  # a loader's own error, with its message
            raise AdapterError(f"{path}: {exc}") from exc
        want = tuple(self.encoder.weight[:, :, 0].shape)
        if tuple(table.shape) != want:
            raise AdapterError(f"{path}: a prefix of shape [L, 2, Hkv, P, D] = {list(table.shape)}; this server's "
                               f"bank holds {list(want)} (P = {self.num_virtual_tokens} is set by --num-virtual-tokens)")
        if not position_offset:
            raise AdapterError(f"{path}: saved with position_offset=False; the server shifts positions by P as PEFT")
        with self._lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named {name!r} is loaded already; unload it first")
            if not self._free:
                raise AdapterError(f"all {self.max_adapters} adapter slots are in use (--max-adapters)")
            slot = self._free.pop()
        # The slot is used by no request in flight (free), so no step reads it while it is written.
        with torch.no_grad():
            self.encoder.weight[:, :, slot].copy_(table.to(self.encoder.weight.dtype))
        with self._lock:
            self.adapters[name] = slot
        return slot

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            slot = self.adapters.pop(name, None)
            if slot is None:
                raise KeyError(name)
            if self._refs[slot]:
                self._retired.add(slot)  # freed when its last request ends
            else:
                self._free.append(slot)

    # -- requests -------------------------------------------------------------------------------

    def admit(self, adapter: Optional[str]) -> int:
        """Reserve a place for a request of `adapter` (None: the base model); returns its slot.
        KeyError for an unknown adapter, QueueFull when max_queue requests are already admitted."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} requests are queued or running (--max-queue {self.max_queue})")
            if adapter is None:
                slot = BASE_SLOT
            else:
                slot = self.adapters.get(adapter)
                if slot is None:
                    raise KeyError(adapter)
                self._refs[slot] += 1
            self._pending += 1
            return slot

    def submit(self, request_id: str, slot: int, input_ids: List[int], max_new_tokens: int, streaming: bool) -> None:
        with self._lock:
            self._slot_of_request[request_id] = slot
        self.manager.add_request(input_ids, request_id=request_id, max_new_tokens=max_new_tokens, streaming=streaming)

    def release(self, request_id: Optional[str], slot: int, cancel: bool = False) -> None:
        """A request admitted with `slot` is over (finished, failed or cancelled)."""
        if cancel and request_id is not None:
            self.manager.cancel_request(request_id)
        with self._lock:
            if request_id is not None:
                self._slot_of_request.pop(request_id, None)
            self._pending -= 1
            if slot != BASE_SLOT:
                self._refs[slot] -= 1
                if not self._refs[slot] and slot in self._retired:
                    self._retired.discard(slot)
                    self._free.append(slot)

    @property
    def alive(self) -> bool:
        return self.manager.is_running() and self.manager.background_thread_status.fatal_error is None

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the generation thread: requests still running are finished or, past `timeout`, failed."""
        if self.manager.is_running():
            self.manager.stop(block=True, timeout=timeout)
        self._set_impl(self._prefix_impl)
        self._hook.remove()


class QueueFull(RuntimeError):
    pass
