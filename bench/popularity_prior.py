"""Choose the popularity prior's strength (and the scoring) on validation: one prefill, every lambda.

    python -m bench.popularity_prior --root <workspace> [--lambdas 0 0.1 0.2 ...] [--beams N]
                                     [--scorings sid trie] [--copy-penalties 0 0.5 1 ...]
                                     [--out docs/bench/benchmark/popularity_prior.json]

Ranks every user's **validation** case with the trained TTDS of the workspace at `--root`
(`data/model`, `data/processed`, `params.yaml`) once per lambda of `eval.popularity_prior`
(ranking by log P(SID | prompt) + lambda * log(training count + 1), `ttds_core/ranker.py`),
masked and unmasked, each batch prefilled once for all of them. It reports HR@1/5/10 and
NDCG@5/10 per lambda, NDCG@10 by the validation target's popularity (three equal groups of
users: tail, middle, head), the paired Wilcoxon p of each lambda against lambda = 0, and
the lambda with the best unmasked validation NDCG@10 (the selection rule of every model
here). With `--scorings`, every (scoring, lambda) pair of `eval.scoring` values is ranked
from the same prefill, and each row also has its paired p against the workspace's own
scoring at the same lambda. With `--copy-penalties`, every value of `eval.copy_penalty` (beta:
items under a first code of the prompt's history lose beta) is crossed with the rest, and each
row also has its paired p against beta = 0 at the same scoring and lambda. Test is not read: set
the chosen values with `-S eval.popularity_prior=... -S eval.scoring=... -S eval.copy_penalty=...`
and the `evaluate` stage reports them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.context_shift import ndcg_hr, paired_wilcoxon_p
from ttds_core.cases import eval_cases, item_counts, item_span, select_users
from ttds_core.config import load_params, seed_everything
from ttds_core.io import read_parquet, write_json
from ttds_core.metrics import metric_table, rank_of

DEFAULT_LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)


def ndcg10(ranks: list[int | None]) -> np.ndarray:
    """Per-user NDCG@10 of 1-based ranks (None: outside the beams)."""
    return ndcg_hr(np.asarray([np.inf if r is None else r for r in ranks], dtype=float))[0]


def popularity_groups(counts: np.ndarray, targets: list[int]) -> np.ndarray:
    """0 / 1 / 2 = tail / middle / head third of the cases by their target's training count."""
    order = np.argsort(counts[np.asarray(targets)], kind="stable")
    groups = np.empty(len(targets), dtype=np.int64)
    groups[order] = np.arange(len(targets)) * 3 // max(len(targets), 1)
    return groups


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    from ttds_core.evaluate import eval_settings
    from ttds_core.errors import TTDSError
    from ttds_core.ranker import SCORINGS, PromptBuilder, Ranker, check_copy_penalty, ranker_for
    from ttds_core.recommender import load_recommender

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the workspace holding the trained TTDS")
    ap.add_argument("--lambdas", type=float, nargs="+", default=list(DEFAULT_LAMBDAS))
    ap.add_argument("--out", default="docs/bench/benchmark/popularity_prior.json")
    ap.add_argument("--max-users", type=int, default=None, help="a seeded sample of N users (a smoke test)")
    ap.add_argument("--beams", type=int, default=None, help="beam width (default: the workspace's eval.beams)")
    ap.add_argument("--scorings", nargs="+", default=None,
                    help="eval.scoring values to compare (default: the workspace's eval.scoring only)")
    ap.add_argument("--copy-penalties", type=float, nargs="+", default=None,
                    help="eval.copy_penalty values to cross with the rest (default: the workspace's only)")
    args = ap.parse_args(argv)
    lambdas = sorted(set(args.lambdas) | {0.0})
    root = Path(args.root)
    params = load_params(root / "params.yaml")  # schema-checked
    if args.beams is not None:
        params["eval"]["beams"] = args.beams
    cfg = eval_settings(params)
    scorings = list(dict.fromkeys([cfg.scoring] + (args.scorings or [])))
    # with --copy-penalties, beta = 0 is always ranked too: every row is paired against it
    betas = sorted({cfg.copy_penalty} | set(args.copy_penalties or []) | ({0.0} if args.copy_penalties else set()))
    for beta in betas:
        check_copy_penalty(beta)
    bad = [s for s in scorings if s not in SCORINGS]
    if bad:
        raise TTDSError(f"--scorings: {bad[0]!r}, expected one of {', '.join(SCORINGS)}")
    seed_everything(cfg.seed)
    sequences = read_parquet(root / "data" / "processed" / "sequences.parquet", ["user_id", "items"])
    users = select_users(sequences, args.max_users or cfg.max_users, cfg.seed)
    cases = eval_cases(users, "valid", cfg.max_history)
    rec = load_recommender(params, model_dir=root / "data" / "model", backbone_dir=root / "data" / "backbone")
    n_items = item_span(rec.item_sids["item_id"], sequences)
    counts = item_counts(sequences, n_items)          # training interactions only: no target leaks
    ranker, tables = ranker_for(rec.model, rec.tokenizer, rec.item_sids, cfg.beams, cfg.scoring)
    rankers = {s: ranker if s == cfg.scoring else Ranker(rec.model, rec.tokenizer, tables, cfg.beams, s)
               for s in scorings}   # one prefill serves them all: it does not depend on the scoring
    priors = {lam: tables.prior(counts + 1.0, lam) for lam in lambdas}
    builder = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, cfg.template, cfg.packed)
    prompts = [builder(c.user_id, c.history) for c in cases]
    order = sorted(range(len(cases)), key=lambda i: (len(prompts[i]), i))
    grid = [(s, lam, beta) for s in scorings for lam in lambdas for beta in betas]
    ranks = {(s, lam, beta, m): [None] * len(cases) for s, lam, beta in grid for m in (False, True)}
    batches = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    for idx in tqdm(batches, desc="validation", unit="batch"):
        batch = ranker.encode([prompts[i] for i in idx])
        history = [cases[i].history for i in idx]
        for s, lam, beta in grid:
            rankers[s].prior, rankers[s].copy_penalty = priors[lam], beta
            for masked in (False, True):
                excluded = [cases[i].seen for i in idx] if masked else None
                for i, ranked in zip(idx, rankers[s].search(batch, excluded, history=history)):
                    ranks[(s, lam, beta, masked)][i] = rank_of(cases[i].target, [item for item, _ in ranked])
    groups = popularity_groups(counts, [c.target for c in cases])

    nd = {key: ndcg10(r) for key, r in ranks.items()}
    rows = []
    for s, lam, beta in grid:
        row = {"scoring": s, "lambda": lam, "copy_penalty": beta}
        for masked in (False, True):
            key = "valid_masked" if masked else "valid"
            mine = nd[(s, lam, beta, masked)]
            row[key] = metric_table(ranks[(s, lam, beta, masked)], cfg.ks)
            row[key + "_vs_lambda0_wilcoxon_p"] = paired_wilcoxon_p(mine, nd[(s, 0.0, beta, masked)])
            if s != cfg.scoring:   # against the workspace's scoring at the same lambda
                row[key + f"_vs_{cfg.scoring}_wilcoxon_p"] = paired_wilcoxon_p(mine, nd[(cfg.scoring, lam, beta, masked)])
            if len(betas) > 1:     # against no copy penalty at the same scoring and lambda
                row[key + "_vs_copy_penalty0_wilcoxon_p"] = paired_wilcoxon_p(mine, nd[(s, lam, 0.0, masked)])
            row[key + "_NDCG@10_by_target_popularity"] = {
                name: round(float(mine[groups == g].mean()), 4) for g, name in enumerate(("tail", "middle", "head"))}
        rows.append(row)
        print(f"{s:5s} lambda {lam:5.2f} beta {beta:4.2f}  valid NDCG@10 {row['valid']['NDCG@10']:.4f}  "
              f"HR@10 {row['valid']['HR@10']:.4f}  masked NDCG@10 {row['valid_masked']['NDCG@10']:.4f}  "
              f"p {row['valid_vs_lambda0_wilcoxon_p']:.3g}  tail/middle/head {row['valid_NDCG@10_by_target_popularity']}")
    # ties: the workspace's scoring, then the weaker prior, then the weaker copy penalty
    best = max(rows, key=lambda r: (r["valid"]["NDCG@10"], r["scoring"] == cfg.scoring, -r["lambda"],
                                    -r["copy_penalty"]))
    result = {"workspace": root.resolve().name, "split": "valid", "users": len(cases), "beams": cfg.beams,
              "scoring": cfg.scoring, "scorings": scorings, "copy_penalties": betas,
              "selection": "best unmasked validation NDCG@10 (ties: the workspace's scoring, then smaller lambda, "
                           "then smaller copy penalty)",
              "chosen_lambda": best["lambda"], "chosen_scoring": best["scoring"],
              "chosen_copy_penalty": best["copy_penalty"], "rows": rows}
    print(f"chosen on validation: eval.popularity_prior = {best['lambda']}, eval.scoring = {best['scoring']}, "
          f"eval.copy_penalty = {best['copy_penalty']}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    from ttds_core.cli import user_errors

    with user_errors():  # a bad params file or workspace: one line, no traceback
        main()
