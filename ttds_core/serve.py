"""Serving: `ttds recommend` and the top-K cache (DVC stage `precompute`, seed 001).

At serving time the history is the user's FULL sequence (every known interaction,
validation and test items included: they are the past by now), cut to the last
`data.max_history` items for the prompt, as in training. With `serve.mask_history`
the user's own items are excluded from their trie, so nothing they already have is
recommended. The prompt's user SID follows `serve.user_profile`: `fresh` (the default)
re-derives every user's SID from the text of all their interactions, as `evaluate` does for
the test prompts from everything before the test target (`user_profile.py`); `training`
keeps the training-time SID, a profile that misses the validation and test purchases.
Scores are the model's SID log-probabilities (`eval.scoring`), plus lambda * log(n_i + 1)
with `eval.popularity_prior` = lambda > 0, n_i counted over every known interaction (at
serving time all of them are the past), minus beta on items whose first code occurs in the
prompt's history with `eval.copy_penalty` = beta > 0.

`precompute` ranks every user once (a seeded `serve.max_users` of them when set) and
writes `data/serving/topk.parquet` (user_id, items, scores), the serving user table
`data/serving/user_sids.parquet` (with a user tower), and `data/serving/meta.json` with a
fingerprint of everything the lists depend on (model files, backbone config, sequences,
the interactions and titles the fresh profile reads, serving params). `recommend` answers
from the cache when the fingerprint matches, else runs the model and says so (with the
cached user table when the fingerprint matches, else one derived for all users: collisions
are resolved among all of them).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

from .config import get
from .errors import TTDSError
from .io import atomic_dir, hash_files, read_json, read_parquet, write_json, write_parquet
from .prompts import seqrec_packed
from .user_profile import PROFILES, profile_settings, serving_user_sids, share_changed

# ranker / recommender import torch and transformers: they are imported inside
# the functions that run the model, so a cache hit answers without loading either.

# Part of the cache's fingerprint: change it whenever ranker.py could rank differently, so a
# cache written by an older engine is not served (a constant here, so a cache hit imports no torch).
RANKING_ENGINE = "ranker.py v2: trie tables, shared-prefix beam search"

MODEL_DIR, BACKBONE_DIR, PROCESSED_DIR, SERVING_DIR = "data/model", "data/backbone", "data/processed", "data/serving"
USER_SIDS_FILE = "user_sids.parquet"  # the serving user table, beside the top-K cache


def serve_settings(params: dict) -> dict:
    beams = get(params, "eval.beams", int, min_value=1)
    topk = get(params, "serve.topk", int, min_value=1)
    if topk > beams:
        raise TTDSError(f"params: 'serve.topk' = {topk} is larger than 'eval.beams' = {beams} "
                        "(beam search returns at most eval.beams items)")
    return {"beams": beams, "topk": topk,
            "scoring": get(params, "eval.scoring", str),  # checked by the ranker
            "batch_size": get(params, "eval.batch_size", int, min_value=1),
            "mask_history": get(params, "serve.mask_history", bool),
            "max_users": get(params, "serve.max_users", int, allow_none=True, min_value=1),
            "max_history": get(params, "data.max_history", int, min_value=1),
            "template": get(params, "train.template", int, min_value=0),
            "packed": seqrec_packed(params),
            "popularity_prior": get(params, "eval.popularity_prior", float, 0.0, min_value=0.0),
            "copy_penalty": get(params, "eval.copy_penalty", float, 0.0, min_value=0.0),
            "user_profile": get(params, "serve.user_profile", str, "fresh", choices=PROFILES)}


def fingerprint(params: dict, model_dir: str | Path = MODEL_DIR, backbone_dir: str | Path = BACKBONE_DIR,
                processed_dir: str | Path = PROCESSED_DIR) -> str:
    """sha256 of what a user's top-K depends on: every file of the trained model (adapter,
    SID rows and tables, tokenizer), the backbone's config and record (not its weights,
    which are derived from `model.*`, hashed here), the sequences, the interactions and
    titles (the fresh user profile's text), and the settings."""
    model_dir = require_model(model_dir)
    h = hashlib.sha256()
    hash_files(model_dir, h=h)
    hash_files(backbone_dir, "*.json", h=h)
    hash_files(processed_dir, "sequences.parquet", h=h)
    settings = dict(serve_settings(params), model=get(params, "model", dict), engine=RANKING_ENGINE)
    if settings["user_profile"] == "fresh":  # what else the fresh profile's SIDs depend on (user_profile.py)
        for name in ("interactions.parquet", "items.parquet"):
            hash_files(processed_dir, name, h=h)
        settings["profile"] = profile_settings(params)
    settings.pop("batch_size")  # does not change the lists
    settings.pop("max_users")   # only which users are cached, checked per user
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def serving_cases(sequences: pd.DataFrame, max_history: int, users=None):
    """One query per user: history = the last max_history of ALL their items; no target."""
    from .ranker import Case

    seqs = sequences if users is None else sequences[sequences["user_id"].isin(users)]
    return [Case(int(u), "serve", [int(i) for i in items][-max_history:], [int(i) for i in items], None)
            for u, items in zip(seqs["user_id"].tolist(), seqs["items"])]


def require_model(model_dir) -> Path:
    """`model_dir`, or the one-line error when no finetune stage has written a model there."""
    model_dir = Path(model_dir)
    if not (model_dir / "recommender.json").is_file():
        raise TTDSError(f"{model_dir}: no trained model (run the finetune stage first)")
    return model_dir


def load_model(params: dict, model_dir=MODEL_DIR, backbone_dir=BACKBONE_DIR):
    from .recommender import load_recommender

    require_model(model_dir)
    return load_recommender(params, model_dir=model_dir, backbone_dir=backbone_dir)


def rank_users(params: dict, cases, model_dir=MODEL_DIR, backbone_dir=BACKBONE_DIR, rec=None,
               progress: str | None = None, sequences: pd.DataFrame | None = None,
               user_sids: pd.DataFrame | None = None) -> list[list[tuple[int, float]]]:
    """Top serve.topk (item, score) per case from the model; `sequences` (every user's
    items) weigh the popularity prior when `eval.popularity_prior` > 0; `user_sids`: the
    prompts' user table (`serving_user_sids`), the model's own when None."""
    from .ranker import PromptBuilder, rank_cases, ranker_for

    cfg = serve_settings(params)
    rec = rec if rec is not None else load_model(params, model_dir, backbone_dir)
    weights = None
    if cfg["popularity_prior"]:
        from .cases import item_counts, item_span

        if sequences is None:
            raise TTDSError("a popularity prior needs the users' sequences to count items")
        n_items = item_span(rec.item_sids["item_id"], sequences)
        weights = item_counts(sequences, n_items, upto=None) + 1.0
    ranker, _ = ranker_for(rec.model, rec.tokenizer, rec.item_sids, cfg["beams"], cfg["scoring"],
                           popularity=weights, prior=cfg["popularity_prior"], copy_penalty=cfg["copy_penalty"])
    table = user_sids if user_sids is not None else rec.user_sids
    builder = PromptBuilder(rec.tokenizer, rec.item_sids, table, cfg["template"], cfg["packed"])
    mode = cfg["mask_history"]
    ranked = rank_cases(ranker, builder, cases, cfg["batch_size"], modes=(mode,), progress=progress)[mode]
    return [r[:cfg["topk"]] for r in ranked]


def run_precompute(params: dict, model_dir=MODEL_DIR, backbone_dir=BACKBONE_DIR, processed_dir=PROCESSED_DIR,
                   out_dir=SERVING_DIR, rec=None) -> dict:
    """The `precompute` stage: every user's top serve.topk into data/serving/."""
    start = time.perf_counter()
    cfg = serve_settings(params)
    stamp = fingerprint(params, model_dir, backbone_dir, processed_dir)
    sequences = read_parquet(Path(processed_dir) / "sequences.parquet", ["user_id", "items"])
    from .cases import select_users

    # every user, or a seeded sample (CPU budgets); users outside the cache are served by the model
    users = select_users(sequences, cfg["max_users"], get(params, "seed", int), "sequences.parquet")
    cases = serving_cases(users, cfg["max_history"])
    rec = rec if rec is not None else load_model(params, model_dir, backbone_dir)
    user_sids = serving_user_sids(cfg["user_profile"], params, rec, processed_dir, model_dir, backbone_dir)
    ranked = rank_users(params, cases, model_dir, backbone_dir, rec=rec, progress="precompute", sequences=sequences,
                        user_sids=user_sids)
    table = pd.DataFrame({"user_id": [c.user_id for c in cases],
                          "items": [[i for i, _ in r] for r in ranked],
                          "scores": [[float(s) for _, s in r] for r in ranked]})
    meta = {"fingerprint": stamp, "users": len(table), "users_total": len(sequences), "topk": cfg["topk"], "beams": cfg["beams"],
            "mask_history": cfg["mask_history"], "scoring": cfg["scoring"],
            "history": "full sequence (last data.max_history items in the prompt)",
            "user_profile": cfg["user_profile"] if user_sids is not None else None,
            "user_sids_changed": share_changed(rec.user_sids, user_sids),
            "seconds": round(time.perf_counter() - start, 1)}
    with atomic_dir(out_dir) as tmp:
        write_parquet(Path(tmp) / "topk.parquet", table)
        if user_sids is not None:
            write_parquet(Path(tmp) / USER_SIDS_FILE, user_sids)
        write_json(Path(tmp) / "meta.json", meta)
    return meta


def cached_user_sids(params: dict, rec, stamp: str, out_dir, model_dir, backbone_dir, processed_dir
                     ) -> pd.DataFrame | None:
    """The serving user table: the one `precompute` saved when its cache is current (its
    fingerprint is `stamp`, the current `fingerprint`), else derived now for every user (as
    `precompute` does)."""
    cfg = serve_settings(params)
    out_dir = Path(out_dir)
    if rec.user_sids is None or cfg["user_profile"] == "training":
        return rec.user_sids
    if (out_dir / "meta.json").is_file() and (out_dir / USER_SIDS_FILE).is_file():
        if read_json(out_dir / "meta.json").get("fingerprint") == stamp:
            from .recommender import SID_COLUMNS

            return read_parquet(out_dir / USER_SIDS_FILE, SID_COLUMNS["user"])
    print(f"note: deriving every user's serving SID ({len(rec.user_sids)} users; serve.user_profile: fresh)",
          file=sys.stderr)
    return serving_user_sids(cfg["user_profile"], params, rec, processed_dir, model_dir, backbone_dir)


def resolve_user(users: pd.DataFrame, user: str, source: str) -> int:
    """user_id of `user`: an original id (e.g. the reviewer id) first, else an index."""
    match = users.loc[users["original_id"].astype(str) == str(user), "user_id"]
    if len(match):
        return int(match.iloc[0])
    text = str(user).strip()
    if text.isdigit() and int(text) in set(users["user_id"].tolist()):
        return int(text)
    raise TTDSError(f"user {user!r}: not found in {source} (expected an original user id or an index "
                    f"0..{len(users) - 1})")


def cached_topk(user_id: int, k: int, stamp: str, out_dir=SERVING_DIR) -> tuple[list | None, str]:
    """(the cached list of (item, score), "") when the cache is current (its fingerprint is
    `stamp`, the current `fingerprint`), else (None, why)."""
    out_dir = Path(out_dir)
    if not (out_dir / "meta.json").is_file() or not (out_dir / "topk.parquet").is_file():
        return None, f"no top-K cache in {out_dir}"
    meta = read_json(out_dir / "meta.json")
    if meta.get("fingerprint") != stamp:
        return None, f"the top-K cache in {out_dir} is from another model or settings"
    if k > int(meta.get("topk", 0)):
        return None, f"--k {k} is more than the {meta.get('topk')} items cached per user"
    table = read_parquet(out_dir / "topk.parquet", ["user_id", "items", "scores"])
    row = table[table["user_id"] == user_id]
    if not len(row):
        return None, f"user {user_id} is not in the top-K cache"
    return list(zip(row["items"].iloc[0].tolist(), row["scores"].iloc[0].tolist()))[:k], ""


def recommend(params: dict, user: str, k: int, processed_dir=PROCESSED_DIR, model_dir=MODEL_DIR,
              backbone_dir=BACKBONE_DIR, out_dir=SERVING_DIR, rec=None) -> tuple[int, list, str]:
    """(user_id, [(item, score)] best first, source) for `user` (original id or index)."""
    cfg = serve_settings(params)
    if k < 1:
        raise TTDSError(f"--k {k}: expected at least 1")
    if k > cfg["beams"]:
        raise TTDSError(f"--k {k} is larger than 'eval.beams' = {cfg['beams']} "
                        "(beam search returns at most eval.beams items)")
    processed_dir = Path(processed_dir)
    users = read_parquet(processed_dir / "users.parquet", ["user_id", "original_id"])
    user_id = resolve_user(users, user, str(processed_dir / "users.parquet"))
    stamp = fingerprint(params, model_dir, backbone_dir, processed_dir)  # hashes the model files: once
    hit, why = cached_topk(user_id, k, stamp, out_dir)
    if hit is not None:
        return user_id, hit, "cache"
    print(f"note: {why}; running the model", file=sys.stderr)
    sequences = read_parquet(processed_dir / "sequences.parquet", ["user_id", "items"])
    cases = serving_cases(sequences, cfg["max_history"], users=[user_id])
    if not cases:
        raise TTDSError(f"user {user!r}: no interactions in {processed_dir / 'sequences.parquet'}")
    rec = rec if rec is not None else load_model(params, model_dir, backbone_dir)
    user_sids = cached_user_sids(params, rec, stamp, out_dir, model_dir, backbone_dir, processed_dir)
    ranked = rank_users(params, cases, model_dir, backbone_dir, rec=rec, sequences=sequences, user_sids=user_sids)[0]
    return user_id, ranked[:k], "model"


def recommend_cli(params: dict, user: str, k: int, **paths) -> None:
    """Print the ranked items of `user` with their titles (the `ttds recommend` command)."""
    user_id, ranked, source = recommend(params, user, k, **paths)
    processed_dir = Path(paths.get("processed_dir", PROCESSED_DIR))
    items = read_parquet(processed_dir / "items.parquet", ["item_id", "original_id", "title"]).set_index("item_id")
    print(f"top {len(ranked)} for user {user_id} ({source}):")
    for rank, (item, score) in enumerate(ranked, 1):
        row = items.loc[item] if item in items.index else None
        title = "" if row is None else str(row["title"])
        original = "?" if row is None else str(row["original_id"])
        print(f"{rank:3d}  {score:9.4f}  {item:6d}  {original:12s}  {title}")
