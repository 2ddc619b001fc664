"""Does a model rank better in a context it was trained on than in a new one?

    python -m bench.context_shift [--root .] [--out docs/bench/benchmark/context_shift.json]

Leave-one-out validation shows a model the user's whole training sequence: for a model that
trains on every prefix of it, that context is one it has fitted. The test case appends the
validation item, a context no training row ever showed. A model that memorises its training
contexts can therefore look better on validation than on test for a reason that has nothing to
do with time. This ranks four case sets per user, for the trained TTDS of the workspace at
`--root` (`data/model`, `params.yaml`) and for SASRec and MostPop trained here with the
workspace's params on the same split:

- `train_last`: the last training item from the items before it (a training target);
- `valid`: the validation item from the training items (the usual validation case);
- `test`: the test item from the training items and the validation item (the usual test case);
- `test_skip`: the test item from the training items alone (the validation item left out).

If `test_skip` scores clearly above `test` for a model, the unseen validation item in the
context costs it; `train_last` against `valid` measures how much it memorised. Unmasked
NDCG@10 and HR@10 over every user, with the paired Wilcoxon test of test_skip against test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ttds_core.cases import Case
from ttds_core.config import load_params, seed_everything
from ttds_core.io import read_parquet, write_json

SETS = ("train_last", "valid", "test", "test_skip")


def contexts(items: list[int], which: str) -> tuple[list[int], int]:
    """(items before the target, target) of one user's case set."""
    train, valid, test = items[:-2], items[-2], items[-1]
    return {"train_last": (train[:-1], train[-1]), "valid": (train, valid),
            "test": (train + [valid], test), "test_skip": (train, test)}[which]


def ndcg_hr(ranks: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    r = np.where(np.isfinite(ranks) & (ranks > 0), ranks, np.inf)
    return np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0), (r <= k).astype(float)


def paired_wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Wilcoxon signed-rank p of two per-user score arrays; 1.0 where they are identical
    (scipy refuses an all-zero difference)."""
    from scipy import stats

    return float(stats.wilcoxon(a, b).pvalue) if np.any(a != b) else 1.0


def ttds_ranks(root: Path, params: dict, sequences: pd.DataFrame) -> dict[str, np.ndarray]:
    from ttds_core.evaluate import eval_settings
    from ttds_core.ranker import PromptBuilder, ranker_for
    from ttds_core.recommender import load_recommender

    cfg = eval_settings(params)
    rec = load_recommender(params, model_dir=root / "data" / "model", backbone_dir=root / "data" / "backbone")
    ranker, _ = ranker_for(rec.model, rec.tokenizer, rec.item_sids, cfg.beams, cfg.scoring)
    builder = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, cfg.template, cfg.packed)
    return {which: case_ranks(ranker, builder, sequences, which, cfg) for which in SETS}


def case_ranks(ranker, builder, sequences: pd.DataFrame, which: str, cfg) -> np.ndarray:
    """Each user's rank (from 1; inf when not ranked) of the target of case set `which`,
    unmasked, by `ranker` with the prompts of `builder` (`cfg`: `evaluate.eval_settings`)."""
    from ttds_core.metrics import rank_of
    from ttds_core.ranker import rank_cases

    cases = []
    for user, items in zip(sequences["user_id"], sequences["items"]):
        before, target = contexts([int(i) for i in items], which)
        cases.append(Case(int(user), "test", before[-cfg.max_history:], before, target))
    ranked = rank_cases(ranker, builder, cases, cfg.batch_size, modes=(False,), progress=which)[False]
    return np.asarray([rank_of(c.target, [i for i, _ in r]) or np.inf for c, r in zip(cases, ranked)], dtype=float)


def baseline_ranks(name: str, params: dict, processed: Path, users: np.ndarray) -> dict[str, np.ndarray]:
    """Ranks of `users` (in user_id order) after training `name` on every user, as the stage does."""
    from ttds_core.baselines import MODELS, model_config
    from ttds_core.baselines.data import Split, load_split
    from ttds_core.baselines.loop import evaluate, train

    cfg = model_config(params, name)
    torch.set_num_threads(1)
    split = load_split(processed)
    seed_everything(cfg["seed"])
    model = MODELS[name](split.n_items, cfg["max_history"], cfg)
    if any(p.requires_grad for p in model.parameters()):
        train(model, split, cfg, torch.device("cpu"), select_masked=False)
    else:
        model.fit(split.train_sequences())
    ranked = split.only(users)
    out = {}
    for which in SETS:
        # a split whose "test" case is this set's (context, target): sequences context + [target]
        seqs = []
        for s in ranked.sequences:
            before, target = contexts([int(i) for i in s], which)
            seqs.append(np.asarray(before + [target]))
        shifted = Split(ranked.user_ids, seqs, split.n_items)
        out[which] = evaluate(model, shifted, "test", cfg["max_history"], cfg["eval_batch_size"],
                              torch.device("cpu"), masked_too=False)[False].astype(float)
    return out


def main(argv=None) -> dict:

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the workspace holding the trained TTDS")
    ap.add_argument("--out", default="docs/bench/benchmark/context_shift.json")
    ap.add_argument("--max-users", type=int, default=None, help="the first N users only (a smoke test)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    params = load_params(root / "params.yaml")  # schema-checked
    processed = root / "data" / "processed"
    sequences = read_parquet(processed / "sequences.parquet", ["user_id", "items"]).sort_values("user_id")
    sequences = sequences[sequences["items"].map(len) >= 4].reset_index(drop=True)  # train_last needs 2 train items
    if args.max_users:
        sequences = sequences.head(args.max_users)
    results = {"users": int(len(sequences)), "models": {}}
    per_model = {"TTDS": ttds_ranks(root, params, sequences)}
    for name in ("sasrec", "mostpop"):
        per_model[name] = baseline_ranks(name, params, processed, sequences["user_id"].to_numpy(np.int64))
    for model, ranks in per_model.items():
        row = {}
        for which in SETS:
            nd, hr = ndcg_hr(ranks[which])
            row[which] = {"NDCG@10": round(float(nd.mean()), 4), "HR@10": round(float(hr.mean()), 4)}
        a, b = ndcg_hr(ranks["test_skip"])[0], ndcg_hr(ranks["test"])[0]
        row["test_skip_vs_test_wilcoxon_p"] = paired_wilcoxon_p(a, b)
        results["models"][model] = row
        print(model, {w: row[w]["NDCG@10"] for w in SETS}, "p(test_skip vs test) =",
              f"{row['test_skip_vs_test_wilcoxon_p']:.3g}")
    write_json(args.out, results)
    return results


if __name__ == "__main__":
    from ttds_core.cli import user_errors

    with user_errors():  # a bad params file or workspace: one line, no traceback
        main()
