"""How much of "what is bought next" the item index encodes: the share of consecutive
training purchases whose SIDs share their first m codes, against the same pairs with the
later item shuffled (chance).

    python -m bench.code_sharing --root <workspace> [--table data/sids/items.parquet] [--out FILE]

Reads the item SID table `--table` (default: the index as `build_sids` made it; a dynamic
index's table at the end of training is `data/model/item_sids.parquet`) and
`data/processed/sequences.parquet` of a workspace; only training transitions (`items[:-2]` of
each user) are counted. docs/benchmark.md and
docs/method.md ("Collaborative mix") quote it for the text-only and the collaborative index.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ttds_core.cli import user_errors
from ttds_core.collaborative import transition_pairs
from ttds_core.dynamic import table_codes
from ttds_core.io import read_parquet, write_json


def sharing(codes: np.ndarray, pairs: np.ndarray, seed: int = 0) -> dict:
    """{prefix length m: (share of pairs sharing their first m codes, the same with the later
    item shuffled)} for m = 1 .. M-1."""
    shuffled = np.random.default_rng(seed).permutation(pairs[:, 1])
    out = {}
    for m in range(1, codes.shape[1]):
        same = (codes[pairs[:, 0], :m] == codes[pairs[:, 1], :m]).all(1).mean()
        chance = (codes[pairs[:, 0], :m] == codes[shuffled, :m]).all(1).mean()
        out[m] = {"consecutive": round(float(same), 4), "shuffled": round(float(chance), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="a workspace that ran build_sids")
    ap.add_argument("--table", default="data/sids/items.parquet", help="the item SID table, inside the workspace")
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    root = Path(args.root)
    codes = table_codes(read_parquet(root / args.table, ["item_id", "codes"]), "item_id")
    sequences = read_parquet(root / "data" / "processed" / "sequences.parquet", ["user_id", "items"])
    pairs = transition_pairs(list(sequences["items"]))
    result = {"table": args.table, "pairs": int(len(pairs)), "items": int(len(codes)), "prefix": sharing(codes, pairs)}
    print(json.dumps(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    with user_errors():
        main()
