"""The `warmup` stage: train each tower's quantizer on the frozen LLM's embeddings.

Paper §4.2 / SPEC step 3: per tower (items always, users when `tower.user`), an RQ-VAE
trained with the LLM frozen (it only reads data/embeddings), Adam at `warmup.lr`,
codebooks initialised by k-means on real residuals and dead codes re-seeded every
`warmup.dead_code_every` epochs (not in the last stretch, so moved codes settle). For
`index.kind` lsh/random there is nothing to train: the quantizer is built (LSH centred
on the data) and saved so `build_sids` works the same for every kind.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .collaborative import item_vectors
from .config import get, seed_everything
from .errors import TTDSError
from .io import atomic_dir, read_npy, write_json
from .quantize import KINDS, RQVAE, LSHQuantizer, build_quantizer, quantizer_config, save_quantizer
from .sids import index_stats, resolve_collisions

FILES = {"item": "items", "user": "users"}


def warmup_config(params: dict) -> dict:
    """Training settings of `warmup.*`, checked."""
    return {
        "epochs": get(params, "warmup.epochs", int, min_value=0),
        "batch_size": get(params, "warmup.batch_size", int, min_value=1),
        "lr": get(params, "warmup.lr", float, min_value=0.0),
        "beta": get(params, "warmup.beta", float, min_value=0.0),
        "kmeans_sample": get(params, "warmup.kmeans_sample", int, min_value=1),
        "kmeans_iters": get(params, "warmup.kmeans_iters", int, min_value=1),
        "dead_code_every": get(params, "warmup.dead_code_every", int, min_value=0),
        "eval_every": get(params, "warmup.eval_every", int, 10, min_value=1),
    }


def index_config(params: dict, in_dim: int) -> dict:
    """Quantizer architecture from `index.*` (what `build_quantizer` takes)."""
    return {
        "kind": get(params, "index.kind", str, choices=KINDS),
        "in_dim": in_dim,
        "length": get(params, "index.length", int),
        "codebook_size": get(params, "index.codebook_size", int),
        "code_dim": get(params, "index.code_dim", int, min_value=1),
        "beta": get(params, "warmup.beta", float, 0.25, min_value=0.0),
        "seed": get(params, "seed", int, 42),
    }


@torch.no_grad()
def evaluate_rqvae(model: RQVAE, x: torch.Tensor, batch_size: int = 4096) -> dict:
    """Full-data losses, per-level usage/perplexity and collision rate (eval mode)."""
    totals = {"loss": 0.0, "loss_recon": 0.0, "loss_codebook": 0.0, "loss_commit": 0.0}
    codes = []
    for i in range(0, len(x), batch_size):
        out = model(x[i:i + batch_size])
        for k in totals:
            totals[k] += float(out[k]) * len(out["codes"])
        codes.append(out["codes"])
    codes = torch.cat(codes).cpu().numpy()
    stats = index_stats(codes, resolve_collisions(codes), model.codebook_size)
    metrics = {k: v / len(x) for k, v in totals.items()}
    metrics["collision_rate"] = stats["collision_rate"]
    for m, (u, p) in enumerate(zip(stats["usage"], stats["perplexity"])):
        metrics[f"usage_{m}"], metrics[f"perplexity_{m}"] = u, p
    return metrics


def train_rqvae(x: np.ndarray, cfg: dict, seed: int, log=None, progress: bool = True):
    """(trained RQVAE, history: one dict per epoch, epoch 0 = right after k-means init).

    `cfg` holds the index config (`index_config`) and the training settings
    (`warmup_config`). Every epoch records the mean training losses; every
    `eval_every` epochs (and the last) also full-data metrics: losses in eval mode,
    per-level usage/perplexity and the collision rate. `log(entry)` is called after
    every epoch when given.
    """
    threads = torch.get_num_threads()
    # The quantizer MLP is small: intra-op threads cost more in synchronisation than
    # they save (4x slower with 2 threads than with 1 on a busy 2-core machine).
    torch.set_num_threads(1)
    try:
        return _train_rqvae(x, cfg, seed, log, progress)
    finally:
        torch.set_num_threads(threads)


def _train_rqvae(x, cfg: dict, seed: int, log, progress: bool):
    from tqdm.auto import trange

    seed_everything(seed)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if x.ndim != 2 or len(x) == 0:
        raise TTDSError(f"warmup: embeddings of shape {tuple(x.shape)}, expected [n > 0, d]")
    model = build_quantizer({**cfg, "kind": "rq", "in_dim": x.shape[1]})
    model.fit_normalisation(x)
    model.init_kmeans(x, sample=cfg["kmeans_sample"], iters=cfg["kmeans_iters"], seed=seed)
    # On a GPU machine the epochs run there (the batch order still comes from the seeded
    # CPU generator); on CPU nothing moves, so CPU runs stay bit-identical.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, x = model.to(device), x.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    epochs, every = cfg["epochs"], cfg["dead_code_every"]
    eval_every = cfg.get("eval_every", 1) or epochs or 1
    history = [{"epoch": 0, "reseeded": 0, **evaluate_rqvae(model.eval(), x)}]
    keys = ("loss", "loss_recon", "loss_codebook", "loss_commit")
    for epoch in trange(1, epochs + 1, desc="warmup", disable=not progress, unit="epoch"):
        model.train()
        sums = dict.fromkeys(keys, 0.0)
        for batch in torch.randperm(len(x), generator=gen).split(cfg["batch_size"]):
            out = model(x[batch.to(device)])
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            for k in keys:
                sums[k] += float(out[k].detach()) * len(batch)
        entry = {"epoch": epoch, "reseeded": 0, **{f"train_{k}": v / len(x) for k, v in sums.items()}}
        # Re-seed on schedule, but leave the last 10% of epochs for moved codes to settle.
        if every and epoch % every == 0 and epoch <= 0.9 * epochs:
            entry["reseeded"] = model.reseed_dead_codes(x, seed=seed + epoch)
        if epoch % eval_every == 0 or epoch == epochs:
            entry.update(evaluate_rqvae(model.eval(), x))
        history.append(entry)
        if log is not None:
            log(entry)
    return model.cpu().eval(), history


def build_untrained(x: np.ndarray, cfg: dict):
    """LSH (centred on x) or random quantizer: nothing to learn."""
    q = build_quantizer({**cfg, "in_dim": x.shape[1]})
    if isinstance(q, LSHQuantizer):
        # Random hyperplanes through the origin split mean-pooled LLM states badly (they
        # share a large common component): centre on the data, do not rescale.
        q.fit_normalisation(torch.as_tensor(x), scale=False)
    return q


def summarise(history: list[dict], length: int) -> dict:
    """Final-epoch metrics with per-level usage/perplexity gathered into lists."""
    final = history[-1]
    out = {k: v for k, v in final.items()
           if k not in ("epoch", "reseeded") and not k.startswith(("usage_", "perplexity_", "train_"))}
    out["usage"] = [final[f"usage_{m}"] for m in range(length)]
    out["perplexity"] = [final[f"perplexity_{m}"] for m in range(length)]
    out["epochs"] = final["epoch"]
    out["reseeded_total"] = int(sum(h["reseeded"] for h in history))
    return out


def _log_histories(histories: dict, path: str) -> None:
    """dvclive curves, one step per epoch, towers side by side (item/loss, user/loss, ...)."""
    from .live import open_live

    with open_live(path) as live:
        steps = max(len(h) for h in histories.values())
        for step in range(steps):
            for tower, history in histories.items():
                if step < len(history):
                    for key, value in history[step].items():
                        if key != "epoch":
                            live.log_metric(f"{tower}/{key}", value)
            live.next_step()


def run(params: dict, embeddings_dir: str | Path = "data/embeddings", out_dir: str | Path = "data/quantizer",
        metrics_path: str | Path = "metrics/warmup.json", live_dir: str = "dvclive/warmup",
        processed_dir: str | Path = "data/processed") -> None:
    """The `warmup` stage: data/embeddings -> data/quantizer/{item,user}.safetensors + config.json.
    The item tower trains on `collaborative.item_vectors` (X itself unless `index.cf_mix` > 0)."""
    seed = get(params, "seed", int, 42)
    towers = ["item", "user"] if get(params, "tower.user", bool) else ["item"]
    train_cfg = warmup_config(params)
    configs, metrics, histories = {}, {}, {}
    with atomic_dir(out_dir) as tmp:
        for i, tower in enumerate(towers):
            x = read_npy(Path(embeddings_dir) / f"{FILES[tower]}.npy").astype(np.float32)
            if tower == "item":
                x = item_vectors(params, x, processed_dir)
            cfg = {**index_config(params, x.shape[1] if x.ndim == 2 else 0), "seed": seed + i}
            start = time.perf_counter()
            if cfg["kind"] == "rq":
                q, history = train_rqvae(x, {**cfg, **train_cfg}, seed=seed + i)
                histories[tower] = history
                metrics[tower] = {"entities": len(x), **summarise(history, q.length)}
            else:
                q = build_untrained(x, cfg)
                metrics[tower] = {"entities": len(x), "trained": False}
            metrics[tower]["seconds"] = round(time.perf_counter() - start, 2)
            configs[tower] = quantizer_config(q, seed=cfg["seed"])
            save_quantizer(tmp / f"{tower}.safetensors", q, configs[tower])
        write_json(tmp / "config.json", configs)
    if histories:
        _log_histories(histories, live_dir)
    else:  # lsh / random: nothing trained, no curves; the plots folder dvc.yaml declares still exists
        (Path(live_dir) / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    write_json(metrics_path, {"kind": configs["item"]["kind"], **metrics})
