"""Where a dynamic-index refresh's churn comes from, measured on a trained workspace.

    python -m bench.refresh_churn --root <workspace> [--margins 0 0.2 0.5 0.8]
                                  [--out docs/bench/refresh_churn/churn.json]

A refresh (`index.dynamic`, ttds_core/model.py `refresh_index`) re-embeds every item text
with the current LLM, mixes in the training neighbours (`index.cf_mix`), re-standardises,
re-quantizes with hysteresis (`index.refresh_margin`) and re-resolves collisions. This bench
does the same with the workspace's trained model and reports the share of items whose SID
would change against the workspace's SID table (all codes, and the first code only), for
each margin and for two sources of the item vectors:

- `base`: the backbone alone, as the embed stage ran it (for a static index, a check: it
  must reproduce the workspace's SIDs; for a dynamic one, the rows with the warm-up
  quantizer at margin 0 show how far the refreshes took the table from the initial index);
- `adapted`: the trained backbone (LoRA merged), as a refresh at the end of training would.

and with the warm-up quantizer (`data/quantizer`) and, where the run trained them (dynamic
index), the final ones (`data/model/quantizers.safetensors`). The LLM's drift and the
quantizer's drift are thus measured apart. `drift` has the mean cosine between each item's
adapted and base text vector (before the collaborative mix). No training, no ranking: under
a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ttds_core.config import get, load_params
from ttds_core.io import read_npy, read_parquet, write_json


def main(argv=None) -> dict:
    from ttds_core import collaborative
    from ttds_core.backbone import load_backbone
    from ttds_core.dynamic import TowerLayout, requantize
    from ttds_core.embedding import embed_texts
    from ttds_core.errors import TTDSError
    from ttds_core.quantize import load_quantizer
    from ttds_core.recommender import load_final_quantizers, load_recommender

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".", help="the workspace holding the trained TTDS")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8])
    ap.add_argument("--out", default="docs/bench/refresh_churn/churn.json")
    args = ap.parse_args(argv)
    if any(not 0.0 <= m < 1.0 for m in args.margins):
        raise TTDSError(f"--margins: {args.margins}, expected numbers with 0 <= margin < 1")
    root = Path(args.root)
    params = load_params(root / "params.yaml")
    items = read_parquet(root / "data" / "processed" / "items.parquet", ["item_id", "text"]).sort_values("item_id")
    old = read_parquet(root / "data" / "model" / "item_sids.parquet", ["item_id", "codes", "suffix", "sid"])
    old = old.sort_values("item_id").reset_index(drop=True)
    lay = TowerLayout("item", 0, get(params, "index.length", int), get(params, "index.codebook_size", int),
                      get(params, "index.max_suffix", int))
    embed_kwargs = {"batch_size": get(params, "embed.batch_size", int, 32, min_value=1),
                    "max_tokens": get(params, "model.max_text_tokens", int, 64, min_value=1), "progress": False}
    texts = items["text"].tolist()
    base_model, tokenizer = load_backbone(params, device="cpu", backbone_dir=root / "data" / "backbone")
    raw = {"base": embed_texts(base_model, tokenizer, texts, **embed_kwargs)}
    del base_model
    rec = load_recommender(params, model_dir=root / "data" / "model", backbone_dir=root / "data" / "backbone",
                           device="cpu")
    raw["adapted"] = embed_texts(rec.model, rec.tokenizer, texts, **embed_kwargs)
    # what a refresh quantizes: the re-embedded vectors with the index's collaborative mix
    x = {source: collaborative.item_vectors(params, r, root / "data" / "processed") for source, r in raw.items()}
    stored = read_npy(root / "data" / "embeddings" / "items.npy").astype(np.float32)
    quantizers = {"warmup": load_quantizer(root / "data" / "quantizer" / "item.safetensors",
                                           in_dim=stored.shape[1])[0]}
    if get(params, "index.dynamic", bool):
        quantizers["final"] = load_final_quantizers(root / "data" / "model")["item"]

    rows = []
    for source, xs in x.items():
        for qname, q in quantizers.items():
            for margin in args.margins:   # exactly what a refresh does with these vectors
                record = requantize(q, xs, old, lay, margin)[1]
                row = {"vectors": source, "quantizer": qname, "margin": margin,
                       **{k: round(v, 4) for k, v in record.items()}}
                rows.append(row)
                print(f"{source:8s} {qname:7s} margin {margin:.2f}  churn {row['churn']:.4f}  "
                      f"first code {row['churn_level_1']:.4f}")
    a, b = raw["adapted"], raw["base"]
    drift = {"base_vs_stored_max_abs": float(np.abs(b - stored).max()),   # the check: ~0
             "adapted_vs_base_mean_cosine": float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1)
                                                                           * np.linalg.norm(b, axis=1) + 1e-12)))}
    settings = {k: get(params, k) for k in ("index.dynamic", "index.cf_mix", "index.refresh_margin", "train.epochs")}
    result = {"items": len(texts), "params": settings, "against": "data/model/item_sids.parquet",
              "drift": drift, "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    from ttds_core.cli import user_errors

    with user_errors():
        main()
