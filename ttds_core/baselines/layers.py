"""Pieces shared by the neural baselines: weight init, a Transformer stack, the CE loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT-style init (normal(0, 0.02), LayerNorm 1/0), as RecBole's SASRec/BERT4Rec."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def transformer_stack(hidden: int, layers: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    """Post-LN Transformer blocks with a 4x GELU feed-forward (SASRec/BERT4Rec defaults)."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    block = nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=4 * hidden, dropout=dropout,
                                       activation="gelu", batch_first=True, norm_first=False)
    # nested tensors change numerics between train and eval and are CPU-unfriendly here
    return nn.TransformerEncoder(block, layers, enable_nested_tensor=False)


def causal_mask(length: int, device) -> torch.Tensor:
    return torch.triu(torch.full((length, length), float("-inf"), device=device), diagonal=1)


def item_logits(hidden: torch.Tensor, item_embedding: nn.Embedding, n_items: int) -> torch.Tensor:
    """Scores of the real items (shifted ids 1..n_items) by dot product with their embeddings."""
    return hidden @ item_embedding.weight[1:n_items + 1].T


def next_item_loss(hidden: torch.Tensor, targets: torch.Tensor, item_embedding: nn.Embedding,
                   n_items: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the FULL item set at the positions whose target is not padding.

    Only those positions are projected onto the catalogue: padding rows would cost a
    [positions x items] matmul for nothing.
    """
    keep = targets > 0
    logits = item_logits(hidden[keep], item_embedding, n_items)
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, targets[keep] - 1)


class CausalNextItem(nn.Module):
    """Shared head of the left-to-right models (SASRec, GRU4Rec): a subclass defines
    `encode(items) -> hidden [B, L, H]` and `item_embedding`; training predicts every next
    item of a window, scoring reads the state at each history's last real position."""

    n_items: int
    item_embedding: nn.Embedding

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(windows[:, :-1])
        return next_item_loss(hidden, windows[:, 1:], self.item_embedding, self.n_items)

    def scores(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.encode(inputs)
        last = hidden[torch.arange(len(inputs), device=inputs.device), lengths - 1]
        return item_logits(last, self.item_embedding, self.n_items)
