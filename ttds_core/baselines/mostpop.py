"""MostPop: every user gets the items ranked by their number of training interactions.

Popularity counts only `items[:-2]` of every user (no validation or test target). Ties
between equally popular items are broken by item id (lower id first) through a
fractional offset, so the ranking is a strict total order and the "strictly higher"
rank rule cannot favour a target that merely ties with many items.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class MostPop(nn.Module):
    def __init__(self, n_items: int):
        super().__init__()
        self.n_items = n_items
        self.register_buffer("popularity", torch.zeros(n_items, dtype=torch.float64))

    def fit(self, train_sequences: list[np.ndarray]) -> None:
        counts = np.bincount(np.concatenate(train_sequences), minlength=self.n_items).astype(np.float64)
        tie_break = -np.arange(self.n_items, dtype=np.float64) / (self.n_items + 1)  # in (-1, 0]
        self.popularity.copy_(torch.from_numpy(counts + tie_break))

    def scores(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.popularity.unsqueeze(0).expand(len(inputs), -1)


def build(n_items: int, max_history: int, cfg: dict) -> MostPop:
    return MostPop(n_items)
