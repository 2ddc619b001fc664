"""FMLP-Rec (Zhou et al., WWW 2022): an all-MLP encoder whose token mixing is a learnable
filter in the frequency domain, next-item CE loss.

As in the paper's code: item and learned position embeddings, LayerNorm + dropout, then
blocks of [rfft along the sequence axis (norm='ortho') -> multiply by a learnable complex
weight [1, max_history // 2 + 1, hidden] -> irfft back to max_history -> dropout,
residual, LayerNorm] and a 4x GELU feed-forward (dropout, residual, LayerNorm); scores =
dot product of the last position's state with the (tied) item embeddings.

Leakage. The filter is a circular convolution over the whole sequence, so every output
position sees every input position, later ones included: the per-position training of
`CausalNextItem` (a target at every position of a window) would let position t read its
own target. We therefore predict only from the LAST position of an input, the position
scoring reads, and give each training target its own input: `prefixes` expands every
training window (`data.training_windows`) into the prefixes that end right before each of
its targets. This is also what the authors' code (github.com/Woeee/FMLP-Rec) does: one
left-padded sample per prefix of the training sequence, loss on `seq_out[:, -1]` (there
a one-negative BCE; here full-softmax CE, as for SASRec). Doing the expansion per batch
needs no new data path and keeps the causal models' target set (every training item
after the first, exactly once) and `baselines.batch_size` in windows; no input can
contain its target or anything after it. The price is one encoder pass per target
instead of per window, which an O(L log L) filter and a small MLP afford.

Padding. The filter sees the whole length-`max_history` signal, so alignment matters:
inputs are LEFT-aligned here (the last real item at the last position, as in the paper;
the shared data path pads on the right and `left_align` moves the items), so the scored
position and its position embedding are the same for every user. Padding positions are
zeroed after the embedding and after every block, so the filter mixes a zero-padded
signal of real items only and no padding slot carries a learned vector into the mix (the
paper's code lets padding carry the position embedding; with zeros the prediction depends
on the history items and their positions, nothing else).
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import init_weights, item_logits, next_item_loss


def left_align(items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move the first `lengths[i]` ids of each right-padded row to its end; zeros before.

    Anything after `lengths[i]` in a row is dropped, so it cannot reach the model.
    """
    width = items.size(1)
    source = torch.arange(width, device=items.device) + lengths.unsqueeze(1) - width  # [B, L]
    aligned = items.gather(1, source.clamp(min=0))
    return aligned.masked_fill(source < 0, 0)


def prefixes(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (input, target) pair of right-padded training windows [B, L + 1].

    Target `windows[:, t]` (t >= 1, not padding) gets the input `windows[:, :t]`,
    left-aligned to width L. Returns (inputs [N, L], targets [N]), N = real targets.
    """
    batch, width = windows.shape
    history = width - 1
    ends = torch.arange(1, width, device=windows.device)                   # prefix lengths t
    rows = windows[:, :history].unsqueeze(1).expand(batch, history, history)
    inputs = left_align(rows.reshape(-1, history), ends.repeat(batch))
    targets = windows[:, 1:].reshape(-1)
    keep = targets > 0  # targets in the right padding have no input worth encoding
    return inputs[keep], targets[keep]


class FilterLayer(nn.Module):
    """Learnable global filter: FFT, element-wise complex weight, inverse FFT."""

    def __init__(self, max_history: int, hidden: int, dropout: float):
        super().__init__()
        self.length = max_history
        # complex [1, L // 2 + 1, H] stored as real [..., 2]; randn * 0.02 as in the paper
        self.complex_weight = nn.Parameter(torch.randn(1, max_history // 2 + 1, hidden, 2) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(x, dim=1, norm="ortho")
        filtered = torch.fft.irfft(spectrum * torch.view_as_complex(self.complex_weight),
                                   n=self.length, dim=1, norm="ortho")
        return self.norm(self.dropout(filtered) + x)


class FeedForward(nn.Module):
    """Point-wise hidden -> 4 hidden -> hidden with GELU, dropout, residual, LayerNorm."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dropout(self.mlp(x)) + x)


class FMLPRec(nn.Module):
    def __init__(self, n_items: int, max_history: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        self.n_items = n_items
        self.max_history = max_history
        self.item_embedding = nn.Embedding(n_items + 1, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(max_history, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            nn.Sequential(FilterLayer(max_history, hidden, dropout), FeedForward(hidden, dropout))
            for _ in range(layers))
        init_weights(self)  # Linear / Embedding / LayerNorm only; the filters keep randn * 0.02

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, H] of LEFT-aligned inputs [B, L], L = max_history."""
        if items.size(1) != self.max_history:
            # the filter's weight has one entry per frequency of exactly this length
            raise ValueError(f"FMLP-Rec input length {items.size(1)} != max_history {self.max_history}")
        real = (items > 0).unsqueeze(-1).to(self.item_embedding.weight.dtype)
        positions = torch.arange(items.size(1), device=items.device)
        h = self.dropout(self.norm(self.item_embedding(items) + self.position_embedding(positions)))
        h = h * real
        for block in self.blocks:
            h = block(h) * real
        return h

    def loss(self, windows: torch.Tensor) -> torch.Tensor:
        inputs, targets = prefixes(windows)
        return next_item_loss(self.encode(inputs)[:, -1], targets, self.item_embedding, self.n_items)

    def scores(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        last = self.encode(left_align(inputs, lengths))[:, -1]
        return item_logits(last, self.item_embedding, self.n_items)


def build(n_items: int, max_history: int, cfg: dict) -> FMLPRec:
    return FMLPRec(n_items, max_history, cfg["hidden"], cfg["layers"], cfg["dropout"])
