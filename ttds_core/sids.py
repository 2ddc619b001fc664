"""Semantic IDs: codes -> unique SIDs (collision suffix, paper §4.2.5), tables and stats.

Two entities whose M codes coincide both get a suffix token p_j, j = their rank inside
the collision set by entity id (`<a_1><b_2><c_3><p_0>`, `<a_1><b_2><c_3><p_1>`); an
entity with a unique code tuple gets none. This guarantees unique SIDs whatever the
quantizer does, and is deterministic. The `build_sids` stage (`build_sids.py`) applies this
to the warmup quantizers' codes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .errors import TTDSError
from .tokens import sid_string

ID_COLUMN = {"item": "item_id", "user": "user_id"}
FILES = {"item": "items", "user": "users"}


def row_groups(codes: np.ndarray):
    """(group index of each row, size of each group) of identical rows (code tuples, or inputs)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise TTDSError(f"codes must be a 2-D array [entities, levels], got shape {codes.shape}")
    if len(codes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def resolve_collisions(codes: np.ndarray, ids: np.ndarray | None = None,
                       max_suffix: int | None = None) -> np.ndarray:
    """Suffix of each row: -1 when its code tuple is unique, else its rank (0, 1, ...)
    by entity id (`ids`, default the row number) among the rows sharing the tuple.
    `max_suffix`: the number of suffix tokens available; a larger collision set is an error."""
    inverse, counts = row_groups(codes)
    n = len(inverse)
    ids = np.arange(n) if ids is None else np.asarray(ids)
    if n and max_suffix is not None and counts.max() > max_suffix:
        raise TTDSError(f"params: 'index.max_suffix' = {max_suffix}, but {int(counts.max())} entities "
                        f"share one code tuple: raise it to at least {int(counts.max())}")
    order = np.lexsort((ids, inverse))  # by group, then by id inside the group
    sorted_groups = inverse[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1] if n else np.zeros(0, dtype=np.int64)
    group_start = np.repeat(first, np.diff(np.r_[first, n]))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - group_start
    return np.where(counts[inverse] > 1, rank, -1).astype(np.int64)


def sid_table(ids, codes, suffix, tower: str) -> pd.DataFrame:
    """`item_id`/`user_id`, `codes` (list of M ints), `suffix`, `sid` (token string)."""
    if tower not in ID_COLUMN:
        raise TTDSError(f"unknown tower {tower!r}, expected 'item' or 'user'")
    ids, codes, suffix = np.asarray(ids, dtype=np.int64), np.asarray(codes, dtype=np.int64), np.asarray(suffix)
    return pd.DataFrame({
        ID_COLUMN[tower]: ids,
        "codes": [row.tolist() for row in codes],
        "suffix": suffix.astype(np.int64),
        "sid": [sid_string(tower, row, int(s)) for row, s in zip(codes, suffix)],
    })


def level_usage(codes: np.ndarray, codebook_size: int) -> tuple[list[float], list[float]]:
    """Per level: share of the N codes in use, and perplexity exp(H) of the code distribution
    (N for a uniform spread, 1 when every entity has the same code)."""
    codes = np.asarray(codes)
    usage, perplexity = [], []
    for m in range(codes.shape[1]):
        counts = np.bincount(codes[:, m], minlength=codebook_size)
        p = counts[counts > 0] / max(len(codes), 1)
        usage.append(float((counts > 0).mean()))
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0)
    return usage, perplexity


def index_stats(codes: np.ndarray, suffix: np.ndarray, codebook_size: int) -> dict:
    """Collision rate before the suffix (share of entities whose code tuple is shared),
    largest collision set, distinct tuples, SID length, per-level usage and perplexity."""
    codes, suffix = np.asarray(codes), np.asarray(suffix)
    inverse, counts = row_groups(codes)
    n, length = codes.shape
    usage, perplexity = level_usage(codes, codebook_size)
    return {
        "entities": int(n),
        "length": int(length),
        "codebook_size": int(codebook_size),
        "unique_tuples": int(len(counts)),
        "collision_rate": float((counts[inverse] > 1).mean()) if n else 0.0,
        "max_collision_set": int(counts.max()) if n else 0,
        "with_suffix": int((suffix >= 0).sum()),
        "max_sid_length": int(length + (1 if (suffix >= 0).any() else 0)),
        "usage": usage,
        "perplexity": perplexity,
    }


def churn(old_table: pd.DataFrame, new_table: pd.DataFrame) -> float:
    """Share of entities (present in both tables) whose SID string changed."""
    key = next((c for c in ID_COLUMN.values() if c in old_table.columns and c in new_table.columns), None)
    if key is None:
        raise TTDSError("SID tables need a common 'item_id' or 'user_id' column")
    merged = old_table[[key, "sid"]].merge(new_table[[key, "sid"]], on=key, suffixes=("_old", "_new"))
    return float((merged["sid_old"] != merged["sid_new"]).mean()) if len(merged) else 0.0
