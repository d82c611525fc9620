"""The task head of classification and question-answering models, trained with the prefix
(P-Tuning v2) unless add_prefix_tuning's train_head=False."""
from __future__ import annotations

from typing import Dict, Tuple

from torch import nn


#: The model classes whose task head trains with the prefix by default (P-Tuning v2), by how their
#: class name ends, and the submodules one of which is their output layer: the modules_to_save of
#: PEFT's SEQ_CLS, TOKEN_CLS and QUESTION_ANS task types.
TASK_HEADS = {"ForSequenceClassification": ("classifier", "score"),
              "ForTokenClassification": ("classifier", "score"),
              "ForQuestionAnswering": ("qa_outputs",)}


def task_head(model: nn.Module) -> Tuple[str, ...]:
    """The submodules of model that make its task head (everything outside the pretrained base
    model: e.g. BERT's `classifier`, RoBERTa's `classifier` (dense + out_proj), Llama's `score`,
    `qa_outputs`); () for a model with no task head (language models: their lm_head is part of
    the pretrained model). NotImplementedError for a task model whose head is not recognised."""
    kind = next((kind for kind in TASK_HEADS if type(model).__name__.endswith(kind)), None)
    if kind is None:
        return ()
    base = getattr(model, "base_model", model)
    modules = tuple(name for name, child in model.named_children()
                    if child is not base and name != "prefix_encoder" and next(child.parameters(), None) is not None)
    if base is model or not any(name in TASK_HEADS[kind] for name in modules):
        raise NotImplementedError(
            f"prefix_attn: cannot find the task head of {type(model).__name__}: expected one of "
            f"{TASK_HEADS[kind]} beside its base model, found {list(modules)}; pass train_head=False to "
            "train the prefix alone")
    return modules


def head_parameters(model: nn.Module, modules: Tuple[str, ...]) -> Dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.split(".", 1)[0] in modules}
