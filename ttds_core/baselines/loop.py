"""The one training / evaluation loop every baseline goes through.

Evaluation is full ranking over ALL items, no candidate sampling:
rank = 1 + number of items whose score is strictly higher than the target's (ties
count in the target's favour; MostPop breaks its ties by item id, the neural models'
float scores practically never tie). "Masked" ranking removes the user's history
items (everything before the target) from the candidates; the target itself is
never removed, even if it also occurs in the history.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import checkpoint
from ..metrics import metric_table, ndcg
from .data import Split, pad_inputs, rank_frame, training_windows

SPLITS = ("valid", "test")


def rank_targets(scores: torch.Tensor, targets: torch.Tensor, histories: list[np.ndarray] | None):
    """1-based ranks of `targets` in each row of `scores`; mask `histories` when given."""
    target_scores = scores.gather(1, targets.unsqueeze(1))
    if histories is not None:
        scores = scores.clone()
        rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        cols = np.concatenate(histories) if len(rows) else np.zeros(0, dtype=np.int64)
        scores[torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)] = float("-inf")
    return (scores > target_scores).sum(1) + 1


@torch.no_grad()
def evaluate(model, split: Split, which: str, max_history: int, batch_size: int, device,
             masked_too: bool = True) -> dict[bool, np.ndarray]:
    """Ranks of the `which` ('valid' | 'test') targets: {False: unmasked, True: masked}."""
    model.eval()
    histories = split.histories(which)
    targets = torch.from_numpy(split.targets(which))
    out = {False: [], True: []}
    for start in range(0, len(histories), batch_size):
        hist = histories[start:start + batch_size]
        inputs, lengths = pad_inputs(hist, max_history)
        scores = model.scores(inputs.to(device), lengths.to(device))
        if scores.dtype not in (torch.float32, torch.float64):
            scores = scores.float()  # never below fp32; MostPop's id tie-break needs its float64
        tgt = targets[start:start + batch_size].to(device)
        out[False].append(rank_targets(scores, tgt, None).cpu())
        if masked_too:
            out[True].append(rank_targets(scores, tgt, hist).cpu())
    return {m: torch.cat(r).numpy() for m, r in out.items() if r}


# Keys that may change between a killed run and its resumption: they bound how long
# training goes on, not what one epoch computes.
_NOT_RESUME_KEYS = ("epochs", "max_minutes")


def _fingerprint(model, cfg: dict, windows: torch.Tensor) -> dict[str, str]:
    """What a checkpoint must match to be resumed: model class, config and training data."""
    picked = {k: v for k, v in cfg.items() if k not in _NOT_RESUME_KEYS}
    return {"model": type(model).__name__,
            "params": hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "training data": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]}


def _save_checkpoint(path: Path, model, optimizer, generator, best_state, progress: dict) -> None:
    """Everything `train` needs to go on after the epoch just finished (`checkpoint.write`)."""
    checkpoint.write(path, progress, tensors={"model": model.state_dict(), "best": best_state},
                     objects={"optim": optimizer.state_dict()}, generators={"order": generator})


def _load_checkpoint(path: Path, model, optimizer, generator, fingerprint: dict, log):
    """(progress, best_state) from a compatible checkpoint at `path`, else None (start fresh;
    one made from anything else is set aside)."""
    stored = checkpoint.read(path)
    if stored is None:
        return None
    why = checkpoint.mismatch(stored, fingerprint)
    if why:
        checkpoint.set_aside(path, why, "baseline", log=log)
        return None
    model.load_state_dict(stored.tensors("model"))
    optimizer.load_state_dict(stored.object("optim"))
    stored.restore_rng({"order": generator})
    progress = {k: v for k, v in stored.state.items() if k != "rng"}
    print(f"resuming from {path} after epoch {progress['epoch']}", file=log, flush=True)
    return progress, stored.tensors("best")


def train(model, split: Split, cfg: dict, device, select_masked: bool, log=None,
          checkpoint: str | Path | None = None) -> dict:
    """Adam on next-item CE, early stopping on validation NDCG@10, best weights restored.

    `max_minutes` (optional) ends training after the epoch that crosses the budget; the
    metrics file records the epochs actually run, so a rerun with `epochs` set to that
    number reproduces the result without depending on machine speed.

    `checkpoint` (a folder) is rewritten after every epoch; a run started again with the
    same config and data goes on from it and ends with the same weights as one that was
    never interrupted (`epochs` and `max_minutes` may differ, so a finished run can also
    be extended).

    Returns {"epochs": run, "best_epoch": .., "history": [...], "earlier_seconds": training
    time spent before a resume} for the metrics file.
    """
    log = log or sys.stderr  # looked up per call, so redirected stderr is honoured
    windows = torch.from_numpy(training_windows(split.train_sequences(), cfg["max_history"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    generator = torch.Generator().manual_seed(cfg["seed"])
    progress = {"fingerprint": _fingerprint(model, cfg, windows), "epoch": 0, "best": -1.0,
                "best_epoch": 0, "bad": 0, "stopped": False, "history": [], "seconds": 0.0}
    best_state = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        resumed = _load_checkpoint(checkpoint, model, optimizer, generator, progress["fingerprint"], log)
        if resumed is not None:
            progress, best_state = resumed
    started, earlier = time.perf_counter(), progress.get("seconds", 0.0)
    deadline = None if cfg.get("max_minutes") is None else started + 60 * cfg["max_minutes"]
    epoch = progress["epoch"]
    while not progress["stopped"] and epoch < cfg["epochs"]:
        epoch += 1
        model.train()
        order = torch.randperm(len(windows), generator=generator)
        total, batches = 0.0, 0
        for start in tqdm(range(0, len(order), cfg["batch_size"]), desc=f"epoch {epoch}", leave=False,
                          disable=None, file=log):
            loss = model.loss(windows[order[start:start + cfg["batch_size"]]].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        ranks = evaluate(model, split, "valid", cfg["max_history"], cfg["eval_batch_size"], device,
                         masked_too=select_masked)
        score = ndcg(ranks[select_masked], 10)
        progress["history"].append({"epoch": epoch, "loss": total / batches, "valid_NDCG@10": score})
        print(f"epoch {epoch}: loss {total / batches:.4f}  valid NDCG@10 {score:.4f}", file=log, flush=True)
        progress["epoch"], progress["seconds"] = epoch, earlier + time.perf_counter() - started
        if score > progress["best"]:
            progress.update(best=score, best_epoch=epoch, bad=0)
            best_state = copy.deepcopy(model.state_dict())
        else:
            progress["bad"] += 1
            progress["stopped"] = progress["bad"] >= cfg["patience"]
        if not progress["stopped"] and deadline is not None and time.perf_counter() > deadline:
            print(f"stopping after epoch {epoch}: baselines.max_minutes reached", file=log, flush=True)
            progress["stopped"] = True
        if checkpoint is not None:
            _save_checkpoint(checkpoint, model, optimizer, generator, best_state, progress)
    model.load_state_dict(best_state)
    return {"epochs": progress["epoch"], "best_epoch": progress["best_epoch"], "history": progress["history"],
            "earlier_seconds": earlier}


def fit_and_evaluate(model, split: Split, cfg: dict, device, select_masked: bool = False,
                     checkpoint: str | Path | None = None, eval_users: np.ndarray | None = None):
    """Train (or fit, for models without parameters), then rank validation and test targets.

    `checkpoint`: see `train`; models without parameters have nothing to checkpoint.
    `eval_users`: the users whose targets are ranked and reported (default all), so that a
    baseline is measured on the same users as TTDS's `evaluate` (`eval.max_users`); training
    and early stopping use every user, as TTDS's training does.

    Returns (metrics dict in the `metrics/eval.json` format, ranks DataFrame, history).
    """
    start = time.perf_counter()
    model.to(device)
    if any(p.requires_grad for p in model.parameters()):
        info = train(model, split, cfg, device, select_masked, checkpoint=checkpoint)
    else:
        model.fit(split.train_sequences())
        info = {"epochs": 0, "best_epoch": 0, "history": []}
    ranked = split if eval_users is None else split.only(eval_users)
    metrics, frames = {}, []
    for which in SPLITS:
        ranks = evaluate(model, ranked, which, cfg["max_history"], cfg["eval_batch_size"], device)
        for masked, r in ranks.items():
            metrics[f"{which}_masked" if masked else which] = metric_table(r)
            frames.append(rank_frame(ranked.user_ids, which, ranked.targets(which), r, masked))
    metrics = {key: metrics[key] for key in ("test", "valid", "test_masked", "valid_masked")}
    metrics.update(users=len(ranked.user_ids), items=split.n_items, epochs=info["epochs"],
                   best_epoch=info["best_epoch"],
                   seconds=round(time.perf_counter() - start + info.get("earlier_seconds", 0.0), 1))
    return metrics, pd.concat(frames, ignore_index=True), info["history"]
