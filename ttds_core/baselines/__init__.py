"""Classic sequential-recommendation baselines on exactly the split of `evaluate`.

`run(params, name)` is the `baseline@<name>` DVC stage: it reads
`data/processed/sequences.parquet`, trains `name` on the training part only, ranks the
validation and test targets of the users `evaluate` ranks (`eval.max_users`) over the full item set (unmasked and history-masked) and
writes `metrics/baselines/<name>.json` (the `metrics/eval.json` format) and
`data/baselines/<name>/ranks.parquet` (the `data/eval/ranks.parquet` format).
While it trains, `data/baselines/checkpoints/<name>` holds the state after the last
epoch, so a killed run started again goes on from there (one made from other params or
data is set aside as `<name>.stale`); both are removed once the outputs are written.
Hyper-parameters come from `baselines.*`, overridable per model as `baselines.<name>.*`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import get, seed_everything
from ..errors import TTDSError
from ..io import atomic_dir, write_json, write_parquet
from . import bert4rec, fmlprec, gru4rec, markov, mostpop, sasrec
from .data import load_split
from .loop import fit_and_evaluate

MODELS = {"mostpop": mostpop.build, "markov": markov.build, "sasrec": sasrec.build, "gru4rec": gru4rec.build,
          "bert4rec": bert4rec.build, "fmlprec": fmlprec.build}

# key -> (type, minimum); each may be overridden per model as baselines.<name>.<key>
_KEYS = {"epochs": (int, 1), "batch_size": (int, 1), "eval_batch_size": (int, 1),
         "lr": (float, 0.0), "weight_decay": (float, 0.0), "hidden": (int, 1), "layers": (int, 1),
         "heads": (int, 1), "dropout": (float, 0.0), "patience": (int, 1), "mask_prob": (float, 0.0)}


def model_config(params: dict, name: str) -> dict:
    """The `baselines` section merged with `baselines.<name>`, type-checked."""
    if name not in MODELS:
        raise TTDSError(f"baseline {name!r}: unknown, expected one of {', '.join(MODELS)}")
    cfg = {}
    for key, (kind, low) in _KEYS.items():
        shared = get(params, f"baselines.{key}", kind, min_value=low)
        cfg[key] = get(params, f"baselines.{name}.{key}", kind, default=shared, min_value=low)
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise TTDSError(f"params: 'baselines.dropout' = {cfg['dropout']}, expected in [0, 1)")
    if not 0.0 < cfg["mask_prob"] < 1.0:
        raise TTDSError(f"params: 'baselines.mask_prob' = {cfg['mask_prob']}, expected in (0, 1)")
    if cfg["hidden"] % cfg["heads"]:
        raise TTDSError(f"params: baselines hidden {cfg['hidden']} must be divisible by heads {cfg['heads']}")
    cfg["device"] = get(params, f"baselines.{name}.device", str,
                        default=get(params, "baselines.device", str, choices=("auto", "cpu", "cuda")),
                        choices=("auto", "cpu", "cuda"))
    cfg["max_minutes"] = get(params, f"baselines.{name}.max_minutes", (int, float),
                             default=get(params, "baselines.max_minutes", (int, float), default=None,
                                         min_value=0), min_value=0)
    cfg["max_history"] = get(params, "data.max_history", int, min_value=1)
    cfg["seed"] = get(params, "seed", int)
    return cfg


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TTDSError("params: 'baselines.device' = 'cuda' but no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def ranked_users(params: dict, split) -> np.ndarray:
    """The users `evaluate` ranks for TTDS (`eval.max_users`, seeded), so that baseline and
    TTDS metrics are over the same users."""
    from ..cases import select_users

    table = pd.DataFrame({"user_id": split.user_ids, "items": [s.tolist() for s in split.sequences]})
    chosen = select_users(table, get(params, "eval.max_users", int, default=None, min_value=1),
                          get(params, "seed", int))
    return chosen["user_id"].to_numpy(np.int64)


def run(params: dict, name: str, processed_dir: str | Path = "data/processed",
        metrics_dir: str | Path = "metrics/baselines", out_dir: str | Path = "data/baselines") -> dict:
    """Train and evaluate baseline `name`; write its metrics and per-user ranks.

    Training checkpoints go to `<out_dir>/checkpoints/<name>` (a set-aside one to `<name>.stale`)
    until the outputs are written.
    """
    cfg = model_config(params, name)
    select_masked = get(params, "eval.mask_history", bool, default=False)
    threads = get(params, "baselines.threads", int, default=1, allow_none=True, min_value=1)
    if threads:
        torch.set_num_threads(threads)
    split = load_split(processed_dir)
    seed_everything(cfg["seed"])
    model = MODELS[name](split.n_items, cfg["max_history"], cfg)
    checkpoint = Path(out_dir) / "checkpoints" / name
    metrics, ranks, history = fit_and_evaluate(model, split, cfg, pick_device(cfg["device"]),
                                               select_masked=select_masked, checkpoint=checkpoint,
                                               eval_users=ranked_users(params, split))
    with atomic_dir(Path(out_dir) / name) as tmp:
        write_parquet(tmp / "ranks.parquet", ranks)
        write_json(tmp / "history.json", {
            "selected_on": "valid_masked NDCG@10" if select_masked else "valid NDCG@10",
            "config": cfg, "epochs": history})
    write_json(Path(metrics_dir) / f"{name}.json", metrics)
    shutil.rmtree(checkpoint, ignore_errors=True)
    shutil.rmtree(checkpoint.with_name(name + ".stale"), ignore_errors=True)  # superseded by the outputs
    if checkpoint.parent.is_dir() and not any(checkpoint.parent.iterdir()):
        checkpoint.parent.rmdir()
    return metrics
