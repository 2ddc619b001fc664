"""A TTDS run's training state: where training stands (`Progress`) and the checkpoint that
holds it with everything else that changes while training (trainable weights, optimizer,
scheduler, RNG, SID tables, cached X, the best validated state), in the folder format the
baselines share (`checkpoint`). A checkpoint is resumed only by a run whose fingerprint
(`train_config.fingerprint`: params, inputs, backbone, code, process layout) it matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint
from .errors import TTDSError
from .io import read_npy, read_parquet, write_npy, write_parquet
from .model import IndexState, TTDSModule, trainable_state


@dataclass
class Progress:
    """Where training stands; what a checkpoint restores besides the weights."""
    step: int = 0
    epoch: int = 0                  # the epoch and micro-batch to go on from
    batch: int = 0
    history: list[dict] = field(default_factory=list)     # one row per optimizer step
    best: dict | None = None                              # best validation so far (score, step, metrics)
    validation: list[dict] = field(default_factory=list)  # one record per epoch-end validation
    best_state: tuple | None = None                       # (trainable tensors, SID tables) of `best`
    resumed_from: int | None = None


def save_checkpoint(path: Path, module: TTDSModule, optimizer, scheduler, index: IndexState, p: Progress,
                    stamp: dict) -> None:
    """Everything a resumed run needs (`checkpoint.write`): trainable tensors, optimizer,
    scheduler, RNG states, the index, the history, and the best validated state so far, so
    the resumed run saves the same model."""
    def tables(folder: Path) -> None:
        for tower, table in index.tables.items():
            write_parquet(folder / f"{tower}_sids.parquet", table)
            write_npy(folder / f"{tower}_x.npy", index.x[tower])
        for tower, table in (p.best_state[1] if p.best_state else {}).items():
            write_parquet(folder / f"best_{tower}_sids.parquet", table)

    tensors = {"trainable": trainable_state(module)}
    if p.best_state is not None:
        tensors["best_trainable"] = p.best_state[0]
    state = {"fingerprint": stamp, "step": p.step, "epoch": p.epoch, "batch": p.batch, "best": p.best,
             "validation": p.validation, "churn": index.churn, "history": p.history}
    checkpoint.write(path, state, tensors, {"optim": {"optimizer": optimizer.state_dict(),
                                                      "scheduler": scheduler.state_dict()}}, extra=tables)


def load_checkpoint(path: Path, module: TTDSModule, optimizer, scheduler, index: IndexState, stamp: dict,
                    main: bool = True) -> Progress:
    """The progress of a checkpoint at `path` made from the same params and inputs (weights,
    optimizer, index and RNG restored); a fresh `Progress` when there is none, or when it was
    made from anything else (then it is set aside)."""
    stored = checkpoint.read(path)
    if stored is None:
        return Progress()
    why = checkpoint.mismatch(stored, stamp)
    if why is None and stored.state.get("best") is not None and not stored.has("best_trainable"):
        why = "has a best step but not its state"
    if why:
        checkpoint.set_aside(path, why, "finetune", main)
        return Progress()
    state = stored.state
    best_state = None
    if state.get("best") is not None:
        best_state = (stored.tensors("best_trainable"),
                      {t: read_parquet(path / f"best_{t}_sids.parquet") for t in index.tables})
        unknown = set(best_state[0]) - set(module.state_dict())
        if unknown:
            raise TTDSError(f"{path}: best state does not match the model ({sorted(unknown)[0]})")
    unexpected = module.load_state_dict(stored.tensors("trainable"), strict=False).unexpected_keys
    if unexpected:
        raise TTDSError(f"{path}: checkpoint does not match the model ({unexpected[0]})")
    blob = stored.object("optim")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    for tower in list(index.tables):
        index.tables[tower] = read_parquet(path / f"{tower}_sids.parquet")
        index.x[tower] = read_npy(path / f"{tower}_x.npy")
    index.churn = state.get("churn", [])
    stored.restore_rng()
    return Progress(step=state["step"], epoch=state["epoch"], batch=state["batch"], history=state.get("history", []),
                    best=state.get("best"), validation=state.get("validation", []), best_state=best_state,
                    resumed_from=state["step"])
