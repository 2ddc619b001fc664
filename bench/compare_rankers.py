"""The new ranking engine against the previous HF-`generate` ranker, on a trained model.

    python -m bench.compare_rankers [--users N] [--out FILE]

Ranks every case `evaluate` ranks (validation and test, unmasked and masked; all users of
`data/processed`, or a seeded sample of `--users`) with both rankers, on the trained model
in `data/model`, with the `eval.*` settings of params.yaml, and reports:
- how many cases get the same top-`eval.beams` items in the same order, and the largest
  score difference over items both returned;
- every case that differs, classified: `tie` when the items that differ have scores within
  `--tol` of the other list's boundary (beam search keeps one of two equal candidates), else
  `beam`: the two searches kept different partial SIDs (both are approximate below the
  exhaustive beam width; the higher-scoring list is the better search);
- the time of each on the same cases, both masks, in one run (seconds per case).
Exits 1 when a case differs for a reason other than a tie, so it can gate a change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.hf_ranker import ConstrainedRanker, build_item_trie, rank_cases_hf
from ttds_core.config import get, load_params, seed_everything
from ttds_core.cases import SPLITS, eval_cases, select_users
from ttds_core.evaluate import eval_settings
from ttds_core.io import read_parquet, write_json
from ttds_core.ranker import PromptBuilder, rank_cases, ranker_for


def classify(new: list, old: list, tol: float) -> tuple[str, float]:
    """('same' | 'tie' | 'beam', largest |score difference| over items in both lists)."""
    new_scores, old_scores = dict(new), dict(old)
    common = set(new_scores) & set(old_scores)
    diff = max((abs(new_scores[i] - old_scores[i]) for i in common), default=0.0)
    if [i for i, _ in new] == [i for i, _ in old]:
        return "same", diff
    # items in only one list, or swapped: a tie when their scores sit within tol of each other
    only = (set(new_scores) ^ set(old_scores)) | {a for a, b in zip([i for i, _ in new], [i for i, _ in old]) if a != b}
    scores = [new_scores.get(i, old_scores.get(i)) for i in only]
    boundary = min(min(new_scores.values(), default=0.0), min(old_scores.values(), default=0.0))
    if scores and max(scores) - min(scores + [boundary]) <= tol:
        return "tie", diff
    return "beam", diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--users", type=int, default=None, help="a seeded sample (default: every user)")
    ap.add_argument("--model-dir", default="data/model")
    ap.add_argument("--tol", type=float, default=1e-4, help="score tolerance of equal scores")
    ap.add_argument("--out", default=None, help="also write the summary as JSON here")
    args = ap.parse_args(argv)

    from ttds_core.recommender import load_recommender

    params = load_params(args.params)
    cfg = eval_settings(params)
    seed_everything(cfg.seed)
    rec = load_recommender(params, model_dir=args.model_dir)
    users = select_users(read_parquet(Path("data/processed/sequences.parquet")), args.users, cfg.seed)
    cases = [c for split in SPLITS for c in eval_cases(users, split, cfg.max_history)]
    build = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, cfg.template, cfg.packed)

    ranker, tables = ranker_for(rec.model, rec.tokenizer, rec.item_sids, cfg.beams, cfg.scoring)
    start = time.perf_counter()
    new = rank_cases(ranker, build, cases, cfg.batch_size, progress="new ranker")
    new_s = time.perf_counter() - start

    old_ranker = ConstrainedRanker(rec.model, rec.tokenizer, build_item_trie(rec.item_sids, rec.tokenizer),
                                   cfg.beams, cfg.scoring)
    start = time.perf_counter()
    old = rank_cases_hf(old_ranker, build, cases, cfg.batch_size)
    old_s = time.perf_counter() - start

    counts = {"same": 0, "tie": 0, "beam": 0}
    worst, examples = 0.0, []
    for masked in (False, True):
        for case, a, b in zip(cases, new[masked], old[masked]):
            kind, diff = classify(a, b, args.tol)
            counts[kind] += 1
            worst = max(worst, diff)
            if kind != "same" and len(examples) < 10:
                examples.append({"user_id": case.user_id, "split": case.split, "masked": masked, "kind": kind,
                                 "new": [[i, round(s, 5)] for i, s in a],
                                 "old": [[i, round(s, 5)] for i, s in b],
                                 "new_sum": round(sum(s for _, s in a), 4), "old_sum": round(sum(s for _, s in b), 4)})
    result = {
        "cases": len(cases) * 2, "users": len(users), "items": len(tables), "beams": cfg.beams,
        "scoring": cfg.scoring, "batch_size": cfg.batch_size, "threads": torch.get_num_threads(),
        "same_items_same_order": counts["same"], "differ_by_ties": counts["tie"], "differ_otherwise": counts["beam"],
        "max_score_diff_common_items": worst,
        "new_seconds": round(new_s, 1), "old_seconds": round(old_s, 1),
        "new_seconds_per_case_both_masks": round(new_s / len(cases), 4),
        "old_seconds_per_case_both_masks": round(old_s / len(cases), 4),
        "speedup": round(old_s / new_s, 2),
        "differing_cases": examples,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "differing_cases"}, indent=2))
    if args.out:
        write_json(args.out, result)
    return 1 if counts["beam"] else 0


if __name__ == "__main__":
    sys.exit(main())
