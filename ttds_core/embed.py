"""The `embed` stage: every item's and user's text -> X with the backbone LLM
(`embedding.embed_texts`), as `data/embeddings/{items,users}.npy` + `meta.json`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .backbone import describe, load_backbone
from .config import get
from .embedding import embed_texts, tokenize_texts
from .errors import TTDSError
from .io import atomic_dir, read_parquet, write_json, write_npy

OUT_DIR = "data/embeddings"
PROCESSED = "data/processed"


def _entity_texts(path: Path, id_col: str) -> list[str]:
    """Texts ordered by id; ids must be 0..n-1 (row i of the embedding = id i)."""
    df = read_parquet(path, columns=[id_col, "text"]).sort_values(id_col)
    if not np.array_equal(df[id_col].to_numpy(), np.arange(len(df))):
        raise TTDSError(f"{path}: '{id_col}' must be 0..n-1 without gaps")
    return df["text"].tolist()


def run(params: dict, processed_dir: str | Path = PROCESSED, out_dir: str | Path = OUT_DIR,
        backbone_dir: str | Path = "data/backbone", metrics_path: str | Path = "metrics/embed.json") -> None:
    """The `embed` stage: data/processed/{items,users}.parquet -> data/embeddings/."""
    processed_dir = Path(processed_dir)
    batch_size = get(params, "embed.batch_size", int, min_value=1)
    max_tokens = get(params, "model.max_text_tokens", int, min_value=1)
    item_texts = _entity_texts(processed_dir / "items.parquet", "item_id")
    user_texts = _entity_texts(processed_dir / "users.parquet", "user_id")
    model, tokenizer = load_backbone(params, backbone_dir=backbone_dir)
    torch.manual_seed(get(params, "seed", int, 42))
    timings, tokens = {}, {}
    with atomic_dir(out_dir) as tmp:
        for name, texts in (("items", item_texts), ("users", user_texts)):
            start = time.perf_counter()
            x = embed_texts(model, tokenizer, texts, batch_size=batch_size, max_tokens=max_tokens,
                            label=name[:-1])
            timings[name] = round(time.perf_counter() - start, 2)
            tokens[name] = sum(len(r) for r in tokenize_texts(tokenizer, texts, max_tokens, name[:-1]))
            if not np.isfinite(x).all():
                raise TTDSError(f"{processed_dir / (name + '.parquet')}: backbone produced non-finite "
                                "embeddings (try model.dtype: float32)")
            write_npy(tmp / f"{name}.npy", x)
        write_json(tmp / "meta.json", {
            "dim": int(model.config.hidden_size), "n_items": len(item_texts), "n_users": len(user_texts),
            "max_text_tokens": max_tokens, "pooling": "mean of last hidden states over real tokens",
            "model": describe(params, model, backbone_dir)})
    # Timings vary run to run: kept out of the cached output so it stays reproducible.
    write_json(metrics_path, {name: {"texts": len(texts), "tokens": tokens[name], "seconds": timings[name],
                                     "tokens_per_s": round(tokens[name] / max(timings[name], 1e-9), 1)}
                              for name, texts in (("items", item_texts), ("users", user_texts))})
