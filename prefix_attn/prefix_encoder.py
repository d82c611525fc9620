"""PrefixEncoder: the trainable prefix of prefix tuning, one (prefix_k, prefix_v) pair per layer.

    encoder = PrefixEncoder(num_layers=30, num_kv_heads=3, head_dim=64, num_virtual_tokens=64)
    layers = encoder()                       # tuple of num_layers pairs (prefix_k, prefix_v)
    prefix_k, prefix_v = layers[i]           # [Hkv, P, D] each, ready for prefix_attention
    out = prefix_attention(q, k, v, prefix_k, prefix_v, causal=True)

With num_tasks = T > 1 every pair is a bank [T, Hkv, P, D]; pass prefix_index (one task id
per row) to prefix_attention. Nothing here ever expands over the batch: the kernels read the
shared prefix in place and reduce its gradient over the rows themselves.

Two parametrizations, as in prefix tuning (Li & Liang 2021) and PEFT:

- a plain table (default): the prefix keys and values are the parameters;
- prefix_projection=True: an Embedding [T * P, Hkv * D] -> Linear -> Tanh -> Linear MLP
  produces the table. The MLP runs once per forward call on the T * P virtual tokens, never
  once per sample. `merge()` folds it into a plain table for inference.

Only torch is needed here; the Hugging Face glue lives in prefix_attn.integrations.transformers
(the package prefix_attn.integrations.hf), where a PrefixEncoder is the PrefixSource of a
prefix-tuned model.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["PrefixEncoder"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"PrefixEncoder: {name} must be a positive int, got {value!r}")
    return value


class PrefixEncoder(nn.Module):
    """Per-layer prefix keys and values for prefix tuning.

    Args:
        num_layers: attention layers that get a prefix (L).
        num_kv_heads: key/value heads per layer (Hkv; the KV heads, not the query heads, for GQA).
        head_dim: head dimension (D).
        num_virtual_tokens: prefix length (P).
        prefix_projection: reparametrize the table through Embedding -> Linear -> Tanh -> Linear.
        encoder_hidden_size: hidden width of that MLP; defaults to Hkv * D (as PEFT does).
        num_tasks: T; with T > 1 the encoder yields banks [T, Hkv, P, D], one prefix per task.
        dropout: dropout on the prefix keys and values while training.

    Calling the module returns a tuple of L pairs (prefix_k, prefix_v), each [Hkv, P, D]
    (num_tasks == 1) or [T, Hkv, P, D] (a bank). The pairs are views of one tensor
    [L, 2, T, Hkv, P, D]; the table parametrization stores exactly that tensor as `weight`.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_virtual_tokens: int, *,
                 prefix_projection: bool = False, encoder_hidden_size: Optional[int] = None,
                 num_tasks: int = 1, dropout: float = 0.0,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.num_virtual_tokens = _positive_int(num_virtual_tokens, "num_virtual_tokens")
        self.num_tasks = _positive_int(num_tasks, "num_tasks")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"PrefixEncoder: dropout must lie in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.prefix_projection = bool(prefix_projection)
        token_dim = self.num_kv_heads * self.head_dim
        if encoder_hidden_size is None:
            encoder_hidden_size = token_dim
        self.encoder_hidden_size = _positive_int(encoder_hidden_size, "encoder_hidden_size")

        factory = {"device": device, "dtype": dtype}
        if self.prefix_projection:
            self.embedding = nn.Embedding(self.num_tasks * self.num_virtual_tokens, token_dim, **factory)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, self.encoder_hidden_size, **factory),
                nn.Tanh(),
                nn.Linear(self.encoder_hidden_size, self.num_layers * 2 * token_dim, **factory),
            )
        else:
            self.weight = nn.Parameter(torch.empty(self.table_shape, **factory))
            # N(0, 1), as PEFT's nn.Embedding table starts: adapters trained either way are alike.
            nn.init.normal_(self.weight)

    @property
    def table_shape(self) -> Tuple[int, int, int, int, int, int]:
        """[L, 2, T, Hkv, P, D]: layer, key (0) / value (1), task, KV head, virtual token, dim."""
        return (self.num_layers, 2, self.num_tasks, self.num_kv_heads, self.num_virtual_tokens, self.head_dim)

    def config(self) -> dict:
        """The constructor arguments (JSON-able), enough to rebuild an encoder of this shape."""
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "num_virtual_tokens": self.num_virtual_tokens, "prefix_projection": self.prefix_projection,
                "encoder_hidden_size": self.encoder_hidden_size, "num_tasks": self.num_tasks,
                "dropout": self.dropout}

    def table(self) -> Tensor:
        """All prefixes as one tensor [L, 2, T, Hkv, P, D] (differentiable; dropout not applied).

        With prefix_projection the MLP runs here, once, over the T * P virtual tokens.
        """
        if not self.prefix_projection:
            return self.weight
        L, _, T, H, P, D = self.table_shape
        flat = self.transform(self.embedding.weight)  # [T * P, L * 2 * H * D]
        # PEFT's layout of a virtual token's vector is [L, 2, Hkv, D]; ours puts tokens next to D so
        # each layer's [T, Hkv, P, D] slice is contiguous for the kernels (one small copy per step).
        return flat.view(T, P, L, 2, H, D).permute(2, 3, 0, 4, 1, 5).contiguous()

    def forward(self) -> Tuple[Tuple[Tensor, Tensor], ...]:
        table = self.table()
        if self.dropout > 0.0 and self.training:
            table = nn.functional.dropout(table, p=self.dropout, training=True)
        if self.num_tasks == 1:
            table = table.squeeze(2)  # [L, 2, Hkv, P, D]: one prefix shared by every row
        # unbind, not indexing: its backward stacks the per-layer gradients into one tensor
        # instead of scattering each into a zero-filled copy of the whole table.
        return tuple(tuple(kv.unbind(0)) for kv in table.unbind(0))

    @torch.no_grad()
    def merge(self) -> "PrefixEncoder":
        """Fold the MLP into a plain table (same outputs, no MLP work per step). Returns self.

        The table stays trainable. A no-op without prefix_projection.
        """
        if not self.prefix_projection:
            return self
        table = self.table().detach().clone()
        del self.embedding
        del self.transform
        self.prefix_projection = False
        self.weight = nn.Parameter(table)
        return self

    @torch.no_grad()
    def load_table(self, table: Tensor, task: Optional[int] = None) -> None:
        """Copy prefixes into a plain-table encoder.

        table: [L, 2, T, Hkv, P, D] (all tasks), or [L, 2, Hkv, P, D] with `task` set (one entry
        of the bank; task=None is allowed when num_tasks == 1).
        """
        if self.prefix_projection:
            raise ValueError("PrefixEncoder.load_table: this encoder uses prefix_projection; a table can only be "
                             "loaded into a plain-table encoder (call merge() first)")
        if task is None and table.dim() == 5 and self.num_tasks == 1:
            task = 0
        if task is None:
            target = self.weight
        else:
            if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
                raise ValueError(f"PrefixEncoder.load_table: task must be an int in [0, {self.num_tasks}), got {task!r}")
            target = self.weight[:, :, task]
        if tuple(table.shape) != tuple(target.shape):
            raise ValueError(f"PrefixEncoder.load_table: expected a table of shape {list(target.shape)}, "
                             f"got {list(table.shape)}")
        target.copy_(table)

    def extra_repr(self) -> str:
        return (f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"num_virtual_tokens={self.num_virtual_tokens}, num_tasks={self.num_tasks}, "
                f"prefix_projection={self.prefix_projection}"
                + (f", encoder_hidden_size={self.encoder_hidden_size}" if self.prefix_projection else "")
                + (f", dropout={self.dropout}" if self.dropout else ""))
