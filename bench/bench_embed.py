"""Benchmark of text embedding: `embed_texts` vs a bare `model(**batch)` loop.

Both embed the same real item titles with the backbone of params.yaml (data/backbone,
`model.num_layers`, `model.max_text_tokens`, `embed.batch_size`):
- `embed_texts`: length-sorted batches, decoder only (no LM head), inference mode;
- `bare`: batches in the original order, tokenizer padding, the full causal LM
  (`model(**batch)`, which also computes the vocabulary logits), mean-pooled from the
  last hidden state.
Each method runs in a fresh process so peak memory (ru_maxrss, includes the model and
the libraries) is its own. Prints one JSON line per method and a small table. Not a test.

    python -m bench.bench_embed [--titles FILE] [--n 256] [--params params.yaml]
"""

from __future__ import annotations

import argparse
import html
import json
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch

DEFAULT_TITLES = "../shared/data/amazon2018/Games/Games.item2title.tsv"


def peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def load_titles(path: str, n: int, seed: int) -> list[str]:
    """`n` titles sampled by seed (HTML entities unescaped), in a fixed random order."""
    titles = pd.read_csv(path, sep="\t", usecols=["title"], quoting=3)["title"].dropna().astype(str)
    titles = [html.unescape(t) for t in titles if t.strip()]
    pick = np.random.default_rng(seed).choice(len(titles), min(n, len(titles)), replace=False)
    return [titles[i] for i in pick]


def bare_loop(model, tokenizer, texts, batch_size, max_tokens):
    """The baseline: original order, tokenizer padding, full CausalLM forward."""
    out, pads, total = [], 0, 0
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_tokens,
                              return_tensors="pt")
            result = model(**batch, output_hidden_states=True)
            mask = batch["attention_mask"].unsqueeze(-1).bool()
            h = torch.where(mask, result.hidden_states[-1], 0.0)
            out.append((h.sum(1) / mask.sum(1)).numpy())
            pads += int((batch["attention_mask"] == 0).sum())
            total += batch["attention_mask"].numel()
    return np.concatenate(out), pads, total


def sorted_padding(tokenizer, texts, batch_size, max_tokens):
    """Pad tokens and total positions of embed_texts' length-sorted batches."""
    from ttds_core.embedding import length_sorted_batches, tokenize_texts

    lengths = np.array([len(r) for r in tokenize_texts(tokenizer, texts, max_tokens)])
    pads = total = 0
    for batch in length_sorted_batches(lengths, batch_size):
        total += len(batch) * lengths[batch].max()
        pads += int((lengths[batch].max() - lengths[batch]).sum())
    return pads, total


def run_method(method: str, args) -> dict:
    from ttds_core.backbone import load_backbone
    from ttds_core.config import get, load_params
    from ttds_core.embedding import embed_texts, tokenize_texts

    params = load_params(args.params)
    batch_size = get(params, "embed.batch_size", int)
    max_tokens = get(params, "model.max_text_tokens", int)
    texts = load_titles(args.titles, args.n, args.seed)
    model, tokenizer = load_backbone(params, device="cpu")
    rss_model = peak_rss_mb()
    real = sum(len(r) for r in tokenize_texts(tokenizer, texts, max_tokens))
    start = time.perf_counter()
    if method == "embed_texts":
        x = embed_texts(model, tokenizer, texts, batch_size=batch_size, max_tokens=max_tokens, progress=False)
        pads, total = sorted_padding(tokenizer, texts, batch_size, max_tokens)
    else:
        x, pads, total = bare_loop(model, tokenizer, texts, batch_size, max_tokens)
    seconds = time.perf_counter() - start
    assert x.shape == (len(texts), model.config.hidden_size)
    return {"method": method, "texts": len(texts), "real_tokens": real, "batch_size": batch_size,
            "num_layers": len(model.model.layers), "threads": torch.get_num_threads(),
            "seconds": round(seconds, 2), "texts_per_s": round(len(texts) / seconds, 1),
            "real_tokens_per_s": round(real / seconds, 1), "pad_share": round(pads / max(total, 1), 3),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_load_mb": round(rss_model, 1)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--titles", default=DEFAULT_TITLES, help="TSV with a 'title' column")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", choices=["embed_texts", "bare"], help="run one method in this process")
    args = ap.parse_args(argv)
    if args.method:
        row = run_method(args.method, args)
        print(json.dumps(row))
        return [row]
    rows = []
    for method in ("bare", "embed_texts"):
        cmd = [sys.executable, "-m", "bench.bench_embed", "--method", method, "--params", args.params,
               "--titles", args.titles, "--n", str(args.n), "--seed", str(args.seed)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    keys = ["seconds", "texts_per_s", "real_tokens_per_s", "pad_share", "peak_rss_mb", "rss_after_load_mb"]
    print(f"{'method':<12}" + "".join(f"{k:>20}" for k in keys))
    for row in rows:
        print(f"{row['method']:<12}" + "".join(f"{row[k]:>20}" for k in keys))
    return rows


if __name__ == "__main__":
    main()
