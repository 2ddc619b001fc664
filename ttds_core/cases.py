"""Who is ranked, on what: the users a stage ranks and their leave-one-out cases.

Shared by `evaluate`, validation inside `finetune` and `precompute`, so that none of them
imports another stage's module (and each stage's dvc.yaml deps stay its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from .errors import TTDSError
from .metrics import rank_of


@dataclass
class Case:
    """One ranking query: the prompt history, what masking excludes, and the target."""

    user_id: int
    split: str
    history: list[int]        # items shown in the prompt (the last max_history)
    seen: list[int]           # every item before the target: excluded when masking
    target: int | None        # None when serving (no target)


SPLITS = ("valid", "test")
_TARGET_POS = {"valid": -2, "test": -1}  # leave-one-out: last item = test, second last = valid


def select_users(sequences: pd.DataFrame, max_users: int | None, seed: int,
                 source: str = "sequences.parquet") -> pd.DataFrame:
    """Users with a train/valid/test split, all of them or a seeded sample of `max_users`."""
    for col in ("user_id", "items"):
        if col not in sequences.columns:
            raise TTDSError(f"{source}: missing column {col}")
    seqs = sequences.sort_values("user_id", kind="stable").reset_index(drop=True)
    short = seqs["items"].map(len) < 3
    if short.any():
        raise TTDSError(f"{source}: user {int(seqs.loc[short, 'user_id'].iloc[0])} has fewer than 3 items, "
                        "expected >= 3 (train, validation and test)")
    if max_users is not None and max_users < len(seqs):
        rows = np.sort(np.random.default_rng(seed).choice(len(seqs), size=max_users, replace=False))
        seqs = seqs.iloc[rows].reset_index(drop=True)
    return seqs


def item_span(item_ids, sequences: pd.DataFrame) -> int:
    """1 + the largest item id of a SID table's `item_ids` and of the sequences: the length
    of a per-item array that every item of either can index."""
    return 1 + max(max(int(i) for i in item_ids), max(int(i) for items in sequences["items"] for i in items))


def item_counts(sequences: pd.DataFrame, n_items: int, upto: int | None = -2) -> np.ndarray:
    """Interactions per item id over `items[:upto]` of every user: `upto=-2` counts the
    training part only (no validation or test target, what MostPop and the evaluation's
    popularity prior use); `upto=None` counts everything (serving)."""
    parts = [np.asarray(list(s)[:upto], dtype=np.int64) for s in sequences["items"]]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=n_items).astype(np.float64)


def eval_cases(sequences: pd.DataFrame, split: str, max_history: int) -> list[Case]:
    end = _TARGET_POS[split]
    cases = []
    for user, items in zip(sequences["user_id"].tolist(), sequences["items"]):
        items = [int(i) for i in items]
        before = items[:end]
        cases.append(Case(int(user), split, before[-max_history:], before, items[end]))
    return cases


def target_ranks(cases: list[Case], ranked: dict[bool, list]) -> dict[bool, list[int | None]]:
    """1-based rank of each case's target in its ranked (item, score) list, or None."""
    return {m: [rank_of(c.target, [i for i, _ in r]) for c, r in zip(cases, lists)] for m, lists in ranked.items()}
