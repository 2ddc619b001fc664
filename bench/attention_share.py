"""Where does the next-item position of a trained TTDS look?

    python -m bench.attention_share [--root .] [--users 200] [--out attention.json]

For the validation prompts of a seeded sample of users (the model's packed seqrec prompt:
instruction with the user SID, then the user's training items in order, each SID closed by
EOS), this reads the attention of the last position, the EOS whose continuation is the next
item's first code, in every layer (heads averaged), and splits it into: the newest item's SID
tokens, the older items (their SID tokens and EOS), the user SID tokens, the rest of the
instruction, and the position itself. A model that ignores the newest item because it never
looks at it shows a small `newest_item` share; one that looks but does not use it shows a large
share and no change in ranking when the item is left out (`bench.context_shift`). Packed
format only. Not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ttds_core.errors import TTDSError
from ttds_core.io import read_parquet, write_json

PARTS = ("newest_item", "older_items", "user", "instruction", "itself")


def token_ids(tokenizer, sids) -> set[int]:
    """Every token id the SID strings `sids` are made of."""
    return {t for s in sids for t in tokenizer(str(s), add_special_tokens=False)["input_ids"]}


def parts_of(ids: list[int], eos: int, item_tokens: set[int], user_tokens: set[int]) -> dict[str, list[int]]:
    """Positions of each part of one packed prompt that ends with the newest item's EOS."""
    q = len(ids) - 1
    ends = [p for p, t in enumerate(ids) if t == eos]
    first_item = next((p for p, t in enumerate(ids) if t in item_tokens), None)
    if first_item is None or ids[q] != eos or len(ends) < 2 or ends[0] < first_item:
        raise TTDSError("attention_share: expected a packed prompt of at least two items, each closed by EOS")
    user = [p for p in range(first_item) if ids[p] in user_tokens]
    instruction = [p for p in range(first_item) if ids[p] not in user_tokens]
    return {"newest_item": list(range(ends[-2] + 1, q)), "older_items": list(range(first_item, ends[-2] + 1)),
            "user": user, "instruction": instruction, "itself": [q]}


def attention_shares(rec, builder, cases: list[tuple[int, list[int]]]) -> list[dict[str, float]]:
    """Per layer, the mean share of the last position's attention on each part."""
    eos = rec.tokenizer.eos_token_id
    items = token_ids(rec.tokenizer, rec.item_sids["sid"])
    users = token_ids(rec.tokenizer, rec.user_sids["sid"]) if rec.user_sids is not None else set()
    sums: list[dict[str, float]] = []
    for user_id, history in cases:
        ids = builder(user_id, history)
        with torch.no_grad():
            out = rec.model(input_ids=torch.tensor([ids], device=rec.device), output_attentions=True)
        parts = parts_of(ids, eos, items, users)
        for layer, att in enumerate(out.attentions):
            row = att[0, :, -1, :].float().mean(0).cpu()  # heads averaged: the last query's weights
            if layer == len(sums):
                sums.append(dict.fromkeys(PARTS, 0.0))
            for name, pos in parts.items():
                sums[layer][name] += float(row[pos].sum()) if pos else 0.0
    return [{k: round(v / len(cases), 4) for k, v in s.items()} for s in sums]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="workspace with params.yaml, data/model, data/processed")
    ap.add_argument("--users", type=int, default=200, help="users sampled (seed 0) among those with 2+ training items")
    ap.add_argument("--out", default=None, help="JSON file for the result (default: print only)")
    args = ap.parse_args(argv)

    from ttds_core.config import load_params
    from ttds_core.evaluate import eval_settings
    from ttds_core.ranker import PromptBuilder
    from ttds_core.recommender import load_recommender

    root = Path(args.root)
    params = load_params(root / "params.yaml")
    cfg = eval_settings(params)
    if not cfg.packed:
        raise TTDSError("attention_share reads the packed seqrec format (tasks.seqrec_format: packed)")
    rec = load_recommender(params, model_dir=root / "data" / "model", backbone_dir=root / "data" / "backbone")
    rec.model.set_attn_implementation("eager")  # fused kernels return no attention weights
    builder = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, cfg.template, cfg.packed)
    seqs = read_parquet(root / "data" / "processed" / "sequences.parquet", ["user_id", "items"])
    pool = [(int(u), [int(i) for i in items][:-2][-cfg.max_history:])
            for u, items in zip(seqs["user_id"], seqs["items"]) if len(items) >= 4]
    pick = np.random.default_rng(0).choice(len(pool), min(args.users, len(pool)), replace=False)
    layers = attention_shares(rec, builder, [pool[i] for i in sorted(pick)])
    result = {"users": len(pick), "context": "validation (the training items)", "layers": layers}
    for layer, shares in enumerate(layers):
        print(f"layer {layer + 1}: " + "  ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    if args.out:
        write_json(Path(args.out), result)


if __name__ == "__main__":
    from ttds_core.cli import user_errors

    with user_errors():  # a bad params file or workspace: one line, no traceback
        main()
