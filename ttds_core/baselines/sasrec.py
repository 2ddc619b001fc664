"""SASRec (Kang & McAuley, 2018): a causal self-attention encoder, next-item CE loss.

Configured like RecBole's SASRec with `loss_type: CE` (the SPEC's reference run): item
and learned position embeddings, LayerNorm + dropout, post-LN blocks, scores = dot
product of the last hidden state with the (tied) item embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import CausalNextItem, causal_mask, init_weights, transformer_stack


class SASRec(CausalNextItem):
    def __init__(self, n_items: int, max_history: int, hidden: int, layers: int, heads: int,
                 dropout: float):
        super().__init__()
        self.n_items = n_items
        self.item_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(max_history, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.encoder = transformer_stack(hidden, layers, heads, dropout)
        init_weights(self)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        # right padding + causal mask: a real position never sees padding, no key mask needed
        positions = torch.arange(items.size(1), device=items.device)
        h = self.dropout(self.norm(self.item_embedding(items) + self.position_embedding(positions)))
        mask = causal_mask(items.size(1), items.device)
        return self.encoder(h, mask=mask, is_causal=True)


def build(n_items: int, max_history: int, cfg: dict) -> SASRec:
    return SASRec(n_items, max_history, cfg["hidden"], cfg["layers"], cfg["heads"], cfg["dropout"])
