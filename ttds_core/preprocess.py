"""Stage `preprocess`: raw data -> items, users, sequences, interactions (leave-one-out).

Steps, in order (each one documented where it happens):
1. read one of the three formats (`ttds_core.readers`, `data.format`);
2. chronological order per user: by timestamp, ties broken by the position in the source
   (file line, or LC-Rec sequence position), a stable sort, so reruns give the same order;
3. duplicates (same user and item): the first interaction in that order is kept, later
   ones are dropped (no item repeats inside a sequence, as in the LC-Rec data);
4. iterative k-core: drop users with fewer than max(`data.kcore`, 3) interactions and items
   with fewer than `data.kcore`, and repeat until nothing changes (3 = one train item plus
   the validation and test targets);
5. optional subset (`data.max_users`, see `sample_users`), re-filtered to the k-core and
   to test/validation targets seen in training;
6. dense re-indexing, sorted by the source index (LC-Rec index, else the original id
   string), so the mapping is stable: on the full LC-Rec data `item_id` equals the LC-Rec
   item index and `user_id` the LC-Rec user index;
7. split: in each sequence the last item is the test target, the second last the
   validation target, the rest train;
8. texts: items rendered from their metadata; users from TRAINING interactions only
   (`user_text.user_texts`).
Everything is computed before anything is written, and `data/processed` is swapped in as a
whole (`atomic_dir`), so a bad input never leaves a half-written folder.
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .data_source import DataConfig, check_root
from .errors import TTDSError
from .io import atomic_dir, write_json
from .readers import RawData, read_amazon2018, read_generic, read_lcrec
from .text import render_fields
from .user_text import user_texts

MIN_USER_INTERACTIONS = 3  # one train item + validation target + test target
PLACEHOLDER_TITLE = "Item {original_id}"  # data.require_text false and no text for an item


def read_raw(cfg: DataConfig) -> RawData:
    check_root(cfg)
    if cfg.format == "lcrec":
        return read_lcrec(cfg.root, cfg.name, cfg.item_text_file)
    if cfg.format == "amazon2018":
        return read_amazon2018(cfg.root, cfg.name, cfg.item_text_file)
    return read_generic(cfg.interactions_file, cfg.items_file)


# --------------------------------------------------------------------------- ordering

def chronological(inter: pd.DataFrame) -> pd.DataFrame:
    """Rows grouped by user, each user's rows by (timestamp, source order); stable."""
    ts = inter["timestamp"].fillna(0).to_numpy(dtype=np.int64)
    idx = np.lexsort((inter["order"].to_numpy(), ts, inter["user"].to_numpy()))
    return inter.iloc[idx].reset_index(drop=True)


def drop_duplicates(inter: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the first (earliest) interaction of each (user, item); needs `chronological` order."""
    dup = inter.duplicated(["user", "item"], keep="first").to_numpy()
    return inter.loc[~dup].reset_index(drop=True), int(dup.sum())


# --------------------------------------------------------------------------- filtering

def sequence_positions(users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in the user's sequence, sequence length) for user-grouped rows."""
    n = len(users)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.diff(np.r_[starts, n])
    group_start = np.repeat(starts, lengths)
    return np.arange(n) - group_start, np.repeat(lengths, lengths)


def kcore_mask(users: np.ndarray, items: np.ndarray, user_min: int, item_min: int,
               train_targets: bool = False) -> tuple[np.ndarray, int]:
    """Rows surviving the iterative k-core filter, and the number of rounds it took.

    `users`/`items` are integer codes of user-grouped, chronological rows. A round drops
    every row whose user has < `user_min` rows or whose item has < `item_min` rows (counted
    on the rows kept so far); rounds repeat until one changes nothing. With `train_targets`,
    an item must also occur at least once in a training position (not the last two of a
    sequence), so every validation/test target was seen in training.
    """
    keep = np.ones(len(users), dtype=bool)
    n_users = int(users.max()) + 1 if len(users) else 0
    n_items = int(items.max()) + 1 if len(items) else 0
    rounds = 0
    while True:
        u, i = users[keep], items[keep]
        ok = (np.bincount(u, minlength=n_users)[u] >= user_min) & \
             (np.bincount(i, minlength=n_items)[i] >= item_min)
        if train_targets:
            pos, length = sequence_positions(u)
            train_count = np.bincount(i[pos < length - 2], minlength=n_items)
            ok &= train_count[i] >= 1
        if ok.all():
            return keep, rounds
        keep[np.flatnonzero(keep)[~ok]] = False
        rounds += 1


def sample_users(users: np.ndarray, items: np.ndarray, max_users: int, seed: int,
                 sampler: str) -> np.ndarray:
    """Codes of at most `max_users` users drawn deterministically from `seed`.

    `users`: uniform sample without replacement. On sparse data (Games: 9 items per
    user, 27 users per item) this collapses under the k-core re-filter: a 3 % user
    sample leaves each item about one interaction.

    `snowball` (default): breadth-first growth over the user-item graph from a seeded
    random user. Each visited item brings in all its users (in seeded random order), each
    new user queues all their items. Items are thus taken with their whole neighbourhood,
    so the subset stays dense enough to remain a k-core after re-filtering. When a
    component is exhausted, growth restarts from another seeded random user. The subset
    is a local, denser community, not a uniform sample: popular items are over-represented
    compared with the full data (see `metrics/preprocess.json`).

    Measured on LC-Rec Games (50,546 users, 16,859 items), 5-core re-filter, users / items /
    interactions left, seeds 42 and 7:

        max_users   users (uniform)                          snowball
        1500        0 (empty) | 0 (empty)                    806/640/8,479 | 705/607/6,537
        3000        0 (empty) | 179/184/1,404                1,966/1,357/20,447 | 1,850/1,514/18,545
        5000        1,335/1,113/10,817 | 1,415/1,133/11,429  3,833/2,558/41,170 | 3,762/2,759/40,093
        8000        3,935/2,769/32,590 | 3,900/2,701/32,515  6,662/4,172/73,838 | 6,684/4,457/75,244

    The CPU default (1500, snowball) keeps ~700-800 users and ~600 items.
    """
    present = np.unique(users)
    if max_users >= len(present):
        return present
    rng = np.random.default_rng(seed)
    if sampler == "users":
        return np.sort(rng.choice(present, size=max_users, replace=False))

    order = np.argsort(users, kind="stable")
    u_sorted = users[order]
    u_starts = np.searchsorted(u_sorted, np.arange(users.max() + 2))
    i_order = np.argsort(items, kind="stable")
    i_sorted_users = users[i_order]
    i_starts = np.searchsorted(items[i_order], np.arange(items.max() + 2))

    chosen = np.zeros(users.max() + 1, dtype=bool)
    item_done = np.zeros(items.max() + 1, dtype=bool)
    picked: list[int] = []
    queue: deque[int] = deque()
    start_order = rng.permutation(present)
    next_start = 0

    def add(user: int) -> None:
        chosen[user] = True
        picked.append(user)
        queue.extend(rng.permutation(items[order[u_starts[user]:u_starts[user + 1]]]).tolist())

    while len(picked) < max_users:
        if not queue:
            while chosen[start_order[next_start]]:
                next_start += 1
            add(int(start_order[next_start]))
            continue
        item = queue.popleft()
        if item_done[item]:
            continue
        item_done[item] = True
        for user in rng.permutation(i_sorted_users[i_starts[item]:i_starts[item + 1]]).tolist():
            if not chosen[user]:
                add(user)
                if len(picked) >= max_users:
                    break
    return np.sort(np.asarray(picked, dtype=np.int64))


# --------------------------------------------------------------------------- texts

def render_item_texts(items: pd.DataFrame, max_chars: int) -> list[str]:
    """'Title: …; Brand: …; Categories: …; Description: …' over the fields present."""
    cols = [items[c].tolist() for c in ("title", "brand", "categories", "description")]
    return [render_fields([("Title", t), ("Brand", b), ("Categories", c), ("Description", d)],
                          max_chars) for t, b, c, d in zip(*cols)]


# --------------------------------------------------------------------------- tables

@dataclass
class Processed:
    items: pd.DataFrame
    users: pd.DataFrame
    sequences: pd.DataFrame
    interactions: pd.DataFrame
    metrics: dict


def process(cfg: DataConfig, raw: RawData) -> Processed:
    """All of preprocessing after reading; pure (no files written)."""
    raw_counts = {"raw_interactions": len(raw.inter), "raw_users": int(raw.inter["user"].nunique()),
                  "raw_items": int(raw.inter["item"].nunique())}
    inter, duplicates = drop_duplicates(chronological(raw.inter))
    user_min = max(cfg.kcore, MIN_USER_INTERACTIONS)
    keep, rounds = kcore_mask(inter["user"].to_numpy(), inter["item"].to_numpy(), user_min, cfg.kcore)
    inter = inter.loc[keep].reset_index(drop=True)
    _check_not_empty(inter, cfg, "the k-core filter")
    kcore_counts = {"users": int(inter["user"].nunique()), "items": int(inter["item"].nunique()),
                    "interactions": len(inter)}

    subset = None
    if cfg.max_users is not None and cfg.max_users < kcore_counts["users"]:
        picked = sample_users(inter["user"].to_numpy(), inter["item"].to_numpy(),
                              cfg.max_users, cfg.seed, cfg.sampler)
        inter = inter.loc[np.isin(inter["user"].to_numpy(), picked)].reset_index(drop=True)
        sampled = {"users": len(picked), "items": int(inter["item"].nunique()),
                   "interactions": len(inter)}
        keep, sub_rounds = kcore_mask(inter["user"].to_numpy(), inter["item"].to_numpy(),
                                      user_min, cfg.kcore, train_targets=True)
        inter = inter.loc[keep].reset_index(drop=True)
        _check_not_empty(inter, cfg, f"sampling {cfg.max_users} users and re-filtering")
        subset = {"sampler": cfg.sampler, "max_users": cfg.max_users, "seed": cfg.seed,
                  "sampled": sampled, "refilter_rounds": sub_rounds}

    # Dense ids in source-index order (codes are already in that order).
    user_codes, user_id = np.unique(inter["user"].to_numpy(), return_inverse=True)
    item_codes, item_id = np.unique(inter["item"].to_numpy(), return_inverse=True)
    pos, length = sequence_positions(user_id)
    split = np.where(pos == length - 1, "test", np.where(pos == length - 2, "valid", "train"))
    interactions = pd.DataFrame({
        "user_id": user_id.astype(np.int64), "item_id": item_id.astype(np.int64),
        "pos": pos.astype(np.int64), "split": split,
        "timestamp": inter["timestamp"].to_numpy(), "rating": inter["rating"].to_numpy(),
        "review": inter["review"].to_numpy(), "summary": inter["summary"].to_numpy()})
    interactions = interactions.astype({"timestamp": "Int64", "rating": "Float64",
                                        "review": "string", "summary": "string"})

    items = _item_table(raw, item_codes, cfg)
    texts, with_reviews = user_texts(interactions, items["title"].to_numpy(), cfg.user_text)
    users = pd.DataFrame({"user_id": np.arange(len(user_codes), dtype=np.int64),
                          "original_id": raw.user_ids[user_codes].astype(str), "text": texts})
    starts = np.flatnonzero(pos == 0)
    sequences = pd.DataFrame({"user_id": np.arange(len(user_codes), dtype=np.int64),
                              "items": np.split(item_id.astype(np.int64), starts[1:])})

    train_items = set(item_id[split == "train"].tolist())
    # *_targets_unseen_in_train count users whose target item never occurs in a training
    # position (possible on full data: k-core counts all positions; 0 on subsets).
    metrics = {
        "format": cfg.format, "name": cfg.name if cfg.format != "generic" else None,
        "users": len(users), "items": len(items), "interactions": len(interactions),
        "avg_seq_len": round(float(length[pos == 0].mean()), 4),
        "min_seq_len": int(length.min()), "max_seq_len": int(length.max()),
        "train_interactions": int((split == "train").sum()),
        "density": round(len(interactions) / (len(users) * len(items)), 6),
        "items_with_text": int(items["has_text"].sum()),
        "users_with_review_text": with_reviews,
        "valid_targets_unseen_in_train": int(sum(i not in train_items for i in item_id[split == "valid"])),
        "test_targets_unseen_in_train": int(sum(i not in train_items for i in item_id[split == "test"])),
        "kcore": cfg.kcore, "kcore_rounds": rounds, "duplicates_dropped": duplicates,
        "chronological_order": raw.chronological,
        "test_targets_tied_in_time": _tied_targets(interactions),
        **raw_counts, "after_kcore": kcore_counts, "subset": subset,
    }
    return Processed(items, users, sequences, interactions, metrics)


def _tied_targets(interactions: pd.DataFrame) -> int | None:
    """Users whose test target has the same timestamp as their validation target.

    Amazon timestamps are day-level: for these users the split between validation and
    test rests on the tie-breaking rule (source order), not on time. None without timestamps.
    """
    ts = interactions["timestamp"]
    if ts.isna().all():
        return None
    valid = ts[interactions["split"] == "valid"].to_numpy()
    test = ts[interactions["split"] == "test"].to_numpy()
    return int((valid == test).sum())


def _check_not_empty(inter: pd.DataFrame, cfg: DataConfig, step: str) -> None:
    if inter.empty:
        raise TTDSError(f"data: no interactions left after {step} (data.kcore = {cfg.kcore}; "
                        "expected users with at least "
                        f"{max(cfg.kcore, MIN_USER_INTERACTIONS)} interactions on items with at least "
                        f"{cfg.kcore}: lower data.kcore or raise data.max_users)")


def _item_table(raw: RawData, item_codes: np.ndarray, cfg: DataConfig) -> pd.DataFrame:
    """items.parquet rows for the surviving item codes, text joined by original id."""
    original = raw.item_ids[item_codes].astype(str)
    text = raw.item_text.set_index("original_id").reindex(original)
    items = pd.DataFrame({"item_id": np.arange(len(original), dtype=np.int64), "original_id": original})
    for c in ("title", "description", "brand", "categories"):
        items[c] = text[c].fillna("").astype(str).to_numpy()
    items["has_text"] = (items["title"] != "") | (items["description"] != "")
    if not items["has_text"].all():
        missing = original[~items["has_text"].to_numpy()]
        if cfg.require_text:
            raise TTDSError(f"data: item '{missing[0]}' ({len(missing)} of {len(original)} items in the "
                            f"sequences) has no title or description in {_text_source(cfg)} (expected "
                            "text for every item; set data.require_text: false to use its id instead)")
        no_text = ~items["has_text"]
        items.loc[no_text, "title"] = [PLACEHOLDER_TITLE.format(original_id=o) for o in missing]
    items["text"] = render_item_texts(items, cfg.item_text_chars)
    return items[["item_id", "original_id", "title", "text", "description", "brand", "categories",
                  "has_text"]]


def _text_source(cfg: DataConfig) -> str:
    if cfg.item_text_file is not None:
        return str(cfg.item_text_file)
    if cfg.format == "generic":
        return str(cfg.items_file) if cfg.items_file else "data.items_file (null)"
    return f"the item text files of {cfg.root}"


def write_outputs(result: Processed, out_dir: Path, metrics_path: Path) -> None:
    with atomic_dir(out_dir) as tmp:
        for name in ("items", "users", "sequences", "interactions"):
            getattr(result, name).to_parquet(tmp / f"{name}.parquet", index=False)
    write_json(metrics_path, result.metrics)


def run(params: dict, out_dir: str | Path = "data/processed",
        metrics_path: str | Path = "metrics/preprocess.json") -> dict:
    cfg = DataConfig.from_params(params)
    result = process(cfg, read_raw(cfg))
    write_outputs(result, Path(out_dir), Path(metrics_path))
    print(kcore_message(result.metrics), file=sys.stderr)
    message = subset_message(result.metrics)
    if message:
        print(message, file=sys.stderr)
    return result.metrics


def kcore_message(metrics: dict) -> str:
    """One line: what was read and what the k-core filter kept (users, items, interactions)."""
    kept = metrics["after_kcore"]
    return (f"preprocess: read {metrics['raw_users']:,} users, {metrics['raw_items']:,} items, "
            f"{metrics['raw_interactions']:,} interactions ({metrics['duplicates_dropped']:,} repeats dropped); "
            f"the {metrics['kcore']}-core ({metrics['kcore_rounds']} rounds) kept {kept['users']:,} users, "
            f"{kept['items']:,} items, {kept['interactions']:,} interactions")


def subset_message(metrics: dict) -> str | None:
    """One line saying what `data.max_users` did to the catalogue (it applies to any data,
    the user's own too), a warning when the re-filter kept under half the sampled users."""
    subset = metrics.get("subset")
    if not subset:
        return None
    sampled, kept = subset["sampled"]["users"], metrics["users"]
    line = (f"data.max_users = {subset['max_users']} ({subset['sampler']} sampler): "
            f"{sampled:,} of {metrics['after_kcore']['users']:,} users sampled, "
            f"{kept:,} kept by the {metrics['kcore']}-core re-filter")
    if kept < sampled / 2:
        return (f"warning: {line} ({kept / sampled:.0%}); a sparse catalogue collapses under "
                "re-filtering: try data.sampler: snowball, a larger data.max_users, or null for all users")
    return f"preprocess: {line} (data.max_users: null uses every user)"
