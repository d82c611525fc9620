"""The public paths of the Hugging Face integration: every name they offered when the code lived in
them still imports from there (it now lives in prefix_attn.integrations.hf), and importing them
registers nothing with transformers (add_prefix_tuning does, and only while a model uses it:
test_hf_model.py)."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

# The module-level names each path offered (its own definitions), beyond its __all__.
TRANSFORMERS_NAMES = (
    "ATTN_IMPLEMENTATION", "PREFIX_KWARG", "KV_SINK_KWARG", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_NAME",
    "FORMAT_VERSION", "HEAD_PREFIX", "ENCODER_DECODER_SITES", "NO_PREFIX", "ENCODER_DECODER_MODEL_TYPES",
    "TASK_HEADS", "prefix_attention_forward", "prefix_slot", "prefix_attention_mask", "get_prefix_encoder",
    "prefix_disabled", "add_prefix_tuning", "remove_prefix_tuning", "save_prefix", "load_prefix",
    "read_peft_adapter", "load_peft_prefix", "save_peft_prefix", "init_prefix_from_text", "PrefixEncoder")
PROMPT_TUNING_NAMES = (
    "KV_SINK_KWARG", "SoftPrompt", "add_prompt_tuning", "get_soft_prompt", "remove_prompt_tuning",
    "prompt_prefix_table", "export_prompt_as_prefix", "load_peft_prompt", "save_peft_prompt",
    "add_prefix_tuning", "prefix_disabled", "remove_prefix_tuning")


@pytest.mark.parametrize("path, names", [("prefix_attn.integrations.transformers", TRANSFORMERS_NAMES),
                                         ("prefix_attn.integrations.prompt_tuning", PROMPT_TUNING_NAMES)],
                         ids=["transformers", "prompt_tuning"])
def test_every_public_name_still_imports(path, names):
    module = importlib.import_module(path)
    missing = [name for name in (*names, *module.__all__) if not hasattr(module, name)]
    assert not missing, f"{path} lost {missing}"
    for name in names:  # one object, wherever it is imported from: no copies that could drift
        value = getattr(module, name)
        home = getattr(value, "__module__", None)
        if callable(value) and home and home.startswith("prefix_attn.integrations.hf."):
            assert getattr(importlib.import_module(home), name) is value


def test_import_registers_nothing():
    code = ("from transformers import AttentionInterface\n"
            "from transformers.masking_utils import AttentionMaskInterface\n"
            "import prefix_attn.integrations.transformers, prefix_attn.integrations.prompt_tuning\n"
            "from prefix_attn.integrations.transformers import ATTN_IMPLEMENTATION as name\n"
            "assert name not in AttentionInterface._global_mapping, 'attention registered on import'\n"
            "assert name not in AttentionMaskInterface._global_mapping, 'mask registered on import'\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")

