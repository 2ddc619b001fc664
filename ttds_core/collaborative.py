"""Collaborative signal in the item index (`index.cf_mix`; beyond the paper, after LETTER's
collaborative regularisation of the tokenizer).

The paper quantizes each item's text vector X alone, so an item's SID says what it is, not
what it is bought with: on the separable benchmark consecutive purchases share their first
code 6 % of the time, and a first-order Markov chain over item ids ranks as well as TTDS
(docs/benchmark.md). With `cf_mix` = γ > 0 the item vector the index quantizes becomes

    X'_i = (1 - γ) · X_i + γ · mean of X_j over the items j next to i in a training sequence

(both directions, weighted by how often the pair occurs), so items bought one after the
other land nearer each other and share SID prefixes more often. Items with no training
neighbour keep X_i. Only training transitions count (`items[:-2]` of every user: no
validation or test target, and no step into one). The same X' is what the warm-up RQ-VAE
trains on, what `build_sids` quantizes, the DM-VAE terms' item target, and, on a dynamic
index, what every refresh re-quantizes (the mix applied to the re-embedded X). γ = 0 is the
paper: X unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import get
from .errors import TTDSError
from .io import read_parquet


def transition_pairs(sequences: list[np.ndarray]) -> np.ndarray:
    """[P, 2] consecutive (earlier, later) item pairs of the training part of each sequence."""
    pairs = [np.stack([s[:-1], s[1:]], 1) for s in (np.asarray(s[:-2], dtype=np.int64) for s in sequences)
             if len(s) >= 2]
    return np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)


def mix(x: np.ndarray, pairs: np.ndarray, gamma: float) -> np.ndarray:
    """X' = (1 - γ) X + γ · (count-weighted mean of each item's neighbours' X); rows without
    neighbours unchanged."""
    if not 0.0 <= gamma <= 1.0:
        raise TTDSError(f"params: 'index.cf_mix' = {gamma}, expected in [0, 1]")
    if gamma == 0.0 or len(pairs) == 0:
        return x
    n = len(x)
    if pairs.min() < 0 or pairs.max() >= n:
        raise TTDSError(f"training sequences name item {int(pairs.max())}, the item embeddings have {n} rows")
    a = np.concatenate([pairs[:, 0], pairs[:, 1]])  # both directions
    b = np.concatenate([pairs[:, 1], pairs[:, 0]])
    neighbour_sum = np.zeros_like(x, dtype=np.float64)
    np.add.at(neighbour_sum, a, x[b].astype(np.float64))
    degree = np.bincount(a, minlength=n).astype(np.float64)
    has = degree > 0
    out = x.astype(np.float64, copy=True)
    out[has] = (1.0 - gamma) * out[has] + gamma * neighbour_sum[has] / degree[has, None]
    return out.astype(x.dtype)


def cf_mix(params: dict) -> float:
    return get(params, "index.cf_mix", float, 0.0, min_value=0.0)


def read_training_pairs(processed_dir: str | Path) -> np.ndarray:
    sequences = read_parquet(Path(processed_dir) / "sequences.parquet", ["user_id", "items"])
    return transition_pairs([np.asarray(s, dtype=np.int64) for s in sequences["items"]])


def item_vectors(params: dict, x: np.ndarray, processed_dir: str | Path) -> np.ndarray:
    """The item vectors the index quantizes: X itself, or X mixed with its training
    neighbours (`index.cf_mix`)."""
    gamma = cf_mix(params)
    return mix(x, read_training_pairs(processed_dir), gamma) if gamma > 0 else x
