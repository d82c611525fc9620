"""Quantized bases: marked as carrying trainable adapters, so that the HF Trainer trains them, with
the mark hidden from everything else."""
from __future__ import annotations

import functools
import types

from torch import nn

from ._state import PrefixTuning, get_tuning


#: transformers' marker of a model with trainable adapters attached (its PEFT integration sets it
#: in add_adapter / load_adapter). The Trainer refuses to train a quantized model without it
#: (trainer_utils.validate_quantization_for_training). A prefix-tuned model is such a model: its
#: frozen base never changes. add_prefix_tuning sets it on quantized bases only.
ADAPTER_MARKER = "_hf_peft_config_loaded"
#: The PreTrainedModel methods that read the marker as "PEFT adapters are in model.peft_config"
#: (transformers 5.24): saving only the adapters, the adapter API, and enabling input grads for
#: checkpointing. While the model has no PEFT adapters, they run with the marker hidden, as on
#: the model without prefix tuning. tests/integrations/test_hf_quantized.py checks the list
#: against transformers' source.
MARKER_READERS = ("save_pretrained", "_activation_checkpointing_enable", "_activation_checkpointing_disable",
                  "load_adapter", "add_adapter", "set_adapter", "disable_adapters", "enable_adapters",
                  "active_adapters", "get_adapter_state_dict", "delete_adapter")


def _marker_hidden_call(name: str, self: nn.Module, *args, **kwargs):
    """model.<name>(...) as on the model without the marker, unless PEFT adapters were added."""
    hide = not getattr(self, "peft_config", None)
    if hide:
        self.__dict__.pop(ADAPTER_MARKER, None)  # the class default, False, shows
    try:
        return getattr(type(self), name)(self, *args, **kwargs)
    finally:
        state = get_tuning(self)
        if state is not None and state.marked:
            self.__dict__[ADAPTER_MARKER] = True


def mark_adapter_trained(model: nn.Module, state: PrefixTuning) -> None:
    if not getattr(model, "is_quantized", False) or getattr(model, ADAPTER_MARKER, False):
        return  # not quantized (the Trainer asks nothing), or PEFT adapters marked it already
    model.__dict__[ADAPTER_MARKER] = True
    state.marked = True
    for name in MARKER_READERS:
        if callable(getattr(type(model), name, None)) and name not in model.__dict__:
            # Bound methods (not closures), so that copy.deepcopy(model) rebinds them to the copy.
            model.__dict__[name] = types.MethodType(functools.partial(_marker_hidden_call, name), model)


def unmark_adapter_trained(model: nn.Module, state: PrefixTuning) -> None:
    if not state.marked:
        return
    for name in MARKER_READERS:
        wrapper = model.__dict__.get(name)
        if isinstance(wrapper, types.MethodType) and isinstance(wrapper.__func__, functools.partial) \
                and wrapper.__func__.func is _marker_hidden_call:
            del model.__dict__[name]
    if not getattr(model, "peft_config", None):  # else PEFT adapters added since: the marker is theirs too
        model.__dict__.pop(ADAPTER_MARKER, None)
    state.marked = False
