"""The `build_sids` stage: every item's (and user's) codes from its tower's warmup quantizer,
made unique by the collision suffix (`sids`), as `data/sids/{items,users}.parquet` and
`metrics/sids.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .collaborative import item_vectors
from .config import get
from .errors import TTDSError
from .io import atomic_dir, read_json, read_npy, write_json, write_parquet
from .quantize import load_quantizer
from .sids import FILES, index_stats, resolve_collisions, row_groups, sid_table


def build_tower(quantizer_path: Path, x: np.ndarray, tower: str, max_suffix: int):
    """(table, stats) of one tower: quantize every row of `x` (the tower's vectors), resolve
    collisions."""
    q, cfg = load_quantizer(quantizer_path, in_dim=x.shape[1] if x.ndim == 2 else None)
    ids = np.arange(len(x))
    codes = q.codes(x, ids=ids).cpu().numpy()
    suffix = resolve_collisions(codes, ids, max_suffix=max_suffix)
    stats = index_stats(codes, suffix, cfg["codebook_size"])
    # Entities with identical text have identical embeddings and must collide: the
    # floor under collision_rate that no quantizer can go below.
    inverse, counts = row_groups(x)
    stats["identical_input_rate"] = float((counts[inverse] > 1).mean()) if len(x) else 0.0
    return sid_table(ids, codes, suffix, tower), stats


def _check_config(cfg: dict, params: dict, path: Path) -> None:
    """The quantizers on disk must match the current index params (else warmup is stale)."""
    for key in ("index.kind", "index.length", "index.codebook_size"):
        field = key.split(".")[1]
        want = get(params, key, str if field == "kind" else int)
        if cfg.get(field) != want:
            raise TTDSError(f"{path}: quantizer built with {key}={cfg.get(field)!r} but params say "
                            f"{want!r} (rerun the warmup stage)")


def run(params: dict, embeddings_dir: str | Path = "data/embeddings", quantizer_dir: str | Path = "data/quantizer",
        out_dir: str | Path = "data/sids", metrics_path: str | Path = "metrics/sids.json",
        processed_dir: str | Path = "data/processed") -> None:
    """The `build_sids` stage: data/sids/{items,users}.parquet and metrics/sids.json. Items are
    quantized from `collaborative.item_vectors`, the vectors warm-up trained on."""
    embeddings_dir, quantizer_dir = Path(embeddings_dir), Path(quantizer_dir)
    max_suffix = get(params, "index.max_suffix", int, min_value=0)
    towers = ["item", "user"] if get(params, "tower.user", bool) else ["item"]
    config = read_json(quantizer_dir / "config.json")
    metrics = {}
    with atomic_dir(out_dir) as tmp:
        for tower in towers:
            if tower not in config:
                raise TTDSError(f"{quantizer_dir / 'config.json'}: no {tower} quantizer (rerun the warmup stage)")
            _check_config(config[tower], params, quantizer_dir / "config.json")
            x = read_npy(embeddings_dir / f"{FILES[tower]}.npy").astype(np.float32)
            if tower == "item":
                x = item_vectors(params, x, processed_dir)
            table, stats = build_tower(quantizer_dir / f"{tower}.safetensors", x, tower, max_suffix)
            write_parquet(tmp / f"{FILES[tower]}.parquet", table)
            metrics[tower] = stats
    write_json(metrics_path, metrics)
