"""Helpers for the Hugging Face integration tests: tiny models, PEFT twins, an oracle, tolerances.

Tolerance rule (FlashAttention's, as in tests/conftest.py): an output of ours in float32 is
compared with an oracle run in float64, and must satisfy

    err(ours, fp32) <= 2 * err(reference implementation, fp32) + floor

where err is the largest absolute difference to the float64 oracle over the positions that
matter (padding queries excluded), and floor = 8 float32 ulps of the largest oracle logit
(for the case where the reference happens to round almost exactly). The reference is PEFT
itself, or the test oracle below, run in float32: whatever rounding a correct float32
implementation accumulates over the model's layers, ours may show twice that, and no more.
A real bug (a lost padding mask, a shifted position, a missing prefix) moves logits by 1e-2
or more even in the tiny models; fp32 rounding moves them by 1e-6 there and ~5e-3 in the
30-layer SmolLM2 with a random N(0, 1) prefix.
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
import subprocess
import sys
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from peft_compat import fix_peft_generate  # noqa: E402,F401  (examples/peft_compat.py; re-exported)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from prefix_attn.integrations import transformers as hf  # noqa: E402
from prefix_attn.integrations.hf import _state as hf_state, attention as hf_attention, t5 as hf_t5  # noqa: E402
from prefix_attn import _dropout  # noqa: E402

transformers.logging.set_verbosity_error()

VOCAB = 128
FP32_ULP = torch.finfo(torch.float32).eps


# --------------------------------------------------------------------------- tiny models

class Rows(torch.utils.data.Dataset):
    """A list of examples as a torch Dataset, for the HF Trainer."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def tiny_config(family: str, **overrides):
    """Tiny random configs: GQA (4 query heads, 2 KV heads) with head_dim 24 != hidden 64 / 4."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, pad_token_id=0,
                  max_position_embeddings=256)
    if family == "llama":
        config = transformers.LlamaConfig(**{**common, **overrides})
    elif family == "qwen2":
        # layer 0 full attention, layers 1-2 sliding window (wide enough here to be a no-op,
        # unless a test narrows it)
        config = transformers.Qwen2Config(**{**common, "use_sliding_window": True, "sliding_window": 64,
                                            "max_window_layers": 1, **overrides})
    elif family == "mistral":
        config = transformers.MistralConfig(**{**common, "sliding_window": 64, **overrides})
    elif family == "qwen3":  # q/k RMSNorm per head, inside the attention, before RoPE
        config = transformers.Qwen3Config(**{**common, **overrides})
    elif family == "gpt2":
        # MHA with a fused QKV projection (Conv1D c_attn), learned absolute positions, and GPT-2's
        # default dropouts (attention, residual, embedding: 0.1 each) left as they are.
        config = transformers.GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                                                   pad_token_id=0), **overrides})
    elif family.split("-")[0] in ("bert", "roberta"):
        # Bidirectional encoders with their default dropouts (0.1). RoBERTa pads with id 1 and numbers
        # real tokens from padding_idx + 1, hence two more positions.
        roberta = family.startswith("roberta")
        cls = transformers.RobertaConfig if roberta else transformers.BertConfig
        config = cls(**{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=66 if roberta else 64,
                               pad_token_id=1 if roberta else 0, num_labels=3), **overrides})
    elif family == "t5":
        # T5's relative position bias, with few buckets and a short max distance so that prefix keys
        # 5-20 places back fall into different buckets; 3 + 3 layers, 4 heads of dim 16, T5's default
        # dropout (0.1, attention included).
        config = transformers.T5Config(**{**dict(
            vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=3, num_heads=4, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0, relative_attention_num_buckets=8,
            relative_attention_max_distance=16), **overrides})
    elif family == "bart":
        # An encoder-decoder: 3 + 3 layers (an odd count, so that PEFT's order of its table's layers,
        # 2 l mod L, is a permutation the tests can tell from l), 4 heads of dim 16, BART's default
        # dropouts (0.1 residual, attention 0), decoding from token 2 with nothing forced.
        config = transformers.BartConfig(**{**dict(
            vocab_size=VOCAB, d_model=64, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
            forced_eos_token_id=None), **overrides})
    else:
        raise ValueError(family)
    return config


MODEL_CLASSES = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gpt2": "GPT2LMHeadModel", "bart": "BartForConditionalGeneration",
    "t5": "T5ForConditionalGeneration",
    "bert-seq": "BertForSequenceClassification", "bert-token": "BertForTokenClassification",
    "roberta-seq": "RobertaForSequenceClassification", "roberta-token": "RobertaForTokenClassification",
}


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    return getattr(transformers, MODEL_CLASSES[family])(config).eval()


def encoder_batch(model, batch: int = 3, length: int = 10, seed: int = 1, side: str = "right"):
    """Ids and mask for an encoder: row 0 full, the others padded (on `side`) with 1, 3, ... pad
    tokens of the model's pad id; real tokens never use the pad id."""
    g = torch.Generator().manual_seed(seed)
    pad = model.config.pad_token_id
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        n = min(2 * b - 1, length - 2)
        if side == "right":
            mask[b, length - n:] = 0
        else:
            mask[b, :n] = 0
    ids[mask == 0] = pad
    return ids, mask


def padded_batch(batch: int = 3, length: int = 11, seed: int = 1, pad_id: int = 0):
    """Left-padded ids and mask: row 0 full, the others with 1, 3, ... pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : min(2 * b - 1, length - 2)] = 0
    ids[mask == 0] = pad_id
    return ids, mask


def random_prefix(model, seed: int = 3, std: float = 1.0):
    """model, its prefix encoder's parameters drawn N(0, std^2) (a prefix that visibly matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.get_prefix_encoder(model).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# --------------------------------------------------------------------------- PEFT

def peft_twin(base, num_virtual_tokens: int, path: str, seed: int = 5, std: float = 1.0, **config):
    """A PEFT prefix-tuning model on `base` with a random prefix, saved to `path` as an adapter."""
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(base, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                         num_virtual_tokens=num_virtual_tokens, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.prompt_encoder["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.eval()
    peft_model.save_pretrained(path)
    return peft_model


@torch.no_grad()
def peft_greedy(peft_model, input_ids, attention_mask, max_new_tokens: int):
    """Greedy decoding by repeated full forward passes of a PEFT model: the oracle for generation
    (PEFT 0.21's own generate() drops the prefix under transformers 5; see examples/peft_compat.py).
    Positions as transformers' generate numbers them: the rank of each real token in its row."""
    ids, mask = input_ids, attention_mask
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return ids


def peft_float64(base, path: str):
    """The PEFT adapter at `path` on a float64 copy of `base`: the oracle for float32 runs."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base).double(), path).double().eval()



# --------------------------------------------------------------------------- tolerance

def max_err(a: torch.Tensor, b: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    diff = (a.detach().double() - b.detach().double()).abs()
    if valid is not None:
        diff = diff[valid.bool()]
    return diff.max().item() if diff.numel() else 0.0


def assert_fp32_close(name: str, ours: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor,
                      valid: Optional[torch.Tensor] = None, refs32=()) -> Dict[str, float]:
    """err(ours) <= 2 * err(ref32) + floor, both against ref64 (see the module docstring).
    refs32: more float32 references (e.g. PEFT on eager attention); the largest error counts."""
    err_ours = max_err(ours, ref64, valid)
    err_ref = max([max_err(r, ref64, valid) for r in (ref32, *refs32)])
    scale = max_err(ref64, torch.zeros_like(ref64), valid)
    bound = 2 * err_ref + 8 * FP32_ULP * max(scale, 1.0)
    assert err_ours <= bound, (f"{name}: max error {err_ours:.3g} vs the float64 oracle exceeds 2 x the float32 "
                               f"reference's {err_ref:.3g} + floor (bound {bound:.3g}; logit scale {scale:.3g})")
    return {"ours": err_ours, "ref": err_ref, "bound": bound}


# --------------------------------------------------------------------------- spying on the kernel calls

#: The integration's modules that call prefix_attention (T5's prefix bias path makes two calls of its
#: own): a spy must replace it in each.
PREFIX_ATTENTION_CALLERS = (hf_attention, hf_t5)
#: prefix_attention as the integration calls it, for a spy to pass its calls on to.
prefix_attention = hf_attention.prefix_attention


@contextlib.contextmanager
def prefix_attention_replaced(replacement):
    """Within the block, every prefix_attention call of the integration goes to replacement."""
    saved = [module.prefix_attention for module in PREFIX_ATTENTION_CALLERS]
    for module in PREFIX_ATTENTION_CALLERS:
        module.prefix_attention = replacement
    try:
        yield
    finally:
        for module, original in zip(PREFIX_ATTENTION_CALLERS, saved):
            module.prefix_attention = original


# --------------------------------------------------------------------------- the oracle

ORACLE = "prefix_attn_test_oracle"


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """[prefix ; key] concatenated explicitly, GQA by repetition, softmax in float64, and the
    mask transformers' own sdpa_mask built for the sequence (the prefix column block: all True).
    Attention dropout applies prefix_attn/_dropout.py's mask for a stream drawn as
    prefix_attention draws it, so under the same torch.manual_seed both drop the same entries."""
    ORACLE_CALLS[0] += 1
    layers = kwargs[hf.PREFIX_KWARG]
    B, Hq, Nq, D = query.shape
    Hkv = key.shape[1]
    slot = hf.prefix_slot(module) if len(layers) else hf.NO_PREFIX  # layer_idx, or an encoder-decoder's slot
    if slot != hf.NO_PREFIX:
        prefix_k, prefix_v = layers[slot]
        index = kwargs.get("prefix_index")
        if index is not None:
            prefix_k, prefix_v = prefix_k[index], prefix_v[index]
        else:
            prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
    else:
        prefix_k = prefix_v = key.new_zeros(B, Hkv, 0, D)
    P = prefix_k.shape[2]
    keys = torch.cat([prefix_k.to(key.dtype), key], 2).repeat_interleave(Hq // Hkv, 1).double()
    values = torch.cat([prefix_v.to(value.dtype), value], 2).repeat_interleave(Hq // Hkv, 1).double()
    scale = scaling if scaling is not None else D ** -0.5
    scores = (query.double() @ keys.transpose(-1, -2)) * scale
    if kwargs.get("position_bias") is not None:  # T5: a relative position bias over [prefix ; sequence]
        scores = scores + _oracle_position_bias(module, kwargs["position_bias"], Nq, key.shape[2], P).double()
    if attention_mask is None:  # transformers skips the mask of unpadded bidirectional attention
        assert not module.is_causal
        attention_mask = torch.ones(B, 1, Nq, key.shape[2], dtype=torch.bool)
    assert attention_mask.dtype == torch.bool
    visible = torch.cat([torch.ones(B, 1, Nq, P, dtype=torch.bool), attention_mask[..., : key.shape[2]]
                         .expand(B, 1, Nq, -1)], -1)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    if dropout:  # the stream prefix_attention draws, in the same order from the same generator
        seed, offset = _dropout.next_stream(query.device)
        probs = _dropout.apply_reference(probs, seed, offset, dropout, P)
    out = (probs @ values).to(query.dtype)
    return out.transpose(1, 2), None


def _oracle_position_bias(module, position_bias, Nq, Nk, P):
    """T5's own compute_bias over P + Nk keys, the prefix taking the first P positions as past tokens
    (what PEFT's prefix in the cache gets); its sequence part must be the bias the model passed.
    Cross-attention (no bias owner) has no bias, so its prefix keys get 0."""
    owner = module.__dict__.get(hf_state.BIAS_ATTR)
    if owner is None or P == 0:
        return torch.cat([position_bias.new_zeros(*position_bias.shape[:-1], P), position_bias], -1)
    bias = owner.compute_bias(Nq, P + Nk, device=position_bias.device, past_seen_tokens=P + Nk - Nq)
    torch.testing.assert_close(bias[..., P:].to(position_bias.dtype), position_bias, rtol=0, atol=0)
    return bias.to(position_bias.dtype)


def _oracle_mask(*args, **kwargs):
    kwargs["allow_is_causal_skip"] = False
    kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ORACLE, _oracle_attention)
AttentionMaskInterface.register(ORACLE, _oracle_mask)


def oracle_copy(model):
    """A deep copy of a prefix-tuned model whose attention is the oracle (same hook, same prefix,
    same positions; only the attention math and masks differ). Every config in the model is
    switched: T5's stacks hold copies of the model's config, not the config itself."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ORACLE
    return twin


#: How many attention calls the oracle has served: tests check that it did run.
ORACLE_CALLS = [0]


# --------------------------------------------------------------------------- several processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: str, out_dir: str, world: int = 2, timeout: float = 600) -> List[str]:
    """Run `python worker out_dir` as `world` ranks (RANK, WORLD_SIZE, MASTER_ADDR/PORT set, one
    thread each) and return their outputs; a rank that fails raises with its output's tail.
    The ranks import prefix_attn from this checkout (PYTHONPATH), not from wherever the installed
    package points. timeout is generous: the machine may be busy."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=path)
    procs = [subprocess.Popen([sys.executable, worker, str(out_dir)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"{os.path.basename(worker)} rank {r} failed:\n{out[-3000:]}"
    return outputs
