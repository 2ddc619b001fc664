"""What a fine-tuning run is made of: its typed settings (`TrainConfig`, read once from
params.yaml, already validated whole by `schema`) and the fingerprint of everything that
determines what it computes (params, input folders, backbone, code, process layout), which
a checkpoint must match to be resumed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .config import get
from .io import hash_files, read_json
from .prompts import seqrec_packed
from .schema import INDEX_KINDS, validate

SID_SOFTMAX = ("vocab", "sid")


@dataclass
class TrainConfig:
    seed: int          # fine-tuning randomness: train.seed, else the global seed
    data_seed: int     # the global seed: which users validate (the same for every train.seed)
    towers: list[str]
    dynamic: bool
    kind: str
    refresh_samples: int
    tie: bool
    dm_vae: bool
    alpha: float
    beta: float
    epochs: int
    max_steps: int | None
    batch_size: int
    grad_accum: int
    lr: float
    embedding_lr: float
    quantizer_lr: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    checkpoint_every: int
    val_users: int
    template: int
    dmvae_batch: int
    max_response_tokens: int
    bucket: int
    threads: int | None
    sid_softmax: str = "vocab"
    val_beams: int = 20
    val_scoring: str = "full"
    val_batch: int = 16
    val_masked: bool = False
    packed: bool = False
    max_minutes: float | None = None
    patience: int | None = None
    packing: bool = False
    user_dropout: float = 0.0
    fused_optimizer: bool = False
    log_every: int = 1

    @classmethod
    def from_params(cls, params: dict) -> "TrainConfig":
        """The settings of `params`, after checking them whole (`schema.validate`: every key,
        type, range and cross-key rule, one line naming the key), as `load_params` does for
        the stages: a library caller gets the same checks."""
        validate(params)
        user = get(params, "tower.user", bool)
        train_seed = get(params, "train.seed", int, default=None, allow_none=True)
        cfg = cls(
            seed=train_seed if train_seed is not None else get(params, "seed", int),
            data_seed=get(params, "seed", int),
            towers=["item", "user"] if user else ["item"],
            dynamic=get(params, "index.dynamic", bool),
            kind=get(params, "index.kind", str, choices=INDEX_KINDS),
            refresh_samples=get(params, "index.refresh_samples", int, min_value=1),
            tie=get(params, "index.tie_embeddings", bool),
            dm_vae=get(params, "loss.dm_vae", bool),
            alpha=get(params, "loss.alpha", float, min_value=0.0),
            beta=get(params, "loss.beta", float, min_value=0.0),
            epochs=get(params, "train.epochs", int, min_value=1),
            max_steps=get(params, "train.max_steps", int, None, min_value=1),
            batch_size=get(params, "train.batch_size", int, min_value=1),
            grad_accum=get(params, "train.grad_accum", int, min_value=1),
            lr=get(params, "train.lr", float, min_value=0.0),
            embedding_lr=get(params, "train.embedding_lr", float, min_value=0.0),
            quantizer_lr=get(params, "train.quantizer_lr", float, 1.0e-4, min_value=0.0),
            warmup_ratio=get(params, "train.warmup_ratio", float, min_value=0.0),
            weight_decay=get(params, "train.weight_decay", float, min_value=0.0),
            max_grad_norm=get(params, "train.max_grad_norm", float, 1.0, min_value=0.0),
            checkpoint_every=get(params, "train.checkpoint_every", int, min_value=1),
            val_users=get(params, "train.val_users", int, min_value=0),
            template=get(params, "train.template", int, 0, min_value=0),
            dmvae_batch=get(params, "train.dmvae_batch", int, 16, min_value=1),
            max_response_tokens=get(params, "tasks.max_response_tokens", int, 32, min_value=1),
            bucket=get(params, "train.bucket_batches", int, 32, min_value=1),
            threads=get(params, "train.threads", int, 1, allow_none=True, min_value=1),
            sid_softmax=get(params, "loss.sid_softmax", str, "sid", choices=SID_SOFTMAX),
            val_beams=get(params, "eval.beams", int, 20, min_value=1),
            val_scoring=get(params, "eval.scoring", str, "sid"),
            val_batch=get(params, "eval.batch_size", int, 16, min_value=1),
            val_masked=get(params, "eval.mask_history", bool, False),
            packed=seqrec_packed(params),
            max_minutes=get(params, "train.max_minutes", float, None, min_value=0.0),
            patience=get(params, "train.patience", int, None, allow_none=True, min_value=1),
            packing=get(params, "train.packing", bool),
            user_dropout=get(params, "train.user_token_dropout", float, 0.0, min_value=0.0),
            fused_optimizer=get(params, "train.fused_optimizer", bool, False),
            log_every=get(params, "train.log_every", int, 1, min_value=1),
        )
        return cfg


# Params that change what training computes; a checkpoint made under others is not resumed.
RESUME_KEYS = ("seed", "model", "index", "tower", "tasks", "loss", "init", "lora", "train", "data.max_history",
               "eval.beams", "eval.scoring", "eval.batch_size", "eval.mask_history",  # validation picks the best
               "embed.batch_size")                                                   # the index refresh re-embeds
NOT_RESUME_KEYS = ("train.checkpoint_every", "train.threads", "train.max_minutes", "train.log_every")
# Input folders whose content determines training (the upstream stages' outputs): a checkpoint
# made from other files (other data, other SIDs after a warmup change...) is not resumed.
INPUT_DIRS = {"data/processed": "processed", "data/embeddings": "embeddings", "data/quantizer": "quantizer",
              "data/sids": "sids"}


def params_hash(params: dict) -> str:
    picked = {}
    for key in RESUME_KEYS:
        node = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    picked = json.loads(json.dumps(picked, sort_keys=True, default=str))
    for key in NOT_RESUME_KEYS:
        top, leaf = key.split(".")
        if isinstance(picked.get(top), dict):
            picked[top].pop(leaf, None)
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _backbone_stamp(backbone_dir: Path) -> str:
    """The backbone by its configs and its weight files' names and sizes (content-hashing a
    7B model at every start would cost minutes); for an HF folder used in place, that folder's."""
    h = hashlib.sha256()
    folders = [backbone_dir]
    record = backbone_dir / "backbone.json"
    if record.is_file():
        path = read_json(record).get("path")
        if path:
            folders.append(Path(path))
    for folder in folders:
        hash_files(folder, "*.json", h=h)
        for f in sorted(p for p in folder.glob("*") if p.is_file() and p.suffix != ".json"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def fingerprint(params: dict, data_dir: Path, layout: dict) -> dict[str, str]:
    """What a checkpoint must have been made from to be resumed: the training params, the
    content of every input folder, the backbone, the code of the package, and the process
    layout (`layout`: processes, device type, precision: they change the batches and the
    learning-rate schedule a resumed run would replay)."""
    out = {"params": params_hash(params)}
    out.update({label: hash_files(data_dir / name)[:16] for label, name in INPUT_DIRS.items()})
    out["data/backbone"] = _backbone_stamp(data_dir / "backbone")
    out["code"] = hash_files(Path(__file__).resolve().parent, "**/*.py")[:16]
    out["layout"] = json.dumps(layout, sort_keys=True)
    return out
