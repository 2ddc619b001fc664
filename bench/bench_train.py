"""Fine-tuning throughput at the params.yaml settings: tokens/s, s/step and peak memory.

    python -m bench.bench_train [--steps 6] [--params params.yaml] [--out FILE]

Builds exactly what `finetune` trains (backbone of data/backbone with `model.num_layers`,
SID vocabulary, LoRA, SID rows, tied codebook projection, DM-VAE terms when enabled) and
runs `--steps` optimizer steps on seqrec prompts of the *longest* history
(`data.max_history` items) with random SIDs: a worst case per step, independent of what
the weights have learned. The first step is a warm-up and is not timed. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np
import torch

from ttds_core import dynamic, finetune
from ttds_core.config import get, load_params
from ttds_core.prompts import seqrec_prompt


def peak_rss_mb() -> float:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args()

    params = load_params(args.params)
    cfg = finetune.TrainConfig.from_params(params)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)  # as finetune does on CPU
    length = get(params, "index.length", int)
    size = get(params, "index.codebook_size", int)
    code_dim = get(params, "index.code_dim", int)
    max_history = get(params, "data.max_history", int)
    rng = np.random.default_rng(0)
    n_items, n_users = 512, 512

    def random_table(tower, n):
        codes = rng.integers(0, size, size=(n, length))
        return dynamic.make_table(tower, np.arange(n), codes)

    tables = {"item": random_table("item", n_items)}
    if "user" in cfg.towers:
        tables["user"] = random_table("user", n_users)
    t0 = time.time()
    from ttds_core.backbone import load_backbone
    from ttds_core.quantize import RQVAE

    probe, _ = load_backbone(params, device="cpu")
    dim = probe.config.hidden_size
    del probe
    x = {t: rng.standard_normal((len(tables[t]), dim)).astype(np.float32) for t in tables}
    index = finetune.IndexState(tables=tables, x=x)
    tokenizers = {t: RQVAE(dim, code_dim=code_dim, length=length, codebook_size=size) for t in cfg.towers}
    for q in tokenizers.values():
        q.requires_grad_(cfg.dynamic)
    texts = {t: [f"text {i}" for i in range(len(tables[t]))] for t in tables}
    params = {**params, "init": {**params.get("init", {}), "sid_embeddings": "random"}}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm, tok, sid = finetune.build_model(params, cfg, index, texts, tokenizers, "data/backbone", device)
    module = finetune.TTDSModule(lm, sid, cfg, tok.eos_token_id).to(device).train()
    opt = finetune.make_optimizer(module, cfg)
    load_s = time.time() - t0

    sids = index.sid_tables()
    times, tokens = [], []
    for step in range(args.steps + 1):
        pairs = []
        for _ in range(cfg.batch_size):
            hist = [sids.item[i] for i in rng.integers(0, n_items, size=max_history)]
            user = sids.user[int(rng.integers(0, n_users))] if sids.user is not None else None
            pairs.append((seqrec_prompt(hist, user, 0), sids.item[int(rng.integers(0, n_items))]))
        batch = {k: v.to(device) for k, v in finetune.collate(pairs, tok, cfg.max_response_tokens).items()}
        dm = finetune.dm_batch(index, tok, cfg, step, 0, device) if cfg.dm_vae else None
        start = time.time()
        losses = module(**batch, dm=dm)
        losses["total"].backward()
        opt.step()
        opt.zero_grad()
        if step:  # step 0 warms up allocators and kernels
            times.append(time.time() - start)
            tokens.append(int(batch["attention_mask"].sum()))
    result = {
        "device": str(device), "threads": torch.get_num_threads(),
        "num_layers": get(params, "model.num_layers", int, None), "batch_size": cfg.batch_size,
        "max_history": max_history, "prompt_tokens": int(np.mean(tokens) / cfg.batch_size),
        "dm_vae": cfg.dm_vae, "tie_embeddings": cfg.tie, "towers": cfg.towers,
        "steps_timed": len(times), "seconds_per_step": round(float(np.mean(times)), 3),
        "tokens_per_second": round(float(np.sum(tokens) / np.sum(times)), 1),
        "setup_seconds": round(load_s, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    print(json.dumps(result))
    if args.out:
        from ttds_core.io import write_json
        write_json(args.out, result)


if __name__ == "__main__":
    main()
