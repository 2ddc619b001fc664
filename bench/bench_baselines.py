"""Classic baselines on a full dataset (or any data params), outside the tracked outputs.

    python -m bench.bench_baselines --out SCRATCH_DIR [--name Games] [--root ../shared/data/amazon2018/Games]
        [--models sasrec,gru4rec] [--epochs 30] [--max-minutes 60] [--set baselines.batch_size=128 ...]

Starts from `params.yaml`, sets `data.name` / `data.root`, every user (`data.max_users: null`)
and, for datasets without item text (Instruments), `data.require_text: false`; runs
`preprocess` into SCRATCH_DIR/processed (once), then each baseline, writing
SCRATCH_DIR/metrics/<model>.json and SCRATCH_DIR/out/<model>/ranks.parquet. Prints one
summary line per model (test HR@10 / NDCG@10, unmasked and masked, epochs, seconds).
On a GPU machine `baselines.device: auto` picks CUDA.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

from ttds_core import preprocess
from ttds_core.baselines import run
from ttds_core.config import load_params


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="scratch folder for processed data, metrics and ranks")
    ap.add_argument("--name", default="Games", help="data.name (file prefix inside the data root)")
    ap.add_argument("--root", default=None, help="data.root (default: ../shared/data/amazon2018/<name>)")
    ap.add_argument("--models", default="sasrec,gru4rec")
    ap.add_argument("--epochs", type=int, default=None, help="baselines.epochs")
    ap.add_argument("--max-minutes", type=float, default=None, help="baselines.max_minutes (training budget)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other params override, YAML value (repeatable)")
    ap.add_argument("--params", default="params.yaml")
    return ap.parse_args(argv)


def set_dotted(params: dict, key: str, value) -> None:
    node = params
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def build_params(args) -> dict:
    params = copy.deepcopy(load_params(args.params))
    overrides = {"data.name": args.name, "data.root": args.root or f"../shared/data/amazon2018/{args.name}",
                 "data.max_users": None, "data.require_text": args.name != "Instruments"}
    if args.epochs is not None:
        overrides["baselines.epochs"] = args.epochs
    if args.max_minutes is not None:
        overrides["baselines.max_minutes"] = args.max_minutes
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    for key, value in overrides.items():
        set_dotted(params, key, value)
    return params


def main(argv=None) -> None:
    args = parse_args(argv)
    params, out = build_params(args), Path(args.out)
    if not (out / "processed" / "sequences.parquet").exists():
        preprocess.run(params, out_dir=out / "processed", metrics_path=out / "preprocess.json")
    for name in args.models.split(","):
        m = run(params, name, processed_dir=out / "processed", metrics_dir=out / "metrics", out_dir=out / "out")
        t, tm = m["test"], m["test_masked"]
        print(f"{name}: users {m['users']} epochs {m['epochs']} (best {m['best_epoch']}) {m['seconds']:.0f}s | "
              f"test HR@10 {t['HR@10']:.4f} NDCG@10 {t['NDCG@10']:.4f} | masked HR@10 {tm['HR@10']:.4f} "
              f"NDCG@10 {tm['NDCG@10']:.4f}", flush=True)


if __name__ == "__main__":
    main()
