"""RoBERTa and its kin: positions that count real tokens only, past the padding."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def padding_aware_positions(module: nn.Module, input_ids: Optional[Tensor], past: int, length: int,
                            device: torch.device) -> Optional[Tensor]:
    """Positions by the model's own rule where it numbers real tokens past the padding (RoBERTa
    and its kin: padding_idx + 1 + the token's rank among the row's real tokens), shifted by
    `past` tokens, as that rule does for a cache; None for models that count 0, 1, ..."""
    embeddings = getattr(module, "embeddings", None)
    rule = getattr(embeddings, "create_position_ids_from_input_ids", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if rule is None or padding_idx is None:
        return None
    if input_ids is None:  # inputs_embeds: the rule counts every token as real
        return torch.arange(past, past + length, device=device).unsqueeze(0) + padding_idx + 1
    return rule(input_ids, padding_idx, past)
