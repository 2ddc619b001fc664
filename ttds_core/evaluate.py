"""Full-ranking evaluation of the generative recommender (DVC stage `evaluate`).

Leave-one-out on `data/processed/sequences.parquet`: per user, the validation target is
`items[-2]` with history `items[:-2][-max_history:]`, the test target is `items[-1]` with
history `items[:-1][-max_history:]` (it includes the validation item, the standard
protocol). The prompt is `seqrec_prompt(history SIDs, user SID, train.template)`, the
user SID only when the model has a user tower.

Ranking is over the whole catalogue: trie-constrained beam search (`ranker.py`) returns
the top `eval.beams` distinct items; there is no candidate sampling. Every case is
ranked twice from one prefill: unmasked, and with the user's history excluded from
their trie (masked: everything the user did before the target, as the baselines mask).
`eval.mask_history` only chooses which of the two is the headline (`headline` in the
output); both are always written. (Masking assumes no repeat consumption, true of
5-core Amazon sequences: a target that is also in the history can never be hit masked.)

`eval.popularity_prior` = lambda > 0 ranks by log P(SID | prompt) + lambda * log(n_i + 1),
n_i the item's number of training interactions (`items[:-2]`, as MostPop counts them: no
validation or test target), spread over the trie so the beams are pruned with it
(`ranker.py`, "Scores"). 0 (the default) is the model alone, as in the paper.
`eval.copy_penalty` = beta > 0 subtracts beta from every item whose first code is that of an
item in the prompt's history (`ranker.py`, "Scores"); 0 (the default) is the model alone.

The user SID of the validation prompts is the model's own (its text holds everything before
the validation target). The test prompts' user SID follows `eval.user_profile`: `fresh` (the
default) re-derives it from the training and validation interactions, everything before the
test target (`user_profile.py`); `training` keeps the model's own, one purchase stale.

`metrics/eval.json` also carries `popularity`: MostPop ranks of the same cases, so the
"must beat popularity" check needs no second run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .cases import SPLITS, eval_cases, item_counts, item_span, select_users, target_ranks
from .config import get, seed_everything
from .errors import TTDSError
from .io import atomic_dir, read_parquet, write_json, write_parquet
from .metrics import metric_table
from .prompts import seqrec_packed
from .ranker import SCORINGS, Case, PromptBuilder, rank_cases, ranker_for
from .user_profile import PROFILES, share_changed


@dataclass
class EvalSettings:
    beams: int
    scoring: str
    ks: list[int]
    batch_size: int
    mask_history: bool
    max_users: int | None
    max_history: int
    template: int
    seed: int
    packed: bool = False      # tasks.seqrec_format: packed (the prompt format training used)
    popularity_prior: float = 0.0  # lambda of the popularity prior (0 = none)
    copy_penalty: float = 0.0      # beta on first codes of the prompt's history (0 = none)
    user_profile: str = "fresh"    # the test prompts' user SID: fresh | training (user_profile.py)


def eval_settings(params: dict) -> EvalSettings:
    ks = get(params, "eval.ks", list)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise TTDSError(f"params: 'eval.ks' = {ks!r}, expected a list of positive integers")
    beams = get(params, "eval.beams", int, min_value=1)
    if beams < max(ks):
        raise TTDSError(f"params: 'eval.beams' = {beams} is smaller than the largest K in eval.ks "
                        f"({max(ks)}); expected eval.beams >= {max(ks)}")
    return EvalSettings(
        beams=beams, scoring=get(params, "eval.scoring", str, choices=SCORINGS), ks=sorted(ks), batch_size=get(params, "eval.batch_size", int, min_value=1),
        mask_history=get(params, "eval.mask_history", bool),
        max_users=get(params, "eval.max_users", int, allow_none=True, min_value=1),
        max_history=get(params, "data.max_history", int, min_value=1),
        template=get(params, "train.template", int, min_value=0), seed=get(params, "seed", int),
        packed=seqrec_packed(params),
        popularity_prior=get(params, "eval.popularity_prior", float, 0.0, min_value=0.0),
        copy_penalty=get(params, "eval.copy_penalty", float, 0.0, min_value=0.0),
        user_profile=get(params, "eval.user_profile", str, "fresh", choices=PROFILES))


def rank_table(cases: list[Case], ranks: dict[bool, list[int | None]]) -> pd.DataFrame:
    """The `ranks.parquet` contract: user_id, split, target, rank (1-based or null), masked."""
    frames = [pd.DataFrame({
        "user_id": np.asarray([c.user_id for c in cases], dtype=np.int64),
        "split": [c.split for c in cases],
        "target": np.asarray([c.target for c in cases], dtype=np.int64),
        "rank": pd.array(mode_ranks, dtype="Int64"),
        "masked": masked}) for masked, mode_ranks in ranks.items()]
    return pd.concat(frames, ignore_index=True)


def metrics_of(ranks: pd.DataFrame, ks) -> dict:
    """`{"test": {...}, "valid": {...}, "test_masked": {...}, "valid_masked": {...}}`."""
    out = {}
    for masked in (False, True):
        for split in ("test", "valid"):
            rows = ranks[(ranks["split"] == split) & (ranks["masked"] == masked)]
            if len(rows):
                values = [None if pd.isna(r) else int(r) for r in rows["rank"]]
                out[split + ("_masked" if masked else "")] = metric_table(values, ks)
    return out


def popularity_ranks(sequences: pd.DataFrame, cases: list[Case], n_items: int) -> dict[bool, list[int]]:
    """Ranks of the targets under MostPop on the same cases: items ordered by their number
    of training interactions (`items[:-2]` of every user), ties by lower item id;
    masked = the case's `seen` items removed. A reference point computed with the model's
    own ranks, so "beats popularity" is checked on exactly the same users."""
    counts = item_counts(sequences, n_items)
    key = counts - np.arange(len(counts)) / (len(counts) + 1.0)  # strict order: ties -> lower id first
    order = np.argsort(-key, kind="stable")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(1, len(order) + 1)
    out: dict[bool, list[int]] = {False: [], True: []}
    for c in cases:
        rank = int(position[c.target])
        out[False].append(rank)
        out[True].append(rank - int(sum(1 for i in set(c.seen) if i != c.target and position[i] < rank)))
    return out


def evaluate(rec, sequences: pd.DataFrame, cfg: EvalSettings, progress: bool = False,
             test_user_sids: pd.DataFrame | None = None) -> tuple[dict, pd.DataFrame]:
    """Rank every selected user's validation and test target; return (metrics, ranks).
    `test_user_sids`: the user table of the test prompts (`user_profile.test_user_sids`);
    None = the model's own, as for validation."""
    start = time.perf_counter()
    users = select_users(sequences, cfg.max_users, cfg.seed)
    n_items = item_span(rec.item_sids["item_id"], sequences)
    ranker, tables = ranker_for(rec.model, rec.tokenizer, rec.item_sids, cfg.beams, cfg.scoring,
                                popularity=item_counts(sequences, n_items) + 1.0, prior=cfg.popularity_prior,
                                copy_penalty=cfg.copy_penalty)
    unknown = next((i for items in users["items"] for i in items if int(i) not in tables), None)
    if unknown is not None:
        raise TTDSError(f"sequences.parquet: item {unknown} has no SID in the model's item table "
                        "(data/processed and data/model are from different runs?)")
    user_sids = {"valid": rec.user_sids, "test": rec.user_sids if test_user_sids is None else test_user_sids}
    cases, ranked = [], {False: [], True: []}
    for split in SPLITS:
        builder = PromptBuilder(rec.tokenizer, rec.item_sids, user_sids[split], cfg.template, cfg.packed)
        split_cases = eval_cases(users, split, cfg.max_history)
        for masked, lists in rank_cases(ranker, builder, split_cases, cfg.batch_size,
                                        progress=f"evaluate {split}" if progress else None).items():
            ranked[masked] += lists
        cases += split_cases
    ranks = rank_table(cases, target_ranks(cases, ranked))
    metrics = metrics_of(ranks, cfg.ks)
    metrics["popularity"] = metrics_of(rank_table(cases, popularity_ranks(sequences, cases, n_items)), cfg.ks)
    metrics.update({
        "users": int(len(users)),
        "users_total": int(len(sequences)),
        "user_sample": "all" if cfg.max_users is None or cfg.max_users >= len(sequences)
        else f"seeded sample of {cfg.max_users} (seed {cfg.seed})",
        "items": len(tables),
        "beams": cfg.beams,
        "scoring": cfg.scoring,
        "popularity_prior": cfg.popularity_prior,
        "copy_penalty": cfg.copy_penalty,
        "mask_history": cfg.mask_history,
        "headline": "test_masked" if cfg.mask_history else "test",
        "user_tower": rec.user_sids is not None,
        "test_user_profile": (cfg.user_profile if rec.user_sids is not None else None),
        "test_user_sids_changed": share_changed(rec.user_sids, user_sids["test"], users["user_id"]),
        "seconds": round(time.perf_counter() - start, 1),
    })
    return metrics, ranks


def run(params: dict, processed_dir: str | Path = "data/processed", model_dir: str | Path = "data/model",
        backbone_dir: str | Path = "data/backbone", out_dir: str | Path = "data/eval",
        metrics_path: str | Path = "metrics/eval.json") -> dict:
    """The `evaluate` stage: write `metrics/eval.json` and `data/eval/ranks.parquet`."""
    from .recommender import load_recommender
    from .user_profile import test_user_sids

    cfg = eval_settings(params)
    seed_everything(cfg.seed)
    sequences = read_parquet(Path(processed_dir) / "sequences.parquet", ["user_id", "items"])
    if not (Path(model_dir) / "recommender.json").is_file():
        raise TTDSError(f"{model_dir}: no trained model (run the finetune stage first)")
    rec = load_recommender(params, model_dir=model_dir, backbone_dir=backbone_dir)
    test_sids, withheld = test_user_sids(cfg.user_profile, params, rec, processed_dir, model_dir, backbone_dir)
    metrics, ranks = evaluate(rec, sequences, cfg, progress=True, test_user_sids=test_sids)
    if test_sids is not None:
        metrics["test_profile_validation_withheld"] = withheld
    with atomic_dir(out_dir) as tmp:
        write_parquet(Path(tmp) / "ranks.parquet", ranks)
    write_json(metrics_path, metrics)
    return metrics
