"""Does the fine-tuned LLM copy first codes from its prompt? Its first-code distribution
against how often next items really share a first code with the history.

    python -m bench.copy_bias --root <workspace> [--max-users N] [--out docs/bench/benchmark/copy_bias.json]

For every (or a seeded `--max-users` sample of) user of the workspace at `--root`
(`data/model`, `data/processed`, `params.yaml`), the prompt of the **validation** case is
prefilled once and the model's distribution over first codes is read at the first step
(the item tower's depth-1 tokens, renormalised over them). It reports, over the users:

- `model_mass_on_history_first_codes`: the mean probability the model gives the first codes
  of the items in the prompt's history;
- `targets_with_a_history_first_code`: the share of targets whose first code is one of them;
- `top1_first_code_in_history`: the share of users whose most likely first code is one of them;
- `odds_ratio`: (mass / (1 - mass)) / (share / (1 - share)); its log is the penalty on those
  codes that would make the model's mass match the share (`eval.copy_penalty`).

The same for a training case per user (the last training item as target, the items before
it as history): rows the model was trained on. Test is not read.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np


def first_code_rows(cases, first: dict, cols: list[int], probs) -> dict:
    """The summary above for `cases` and their first-code distributions `probs` [n, len(cols)]:
    `first[item]` is the item's first SID token, `cols` the first-step columns' tokens."""
    mass, share, top1 = [], [], []
    for case, row in zip(cases, probs):
        history = {first[i] for i in case.history}
        on = np.asarray([c in history for c in cols])
        mass.append(float(row[on].sum()))
        share.append(first[case.target] in history)
        top1.append(bool(on[int(np.argmax(row))]))
    m, s = float(np.mean(mass)), float(np.mean(share))
    odds = (m / (1 - m)) / (s / (1 - s)) if 0 < m < 1 and 0 < s < 1 else float("nan")
    return {"users": len(cases), "model_mass_on_history_first_codes": round(m, 4),
            "targets_with_a_history_first_code": round(s, 4), "top1_first_code_in_history": round(float(np.mean(top1)), 4),
            "odds_ratio": round(odds, 3), "log_odds_ratio": round(math.log(odds), 3) if odds > 0 else None}


def main(argv=None) -> dict:
    import torch
    from tqdm.auto import tqdm

    from ttds_core.cases import Case, eval_cases, select_users
    from ttds_core.config import load_params, seed_everything
    from ttds_core.evaluate import eval_settings
    from ttds_core.io import read_parquet, write_json
    from ttds_core.ranker import PromptBuilder, ranker_for
    from ttds_core.recommender import load_recommender

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the workspace holding the trained TTDS")
    ap.add_argument("--max-users", type=int, default=None, help="a seeded sample of N users")
    ap.add_argument("--out", default="docs/bench/benchmark/copy_bias.json")
    args = ap.parse_args(argv)
    root = Path(args.root)
    params = load_params(root / "params.yaml")  # schema-checked
    cfg = eval_settings(params)
    seed_everything(cfg.seed)
    sequences = read_parquet(root / "data" / "processed" / "sequences.parquet", ["user_id", "items"])
    users = select_users(sequences, args.max_users, cfg.seed)
    rec = load_recommender(params, model_dir=root / "data" / "model", backbone_dir=root / "data" / "backbone")
    ranker, tables = ranker_for(rec.model, rec.tokenizer, rec.item_sids, cfg.beams, cfg.scoring)
    first = {item: tokens[0] for item, tokens in tables.sequences.items()}   # an item's first SID token
    cols = tables.cols[0].tolist()
    builder = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, cfg.template, cfg.packed)
    valid = eval_cases(users, "valid", cfg.max_history)
    train = [Case(c.user_id, "train", c.seen[:-1][-cfg.max_history:], c.seen[:-1], c.seen[-1])
             for c in valid if len(c.seen) >= 2]
    result = {"workspace": root.resolve().name, "scoring": cfg.scoring}
    for name, cases in (("valid", valid), ("train_last", train)):
        probs = []
        for start in tqdm(range(0, len(cases), cfg.batch_size), desc=name, unit="batch"):
            part = cases[start:start + cfg.batch_size]
            cols = ranker.first_log_probs(ranker.encode([builder(c.user_id, c.history) for c in part]))
            probs.append(torch.softmax(cols, -1).cpu().numpy())
        result[name] = first_code_rows(cases, first, cols, np.concatenate(probs))
        print(name, result[name])
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    from ttds_core.cli import user_errors

    with user_errors():  # a bad params file or workspace: one line, no traceback
        main()
