"""BERT4Rec (Sun et al., 2019): a bidirectional Transformer trained by cloze masking.

Training masks each real item of a window with probability `mask_prob` (at least one
per window: the last item when the draw masked none, which also teaches the model the
inference case). Inference appends the [mask] token after the history and ranks the
items by the output at that position.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import init_weights, item_logits, next_item_loss, transformer_stack


class BERT4Rec(nn.Module):
    def __init__(self, n_items: int, max_history: int, hidden: int, layers: int, heads: int,
                 dropout: float, mask_prob: float):
        super().__init__()
        self.n_items = n_items
        self.mask_id = n_items + 1
        self.mask_prob = mask_prob
        self.item_embedding = nn.Embedding(n_items + 2, hidden, padding_idx=0)
        # history + the appended [mask]
        self.position_embedding = nn.Embedding(max_history + 1, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.encoder = transformer_stack(hidden, layers, heads, dropout)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.output_bias = nn.Parameter(torch.zeros(n_items))
        init_weights(self)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(items.size(1), device=items.device)
        h = self.dropout(self.norm(self.item_embedding(items) + self.position_embedding(positions)))
        return self.head(self.encoder(h, src_key_padding_mask=items == 0))

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        real = windows > 0
        masked = (torch.rand(windows.shape, device=windows.device) < self.mask_prob) & real
        lengths = real.sum(1)
        rows = torch.arange(len(windows), device=windows.device)
        none = ~masked.any(1)
        masked[rows[none], lengths[none] - 1] = True
        targets = torch.where(masked, windows, torch.zeros_like(windows))
        inputs = windows.masked_fill(masked, self.mask_id)
        return next_item_loss(self.encode(inputs), targets, self.item_embedding, self.n_items,
                              bias=self.output_bias)

    def scores(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(len(inputs), device=inputs.device)
        items = torch.cat([inputs, torch.zeros_like(inputs[:, :1])], dim=1)
        items[rows, lengths] = self.mask_id
        hidden = self.encode(items)[rows, lengths]
        return item_logits(hidden, self.item_embedding, self.n_items) + self.output_bias


def build(n_items: int, max_history: int, cfg: dict) -> BERT4Rec:
    return BERT4Rec(n_items, max_history, cfg["hidden"], cfg["layers"], cfg["heads"], cfg["dropout"],
                    cfg["mask_prob"])
