"""GRU4Rec (Hidasi et al., 2016) in its sequential-recommendation form (as in RecBole):
embedding dropout, a GRU over the history, a dense layer back to the embedding size, and
full-softmax CE against the tied item embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import CausalNextItem


class GRU4Rec(CausalNextItem):
    def __init__(self, n_items: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.n_items = n_items
        self.item_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, bias=False)
        self.dense = nn.Linear(hidden, hidden)
        nn.init.xavier_normal_(self.item_embedding.weight)
        for name, weight in self.gru.named_parameters():
            nn.init.xavier_uniform_(weight) if "weight_ih" in name else nn.init.orthogonal_(weight)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        # right padding: outputs at real positions never depend on the padding after them
        out, _ = self.gru(self.dropout(self.item_embedding(items)))
        return self.dense(out)


def build(n_items: int, max_history: int, cfg: dict) -> GRU4Rec:
    return GRU4Rec(n_items, cfg["hidden"], cfg["layers"], cfg["dropout"])
