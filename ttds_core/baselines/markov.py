"""Markov: a first-order Markov chain over items, the classic reference of sequential
recommendation (the MC part of FPMC). Each user gets the items ranked by how often they
followed the user's last item in the training sequences.

Transitions are counted over `items[:-2]` of every user only, so no validation or test
target (and no transition into one) is ever counted; at test time the last item is the
validation item, whose own outgoing transitions come from other users' training data.
Items the last item never led to, and ties, are ranked by popularity, then by id (MostPop's
order), so the ranking is a strict total order. The counts are kept sparse (one row per
item), so full Games fits in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Markov(nn.Module):
    def __init__(self, n_items: int):
        super().__init__()
        self.n_items = n_items
        self.indptr = np.zeros(n_items + 1, dtype=np.int64)  # CSR rows: item -> its next items
        self.next_items = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.float64)
        self.register_buffer("prior", torch.zeros(n_items, dtype=torch.float64))

    def fit(self, train_sequences: list[np.ndarray]) -> None:
        pairs = [np.stack([s[:-1], s[1:]], 1) for s in train_sequences if len(s) >= 2]
        pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
        keys, counts = np.unique(pairs[:, 0] * self.n_items + pairs[:, 1], return_counts=True)
        rows = keys // self.n_items
        self.next_items = keys % self.n_items
        self.counts = counts.astype(np.float64)
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=self.n_items))])
        # MostPop's order scaled into (0, 1): it only ever breaks ties between equal counts
        popularity = np.bincount(np.concatenate(train_sequences), minlength=self.n_items).astype(np.float64)
        tie_break = -np.arange(self.n_items, dtype=np.float64) / (self.n_items + 1)  # in (-1, 0]
        self.prior.copy_(torch.from_numpy((popularity + tie_break + 1.0) / (popularity.max() + 2.0)))

    def scores(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # inputs are item ids + 1, right-padded with 0; the last real one is the newest item
        last = (inputs.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1) - 1).cpu().numpy()
        scores = self.prior.cpu().unsqueeze(0).repeat(len(inputs), 1).numpy()
        for row, item in enumerate(last):
            lo, hi = self.indptr[item], self.indptr[item + 1]
            scores[row, self.next_items[lo:hi]] += self.counts[lo:hi]
        return torch.from_numpy(scores).to(inputs.device)


def build(n_items: int, max_history: int, cfg: dict) -> Markov:
    return Markov(n_items)
