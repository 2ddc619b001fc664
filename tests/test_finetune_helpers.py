"""A toy project on disk for the finetune tests: processed data, embeddings, tokenizers,
SIDs and a tiny random LLaMA backbone, all built in code in a few seconds.

Item i of user u's sequence follows a fixed rule (next = (prev + step_u) mod n_items), so
the next item is learnable from the history and a small model can memorise it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ttds_core.config import load_params, with_overrides
from ttds_core.io import write_json, write_npy, write_parquet

REPO = Path(__file__).resolve().parents[1]

N_ITEMS, N_USERS, SEQ_LEN = 12, 8, 5


def toy_params(**overrides) -> dict:
    """The shipped params.yaml, shrunk to the toy project (dotted-key overrides on top)."""
    params = copy.deepcopy(load_params(REPO / "params.yaml"))
    small = {
        "model.num_layers": None, "model.max_text_tokens": 16, "model.dtype": "float32",
        "index.length": 2, "index.codebook_size": 4, "index.code_dim": 8, "index.max_suffix": 8,
        "index.refresh_samples": 16, "embed.batch_size": 8,
        "train.epochs": 1, "train.max_steps": 8, "train.batch_size": 4, "train.grad_accum": 1,
        "train.lr": 5.0e-3, "train.embedding_lr": 1.0e-2, "train.warmup_ratio": 0.0,
        "train.checkpoint_every": 4, "train.val_users": 4, "train.dmvae_batch": 4,
        "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0, "data.max_history": 4,
    }
    small.update(overrides)
    return with_overrides(params, small)


def toy_sequences() -> pd.DataFrame:
    rows = []
    for u in range(N_USERS):
        step = 1 + u % 3
        rows.append({"user_id": u, "items": [(u + k * step) % N_ITEMS for k in range(SEQ_LEN)]})
    return pd.DataFrame(rows)


def build_toy_project(root: Path, kind: str = "rq", seed: int = 0, hidden: int = 64) -> None:
    """Write data/{backbone,processed,embeddings,tokenizer,sids} under `root`."""
    from conftest import make_tiny_llama, make_tokenizer

    from ttds_core.embedding import embed_texts
    from ttds_core.quantize import build_quantizer, save_quantizer
    from ttds_core.sids import resolve_collisions, sid_table

    data = root / "data"
    tok = make_tokenizer()
    model = make_tiny_llama(len(tok), hidden=hidden, seed=seed)
    # Random rows of std 0.02 leave EOS (an original token, frozen under LoRA) almost no
    # reachable logit; a pretrained backbone has rows of unit scale, so give it those.
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(30.0)
    model.save_pretrained(data / "backbone")
    tok.save_pretrained(data / "backbone")
    write_json(data / "backbone" / "backbone.json", {"source": "tiny", "format": "gguf", "path": None})

    seqs = toy_sequences()
    titles = [f"game {i} controller" if i % 2 else f"Mario switch {i}" for i in range(N_ITEMS)]
    items = pd.DataFrame({"item_id": np.arange(N_ITEMS), "original_id": [f"I{i}" for i in range(N_ITEMS)],
                          "title": titles, "text": [f"Title: {t}" for t in titles]})
    users = pd.DataFrame({"user_id": np.arange(N_USERS), "original_id": [f"U{u}" for u in range(N_USERS)],
                          "text": [", ".join(titles[i] for i in s[:-2]) for s in seqs["items"]]})
    inter = []
    for u, seq in zip(seqs["user_id"], seqs["items"]):
        for p, i in enumerate(seq):
            split = "train" if p < len(seq) - 2 else ("valid" if p == len(seq) - 2 else "test")
            inter.append({"user_id": u, "item_id": i, "pos": p, "split": split, "timestamp": None,
                          "rating": None, "review": "great fun" if (u + p) % 4 == 0 else None, "summary": None})
    inter = pd.DataFrame(inter)
    inter["timestamp"] = inter["timestamp"].astype("Int64")
    for name, df in (("sequences", seqs), ("items", items), ("users", users), ("interactions", inter)):
        write_parquet(data / "processed" / f"{name}.parquet", df)

    tok.padding_side = "left"
    for tower, df, name in (("item", items, "items"), ("user", users, "users")):
        x = embed_texts(model, tok, df["text"].tolist(), batch_size=8, max_tokens=16, progress=False)
        write_npy(data / "embeddings" / f"{name}.npy", x)
        torch.manual_seed(seed)
        q = build_quantizer({"kind": kind, "in_dim": x.shape[1], "length": 2, "codebook_size": 4,
                             "code_dim": 8, "widths": [x.shape[1], 16, 8], "seed": seed})
        if hasattr(q, "fit_normalisation"):
            q.fit_normalisation(torch.as_tensor(x))
        if hasattr(q, "init_kmeans"):
            q.init_kmeans(torch.as_tensor(x), sample=len(x), iters=10, seed=seed)
        save_quantizer(data / "quantizer" / f"{tower}.safetensors", q)
        codes = q.codes(torch.as_tensor(x), ids=np.arange(len(x))).numpy()
        write_parquet(data / "sids" / f"{name}.parquet",
                      sid_table(np.arange(len(x)), codes, resolve_collisions(codes), tower))
