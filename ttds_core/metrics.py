"""Top-K metrics from the 1-based rank of each user's target.

A rank of None / NaN / 0 means the target was not in the returned list. HR@K is the
share of users whose target ranks within K; NDCG@K with a single relevant item is
1/log2(rank+1) when rank <= K, else 0 (ideal DCG is 1).
"""

from __future__ import annotations

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _as_ranks(ranks) -> np.ndarray:
    r = np.asarray([np.nan if v is None else v for v in ranks], dtype=float)
    r[(r <= 0) | ~np.isfinite(r)] = np.inf  # missing -> never within K
    return r


def hit_rate(ranks, k: int) -> float:
    r = _as_ranks(ranks)
    return float(np.mean(r <= k)) if len(r) else 0.0


def ndcg(ranks, k: int) -> float:
    r = _as_ranks(ranks)
    if not len(r):
        return 0.0
    gains = np.where(r <= k, 1.0 / np.log2(np.minimum(r, k) + 1.0), 0.0)
    return float(np.mean(gains))


def metric_table(ranks, ks=DEFAULT_KS) -> dict:
    """`{"HR@1": .., "HR@5": .., "HR@10": .., "NDCG@5": .., "NDCG@10": ..}` (NDCG@1 == HR@1, omitted)."""
    out = {f"HR@{k}": hit_rate(ranks, k) for k in ks}
    out.update({f"NDCG@{k}": ndcg(ranks, k) for k in ks if k > 1})
    return out


def rank_of(target: int, ranked_items) -> int | None:
    """1-based position of `target` in `ranked_items`, or None."""
    for i, item in enumerate(ranked_items):
        if item == target:
            return i + 1
    return None
