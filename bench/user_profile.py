"""Is the user's profile one purchase stale at test time, and does that cost TTDS?

    python -m bench.user_profile --root <workspace> [--out FILE] [--read-test]

The user tower's text, and so the user's SID, is built from the training interactions only
(`ttds_core.user_text`). For the validation target that profile is fresh: it holds
everything before the target. For the test target it is one purchase stale: the validation
item is in the prompt's item history but never in the user text. Rebuilding the profile from
everything before the test target (training and validation interactions) leaks nothing, and
is what an ID model does implicitly by reading the longer history.

With the trained model of the workspace at `--root`, on every user:

- **validation** (decides): the usual fresh profile against one made stale the same way
  (built without the last training interaction). If staleness costs on validation, a fresh
  profile should gain at test.
- **test** (`--read-test`: read once, after the decision): the usual, stale profile against
  the fresh one.

A profile is rendered by the preprocess rule and given SIDs exactly as `evaluate` derives
the test-time profile (`ttds_core.user_profile.user_sids_of`: for a static index, embedded
by the backbone as the `embed` stage does, coded by the model's final user quantizer, a unique
SID by the collision suffix among all users; for a dynamic one, as one more refresh would).
The usual arm is the model's own user table; the same derivation applied to the usual profile
reports how much of that table it reproduces (all of it for a static index embedded on the
same machine; for a dynamic index, what the hysteresis keeps of it).
Unmasked NDCG@10 / HR@10 and the paired Wilcoxon test. Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from ttds_core.config import load_params
from ttds_core.io import read_parquet, write_json

from bench.context_shift import case_ranks, ndcg_hr, paired_wilcoxon_p


def profile_texts(inter: pd.DataFrame, titles: np.ndarray, params: dict, which: str) -> list[str]:
    """Every user's text: `usual` (training rows) or `stale` (less the last training row)."""
    from ttds_core.user_text import UserTextRule, user_texts

    inter = inter.sort_values(["user_id", "pos"]).reset_index(drop=True)
    split = inter["split"].copy()
    if which == "stale":
        train = inter.index[split == "train"]
        last = inter.loc[train].groupby("user_id").tail(1).index
        split[last] = "dropped"
    inter = inter.assign(split=split)
    return user_texts(inter, titles, UserTextRule.from_params(params))[0]


def main(argv=None) -> dict:
    import torch

    from ttds_core.config import seed_everything
    from ttds_core.evaluate import eval_settings
    from ttds_core.ranker import PromptBuilder, ranker_for
    from ttds_core.recommender import load_recommender
    from ttds_core.user_profile import test_time_texts, user_sids_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the workspace holding the trained TTDS")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    ap.add_argument("--read-test", action="store_true", help="also rank test with the usual and the fresh profile")
    ap.add_argument("--max-users", type=int, default=None, help="the first N users only (a smoke test)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    params = load_params(root / "params.yaml")  # schema-checked
    cfg = eval_settings(params)
    seed_everything(cfg.seed)
    torch.set_num_threads(1)
    processed = root / "data" / "processed"
    sequences = read_parquet(processed / "sequences.parquet", ["user_id", "items"]).sort_values("user_id")
    inter = read_parquet(processed / "interactions.parquet", ["user_id", "item_id", "pos", "split"])
    items = read_parquet(processed / "items.parquet", ["item_id", "title"]).sort_values("item_id")
    titles = items["title"].to_numpy()

    rec = load_recommender(params, model_dir=root / "data" / "model", backbone_dir=root / "data" / "backbone")
    if rec.user_sids is None:
        raise SystemExit("the model has no user tower: nothing to measure")
    tables = {}
    for which in ("usual", "stale") + (("fresh",) if args.read_test else ()):
        texts = (test_time_texts(processed, params)[0] if which == "fresh"  # what evaluate ranks test with
                 else profile_texts(inter, titles, params, which))
        tables[which] = user_sids_of(texts, params, rec, root / "data" / "model", root / "data" / "backbone")
    own = rec.user_sids.sort_values("user_id").reset_index(drop=True)
    same = float((tables["usual"]["sid"].to_numpy() == own["sid"].to_numpy()).mean())
    print(f"usual profile re-derived: {same:.1%} of the model's user SIDs", flush=True)
    changed = {w: float((t["sid"].to_numpy() != own["sid"].to_numpy()).mean()) for w, t in tables.items()}
    tables["usual"] = own  # the arm every other is paired with is the model's own table

    ranker, _ = ranker_for(rec.model, rec.tokenizer, rec.item_sids, cfg.beams, cfg.scoring)
    users = sequences.head(args.max_users) if args.max_users else sequences

    def ranks(split: str, table: pd.DataFrame) -> np.ndarray:
        builder = PromptBuilder(rec.tokenizer, rec.item_sids, table, cfg.template, cfg.packed)
        return case_ranks(ranker, builder, users, split, cfg)

    def compare(split: str, base: str, other: str) -> dict:
        a, b = ndcg_hr(ranks(split, tables[base])), ndcg_hr(ranks(split, tables[other]))
        p = paired_wilcoxon_p(a[0], b[0])
        row = {f"{base} NDCG@10": round(float(a[0].mean()), 4), f"{other} NDCG@10": round(float(b[0].mean()), 4),
               f"{base} HR@10": round(float(a[1].mean()), 4), f"{other} HR@10": round(float(b[1].mean()), 4),
               "wilcoxon_p": p}
        print(split, row, flush=True)
        return row

    result = {"root_params": {k: params[k] for k in ("data", "index", "tower")}, "users": int(len(users)),
              "usual_reproduces_model_table": same, "share_of_user_sids_changed": changed,
              "valid": compare("valid", "usual", "stale")}
    if args.read_test:
        result["test"] = compare("test", "usual", "fresh")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    from ttds_core.cli import user_errors

    with user_errors():  # a bad params file or workspace: one line, no traceback
        main()
