"""The leave-one-out split as the baselines see it, built from `sequences.parquet`.

Exactly the split of `evaluate`: per user `items[:-2]` is training data, `items[-2]` the
validation target and `items[-1]` the test target. Validation input is
`items[:-2][-max_history:]`, test input `items[:-1][-max_history:]`. Training uses only
`items[:-2]`, so no validation or test target ever reaches a training batch.

Item ids are shifted by one inside the models: 0 is padding, item i is token i + 1.
Sequences are right-padded (real items first), so a causal model never attends to padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import TTDSError
from ..io import read_parquet

PAD = 0


@dataclass
class Split:
    """Per-user arrays, one row per user, in `user_id` order."""

    user_ids: np.ndarray           # int64 [U]
    sequences: list[np.ndarray]    # full chronological sequences (train + valid + test)
    n_items: int

    def only(self, user_ids: np.ndarray) -> "Split":
        """The same split restricted to `user_ids` (kept in `user_id` order)."""
        keep = np.isin(self.user_ids, user_ids)
        return Split(self.user_ids[keep], [s for s, k in zip(self.sequences, keep) if k], self.n_items)

    def train_sequences(self) -> list[np.ndarray]:
        return [s[:-2] for s in self.sequences]

    def targets(self, split: str) -> np.ndarray:
        pos = {"valid": -2, "test": -1}[split]
        return np.asarray([s[pos] for s in self.sequences], dtype=np.int64)

    def histories(self, split: str) -> list[np.ndarray]:
        """Everything the user did before the target (what masking removes)."""
        end = {"valid": -2, "test": -1}[split]
        return [s[:end] for s in self.sequences]


def load_split(processed_dir: str | Path) -> Split:
    """Read `sequences.parquet` (+ `items.parquet` for the catalogue size) and check them."""
    processed_dir = Path(processed_dir)
    seq_path = processed_dir / "sequences.parquet"
    df = read_parquet(seq_path, columns=["user_id", "items"]).sort_values("user_id", kind="stable")
    sequences = [np.asarray(s, dtype=np.int64) for s in df["items"]]
    if not sequences:
        raise TTDSError(f"{seq_path}: no users")
    short = next((u for u, s in zip(df["user_id"], sequences) if len(s) < 3), None)
    if short is not None:
        raise TTDSError(f"{seq_path}: user {short} has fewer than 3 items, expected >= 3 "
                        "(train, validation and test)")
    max_item = max(int(s.max()) for s in sequences)
    min_item = min(int(s.min()) for s in sequences)
    if min_item < 0:
        raise TTDSError(f"{seq_path}: 'items' has negative item id {min_item}")
    items_path = processed_dir / "items.parquet"
    if items_path.exists():
        n_items = len(read_parquet(items_path, columns=["item_id"]))
        if max_item >= n_items:
            raise TTDSError(f"{seq_path}: item id {max_item} is not in {items_path} ({n_items} items)")
    else:
        n_items = max_item + 1
    return Split(user_ids=df["user_id"].to_numpy(np.int64), sequences=sequences, n_items=n_items)


def training_windows(train_sequences: list[np.ndarray], max_history: int) -> np.ndarray:
    """Cut training sequences into right-padded windows of `max_history + 1` shifted ids.

    Position t of a window is predicted from positions < t, so a window yields up to
    `max_history` next-item targets. Windows step back by `max_history` from the end of
    the sequence, so every training item after the first is a target exactly once (the
    same target set as RecBole's prefix augmentation, without duplicating the inputs).
    """
    width = max_history + 1
    rows = []
    for seq in train_sequences:
        end = len(seq)
        while end >= 2:  # a window needs one input and one target
            window = seq[max(0, end - width):end] + 1
            row = np.zeros(width, dtype=np.int64)
            row[:len(window)] = window
            rows.append(row)
            end -= max_history
    if not rows:
        raise TTDSError("no training sequence has two items: nothing to train on")
    return np.stack(rows)


def pad_inputs(histories: list[np.ndarray], max_history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last `max_history` items of each history, shifted and right-padded; plus lengths."""
    out = torch.zeros(len(histories), max_history, dtype=torch.long)
    lengths = torch.zeros(len(histories), dtype=torch.long)
    for i, h in enumerate(histories):
        h = h[-max_history:] + 1
        out[i, :len(h)] = torch.from_numpy(h)
        lengths[i] = len(h)
    return out, lengths


def rank_frame(user_ids, split: str, targets, ranks, masked: bool) -> pd.DataFrame:
    """Rows of the `ranks.parquet` contract: user_id, split, target, rank, masked."""
    return pd.DataFrame({"user_id": np.asarray(user_ids, dtype=np.int64), "split": split,
                         "target": np.asarray(targets, dtype=np.int64),
                         "rank": pd.array(np.asarray(ranks, dtype=np.int64), dtype="Int64"),
                         "masked": masked})
