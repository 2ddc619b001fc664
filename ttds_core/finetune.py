"""The `finetune` stage: LoRA fine-tuning of the backbone on the task mixture, with the
DM-VAE losses and the dynamic semantic index (paper eq. 15, SPEC "Dynamic index").

    L = L_LLM + loss.alpha * (L_ID + loss.beta * L_Token)        (L_ID/L_Token: loss.dm_vae)

Pieces: `tasks` builds and renders the samples, `dynamic` owns the SID rows, DM-VAE and
refresh, `recommender` writes / reads `data/model`. This module is the loop.

Speed on CPU: batches are left-padded and length-bucketed, and logits are computed only
at the positions that carry a label (`response_loss`): the 49k-row LM head dominates a
small backbone.

Learning rates (AdamW): `train.lr` for LoRA, `train.embedding_lr` for the new SID rows
and the codebook projections (they start from scratch), `train.tokenizer_lr` for the
RQ-VAE tokenizers of a dynamic index (they start from warmup and must not drift away
from it at the embedding rate). Linear warm-up (`train.warmup_ratio`) then cosine decay.

Validation (every epoch and at the end) runs the evaluation code on `train.val_users`
fixed validation users: HR@10 / NDCG@10 by trie-constrained beam search over every item
(`eval.beams`, `eval.scoring`, `eval.mask_history`), plus the teacher-forced loss of their
targets and the share whose whole SID is the arg-max (`val_sid_acc`). The best state by
validation NDCG@10 (then HR@10, then lower loss) is what `data/model` receives.

Resume: `data/checkpoints/last` holds everything that changes while training (trainable
weights, SID tables, cached X, optimizer, scheduler, RNG, position in the data); a rerun
made from the same params, inputs, code and process layout continues from it and saves the
same model as an uninterrupted run (the checkpoint also holds the best validated state); a
checkpoint made from anything else is set aside (`last.stale`) with one line and never resumed.
`train.patience` stops after that many epoch-end validations without a better score (a tie
counts as better: the score's last component, the validation loss, rarely ties).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import dynamic, packing, tasks
from .backbone import decoder_of, hf_model, quiet_peft
from .config import get, rng_state, seed_everything, set_rng_state
from .errors import TTDSError
from .io import atomic_dir, hash_files, load_tensors, read_json, read_npy, read_parquet, save_tensors, write_json, \
    write_npy, write_parquet
from .prompts import seqrec_packed, seqrec_prompt
from .vocab import encode_prompt, encode_response, extend_vocabulary


TOWER_FILES = {"item": ("items", "item_id"), "user": ("users", "user_id")}


# ---------------------------------------------------------------- config

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
    tokenizer_lr: float
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

    @classmethod
    def from_params(cls, params: dict) -> "TrainConfig":
        user = get(params, "tower.user", bool)
        train_seed = get(params, "train.seed", int, default=None, allow_none=True)
        cfg = cls(
            seed=train_seed if train_seed is not None else get(params, "seed", int),
            data_seed=get(params, "seed", int),
            towers=["item", "user"] if user else ["item"],
            dynamic=get(params, "index.dynamic", bool),
            kind=get(params, "index.kind", str, choices=("rq", "lsh", "random")),
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
            tokenizer_lr=get(params, "train.tokenizer_lr", float, 1.0e-4, min_value=0.0),
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
        )
        if get(params, "index.refresh_every", default=None) is not None:
            raise TTDSError("params: 'index.refresh_every' (optimizer steps) is now 'index.refresh_samples' "
                            "(training rows between refreshes: steps x batch x grad_accum x processes)")
        if cfg.patience is not None and cfg.val_users == 0:
            raise TTDSError("params: 'train.patience' needs validation users ('train.val_users' is 0)")
        return cfg


# Params that change what training computes; a checkpoint made under others is not resumed.
RESUME_KEYS = ("seed", "model", "index", "tower", "tasks", "loss", "init", "lora", "train", "data.max_history",
               "eval.beams", "eval.scoring", "eval.batch_size", "eval.mask_history",  # validation picks the best
               "embed.batch_size")                                                   # the index refresh re-embeds
NOT_RESUME_KEYS = ("train.checkpoint_every", "train.threads", "train.max_minutes")
# Input folders whose content determines training (the upstream stages' outputs): a checkpoint
# made from other files (other data, other SIDs after a warmup change...) is not resumed.
INPUT_DIRS = {"data/processed": "processed", "data/embeddings": "embeddings", "data/tokenizer": "tokenizer",
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


# ---------------------------------------------------------------- state of the index

@dataclass
class IndexState:
    """What the dynamic index changes: SID tables and the cached text representations X."""
    tables: dict[str, pd.DataFrame]
    x: dict[str, np.ndarray]
    churn: list[dict] = field(default_factory=list)

    def sid_tables(self) -> tasks.SidTables:
        item = dynamic.sid_strings(self.tables["item"], "item_id", len(self.x["item"]))
        user = dynamic.sid_strings(self.tables["user"], "user_id", len(self.x["user"])) \
            if "user" in self.tables else None
        return tasks.SidTables(item=item, user=user)


# ---------------------------------------------------------------- the trained module

SID_SOFTMAX = ("vocab", "sid")


def response_loss(lm, sid: dynamic.SidVocab, eos_id: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor, softmax: str = "vocab") -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the response tokens, correct [B, R]) -- labels -100 ignored;
    `correct` marks response tokens that are the arg-max of their candidates (True elsewhere).

    Logits are computed only where a label is: the LM head is 49k rows and dominates a
    small backbone, and most of a left-padded batch's last positions are padding.
    `vocab` (paper eq. 9): every token against the whole vocabulary. `sid`: a response
    that is a SID (its first token is a SID token) is scored against the SID tokens and
    EOS only -- the candidates constrained decoding can ever choose (`eval.scoring: sid`)
    -- so the new rows do not first have to out-score 49k text tokens; text responses
    (the preference task) keep the whole vocabulary.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generation computes them
    hidden = decoder_of(lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
    width, r = input_ids.shape[1], labels.shape[1]
    hidden = hidden[:, width - r - 1:width - 1]  # the state that predicts each label (right-aligned)
    valid = labels != -100
    coded = torch.zeros_like(valid)
    if softmax == "sid":
        first_label = labels.gather(1, valid.float().argmax(1, keepdim=True)).squeeze(1)
        coded = valid & ((first_label >= sid.first_id) & (first_label < sid.last_id)).unsqueeze(1)
    text = valid & ~coded
    coded_target = labels[coded]
    is_sid = (coded_target >= sid.first_id) & (coded_target < sid.last_id)
    if not bool((is_sid | (coded_target == eos_id)).all()):
        raise TTDSError("a SID response holds a token that is neither a SID token nor EOS")
    coded_target = torch.where(is_sid, coded_target - sid.first_id, torch.full_like(coded_target, sid.n_rows))
    total, hits = label_cross_entropy(lm, sid, eos_id, hidden[coded], coded_target, hidden[text], labels[text])
    correct = torch.ones_like(valid)
    correct[coded], correct[text] = hits
    return total / valid.sum().clamp(min=1), correct


def label_cross_entropy(lm, sid: dynamic.SidVocab, eos_id: int, h_coded: torch.Tensor, y_coded: torch.Tensor,
                        h_text: torch.Tensor, y_text: torch.Tensor
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(summed cross-entropy, (arg-max hits of the coded labels, of the text labels)).

    Coded labels (local SID rows; `sid.n_rows` = EOS) are scored over the SID rows + EOS,
    text labels (token ids) over the whole vocabulary through the LM head."""
    head = hf_model(lm).get_output_embeddings()
    total = h_coded.new_zeros((), dtype=torch.float32)
    hits = []
    for h, y, coded in ((h_coded, y_coded, True), (h_text, y_text, False)):
        if h.shape[0] == 0:
            hits.append(torch.zeros(0, dtype=torch.bool, device=h.device))
            continue
        if coded:
            eos_row = head.weight[eos_id:eos_id + 1].detach().to(h.dtype)
            logits = (h @ torch.cat([sid.out_weight().to(h.dtype), eos_row], dim=0).T).float()
        else:
            logits = head(h).float()
        total = total + F.cross_entropy(logits, y, reduction="sum")
        hits.append(logits.detach().argmax(-1) == y)
    return total, (hits[0], hits[1])


class TTDSModule(nn.Module):
    """The peft model (SID rows installed) + all losses in one forward, so DDP sees one
    forward per backward and synchronises every gradient, the DM-VAE ones included."""

    def __init__(self, lm, sid: dynamic.SidVocab, cfg: TrainConfig, eos_id: int):
        super().__init__()
        self.lm = lm
        self.eos_id = eos_id
        self._sid = (sid,)  # registered inside lm (input embedding wrapper)
        self.cfg = cfg

    @property
    def sid(self) -> dynamic.SidVocab:
        return self._sid[0]

    def forward(self, input_ids=None, attention_mask=None, labels=None, dm: dict | None = None,
                packed: packing.PackedBatch | None = None, dm_x: dict | None = None) -> dict:
        """The losses of a left-padded batch (+ `dm`: per tower the SID rows and X^I of the
        DM-VAE terms, two more forwards) or of a packed one (`packed`, DM-VAE rows inside;
        `dm_x`: their X^I per tower)."""
        if packed is not None:
            return self.packed_forward(packed, dm_x or {})
        l_llm = response_loss(self.lm, self.sid, self.eos_id, input_ids, attention_mask, labels,
                              self.cfg.sid_softmax)[0]
        decoder = decoder_of(self.lm)
        return self.combine(l_llm, [dynamic.dmvae_losses(decoder, self.sid.tokenizers[tower], ids, mask, x)
                                    for tower, (ids, mask, x) in (dm or {}).items()])

    def combine(self, l_llm: torch.Tensor, dm_parts: list[dict]) -> dict:
        """{llm, id, token, total}: L = L_LLM + alpha (L_ID + beta L_Token), the DM-VAE terms
        summed over the towers of `dm_parts` (none: L_LLM alone)."""
        losses, total = {"llm": l_llm}, l_llm
        if dm_parts:
            l_id = l_token = l_llm.new_zeros(())
            for part in dm_parts:
                l_id = l_id + part["id"]
                l_token = l_token + part["token"]
            losses.update(id=l_id, token=l_token)
            total = total + self.cfg.alpha * (l_id + self.cfg.beta * l_token)
        losses["total"] = total  # last: the order of the logged loss columns
        return losses

    def packed_forward(self, batch: packing.PackedBatch, dm_x: dict) -> dict:
        """The same losses from one forward of a packed batch (`packing`)."""
        hidden = decoder_of(self.lm)(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                     use_cache=False).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        total, _ = label_cross_entropy(self.lm, self.sid, self.eos_id, flat[batch.coded_pos], batch.coded_target,
                                       flat[batch.text_pos], batch.text_target)
        return self.combine(total / max(batch.n_labels, 1),
                            [dynamic.dmvae_terms(packing.mean_pool(flat, positions, slots, counts),
                                                 self.sid.tokenizers[tower], dm_x[tower])
                             for tower, (positions, slots, counts) in batch.pools.items()])


# ---------------------------------------------------------------- batches

def epoch_batches(samples: list[tasks.Sample], data: tasks.TaskData, cfg: TrainConfig, epoch: int,
                  rank: int, world: int) -> list[tuple[list[int], list[int]]]:
    """This process's (sample indices, templates) per micro-batch of `epoch`.

    Shuffled by (seed, epoch); inside chunks of `train.bucket_batches` batches the samples
    are sorted by prompt length so a batch carries little padding; the batch order is
    shuffled again. Every process sees the same number of batches.
    """
    rng = np.random.default_rng([cfg.seed, epoch])
    order = rng.permutation(len(samples))
    templates = rng.integers(0, 1 << 30, size=len(samples))
    chunk = cfg.batch_size * cfg.bucket
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s:s + chunk], key=lambda j: tasks.approx_length(samples[j], data))
        batches += [part[i:i + cfg.batch_size] for i in range(0, len(part), cfg.batch_size)]
    batches = [batches[j] for j in rng.permutation(len(batches))]
    usable = (len(batches) // world) * world
    mine = batches[rank:usable:world]
    return [([int(j) for j in b], [int(templates[j] % tasks.n_templates(samples[j].task)) for j in b])
            for b in mine]


def collate(pairs: list[tuple[str, str]], tokenizer, max_response_tokens: int, first_sid_id: int | None = None
            ) -> dict:
    """Left-padded prompt+response ids; labels [B, R] aligned to the end (response + EOS).

    Text responses are cut to `max_response_tokens`; SID responses (first token >=
    `first_sid_id`, e.g. a whole packed seqrec row) are never cut."""
    rows, responses = [], []
    for prompt, response in pairs:
        prompt_ids, resp = encode_pair(tokenizer, prompt, response, max_response_tokens, first_sid_id)
        rows.append(prompt_ids + resp)
        responses.append(resp)
    width = max(len(r) for r in rows)
    r_width = max(len(r) for r in responses)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), r_width), -100, dtype=torch.long)
    for j, (r, resp) in enumerate(zip(rows, responses)):
        ids[j, width - len(r):] = torch.tensor(r)
        mask[j, width - len(r):] = 1
        labels[j, r_width - len(resp):] = torch.tensor(resp)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def encode_pair(tokenizer, prompt: str, response: str, max_response_tokens: int, first_sid_id: int | None
                ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS); a text response is cut to `max_response_tokens`."""
    resp = encode_response(tokenizer, response)
    is_sid = first_sid_id is not None and resp[0] >= first_sid_id
    if len(resp) > max_response_tokens + 1 and not is_sid:
        resp = resp[:max_response_tokens] + [tokenizer.eos_token_id]
    return encode_prompt(tokenizer, prompt), resp


def dm_entities(state: IndexState, cfg: TrainConfig, step: int, micro: int) -> dict[str, tuple[list[str], np.ndarray]]:
    """A seeded sample of entities per tower for the DM-VAE terms of this micro-step:
    (their SID strings, their cached X^I rows)."""
    rng = np.random.default_rng([cfg.seed, 7, step, micro])
    tables = state.sid_tables()
    out = {}
    for tower in cfg.towers:
        strings = tables.item if tower == "item" else tables.user
        pick = rng.choice(len(strings), size=min(cfg.dmvae_batch, len(strings)), replace=False)
        out[tower] = ([strings[j] for j in pick], state.x[tower][pick])
    return out


def dm_batch(state: IndexState, tokenizer, cfg: TrainConfig, step: int, micro: int, device) -> dict:
    """The DM-VAE entities of this micro-step as left-padded SID rows (their own forwards)."""
    out = {}
    for tower, (strings, x) in dm_entities(state, cfg, step, micro).items():
        ids, mask = dynamic.encode_sids(tokenizer, strings, device)
        out[tower] = (ids, mask, torch.as_tensor(x, device=device))
    return out


def packed_batch(pairs: list[tuple[str, str]], dm: dict, tokenizer, cfg: TrainConfig, sid: dynamic.SidVocab
                 ) -> tuple[packing.PackedBatch, dict[str, torch.Tensor]]:
    """The task pairs and the DM-VAE entities `dm` (`dm_entities`) as one packed batch,
    with the entities' X^I per tower."""
    segments = []
    for prompt, response in pairs:
        prompt_ids, resp = encode_pair(tokenizer, prompt, response, cfg.max_response_tokens, sid.first_id)
        coded = cfg.sid_softmax == "sid" and sid.first_id <= resp[0] < sid.last_id
        segments.append(packing.Segment(prompt_ids + resp, n_labels=len(resp), coded=coded))
    for tower, (strings, _) in dm.items():
        segments += [packing.Segment(ids, pool=(tower, slot))
                     for slot, ids in enumerate(dynamic.sid_token_rows(tokenizer, strings))]
    batch = packing.pack(segments, tokenizer.pad_token_id, sid.first_id, sid.n_rows, tokenizer.eos_token_id)
    return batch, {tower: torch.as_tensor(x) for tower, (_, x) in dm.items()}


def step_inputs(pairs: list[tuple[str, str]], index: IndexState, tokenizer, cfg: TrainConfig, sid: dynamic.SidVocab,
                step: int, micro: int, device) -> tuple[dict, int]:
    """(keyword inputs of `TTDSModule` for this micro-step, task tokens in them): the rendered
    `pairs` and the step's DM-VAE entities, packed (`train.packing`) or left-padded."""
    if cfg.packing:
        entities = dm_entities(index, cfg, step, micro) if cfg.dm_vae else {}
        packed, dm_x = packed_batch(pairs, entities, tokenizer, cfg, sid)
        return {"packed": packed.to(device), "dm_x": {t: v.to(device) for t, v in dm_x.items()}}, packed.n_task_tokens
    batch = collate(pairs, tokenizer, cfg.max_response_tokens, sid.first_id)  # counted on the host
    dm = dm_batch(index, tokenizer, cfg, step, micro, device) if cfg.dm_vae else None
    return {**{k: v.to(device) for k, v in batch.items()}, "dm": dm}, int(batch["attention_mask"].sum())


# ---------------------------------------------------------------- setup

def load_inputs(params: dict, data_dir: Path, towers: list[str]):
    processed = data_dir / "processed"
    sequences = read_parquet(processed / "sequences.parquet", ["user_id", "items"])
    items = read_parquet(processed / "items.parquet", ["item_id", "title", "text"]).sort_values("item_id")
    users = read_parquet(processed / "users.parquet", ["user_id", "text"]).sort_values("user_id")
    inter_path = processed / "interactions.parquet"  # optional: timestamps and reviews
    interactions = read_parquet(inter_path, ["user_id", "item_id", "split"]) if inter_path.exists() else None
    texts = {"item": items["text"].tolist(), "user": users["text"].tolist()}
    x, tables = {}, {}
    for tower in towers:
        name, key = TOWER_FILES[tower]
        x[tower] = read_npy(data_dir / "embeddings" / f"{name}.npy").astype(np.float32)
        if len(x[tower]) != len(texts[tower]):
            raise TTDSError(f"{data_dir}/embeddings/{name}.npy: {len(x[tower])} rows, "
                            f"{name}.parquet has {len(texts[tower])}")
        tables[tower] = read_parquet(data_dir / "sids" / f"{name}.parquet", [key, "codes", "suffix", "sid"])
        tables[tower] = tables[tower][[key, "codes", "suffix", "sid"]].sort_values(key).reset_index(drop=True)
        dynamic.sid_strings(tables[tower], key, len(texts[tower]))  # checks completeness
    return sequences, items, interactions, texts, x, tables


def load_tokenizers(data_dir: Path, towers: list[str], x: dict, cfg: TrainConfig, length: int,
                    codebook_size: int) -> dict[str, nn.Module]:
    from .quantize import load_quantizer

    out = {}
    for tower in towers:
        path = data_dir / "tokenizer" / f"{tower}.safetensors"
        q, qcfg = load_quantizer(path, in_dim=x[tower].shape[1])
        if q.kind != cfg.kind or q.length != length or q.codebook_size != codebook_size:
            raise TTDSError(f"{path}: tokenizer is {q.kind} {q.length}x{q.codebook_size}, params ask for "
                            f"{cfg.kind} {length}x{codebook_size} (rerun warmup)")
        trainable = cfg.dynamic and q.kind == "rq"
        for p in q.parameters():
            p.requires_grad_(trainable)
        out[tower] = q.train(trainable)
    return out


def build_model(params: dict, cfg: TrainConfig, index: IndexState, texts: dict, tokenizers: dict,
                backbone_dir: Path, device):
    """(peft model with SID rows installed, tokenizer, SidVocab)."""
    from peft import LoraConfig, get_peft_model

    from .backbone import load_backbone

    length = get(params, "index.length", int, min_value=1)
    size = get(params, "index.codebook_size", int, min_value=2)
    max_suffix = get(params, "index.max_suffix", int, min_value=1)
    init = get(params, "init.sid_embeddings", str, choices=("random", "semantic"))
    model, tokenizer = load_backbone(params, device=device, backbone_dir=backbone_dir)
    layouts = dynamic.make_layouts(cfg.towers, length, size, max_suffix)
    for lay in layouts:
        dynamic.check_table_fits(index.tables[lay.tower], lay, f"data/sids/{TOWER_FILES[lay.tower][0]}.parquet")
    new_tokens = [t for lay in layouts for t in lay.tokens()]
    old_emb = model.get_input_embeddings().weight.detach()
    std = float(old_emb.float().std())
    ids = extend_vocabulary(model, tokenizer, new_tokens)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise TTDSError("tokenizer assigned non-contiguous ids to the SID tokens")
    sid = dynamic.SidVocab(ids[0], layouts, model.config.hidden_size, tied_head=dynamic.is_tied(model),
                           tokenizers=tokenizers, tie_codebooks=cfg.tie)
    semantic = None
    if init == "semantic":
        max_tokens = get(params, "model.max_text_tokens", int, 64, min_value=1)
        semantic = {t: (dynamic.table_codes(index.tables[t], TOWER_FILES[t][1]),
                        dynamic.token_text_embeddings(model, tokenizer, texts[t], max_tokens))
                    for t in cfg.towers}
    dynamic.init_rows(sid, std, torch.Generator().manual_seed(cfg.seed), semantic)
    lora = LoraConfig(r=get(params, "lora.r", int, min_value=1), lora_alpha=get(params, "lora.alpha", int, min_value=1),
                      lora_dropout=get(params, "lora.dropout", float, min_value=0.0),
                      target_modules=list(get(params, "lora.targets", list)), task_type="CAUSAL_LM")
    try:
        with quiet_peft():  # fp32_adapters false: adapters in the backbone's dtype (bf16 on a GPU)
            model = get_peft_model(model, lora, autocast_adapter_dtype=get(params, "lora.fp32_adapters", bool))
    except ValueError as exc:
        raise TTDSError(f"params: 'lora.targets' do not match the backbone's modules ({exc})") from None
    dynamic.install(model, sid.to(device))
    return model, tokenizer, sid


def make_optimizer(module: TTDSModule, cfg: TrainConfig) -> torch.optim.Optimizer:
    sid, groups = module.sid, {"lora": [], "rows": [], "tokenizer": []}
    tok_ids = {id(p) for p in sid.tokenizers.parameters()}
    row_ids = {id(p) for n, p in sid.named_parameters() if id(p) not in tok_ids}
    for name, p in module.named_parameters():
        if id(p) in tok_ids:
            if p.requires_grad:
                groups["tokenizer"].append(p)
        elif id(p) in row_ids:
            p.requires_grad_(True)
            groups["rows"].append(p)
        elif p.requires_grad:
            groups["lora"].append(p)
    spec = [{"params": groups["lora"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": groups["rows"], "lr": cfg.embedding_lr, "weight_decay": 0.0},
            {"params": groups["tokenizer"], "lr": cfg.tokenizer_lr, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in spec if g["params"]])


def trainable_state(module: TTDSModule) -> dict[str, torch.Tensor]:
    """Everything that training changes: LoRA weights and the SidVocab (rows, projections,
    tokenizers with their buffers). The frozen backbone is not saved."""
    sid_prefix = None
    for name, mod in module.named_modules():
        if mod is module.sid:
            sid_prefix = name + "."
            break
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if "lora_" in k or (sid_prefix and k.startswith(sid_prefix))}


# ---------------------------------------------------------------- validation

@torch.no_grad()
def validate(module: TTDSModule, tokenizer, val: list, index: IndexState, cfg: TrainConfig, max_history: int,
             device) -> dict:
    """Validation on the fixed users `val`: HR@10 / NDCG@10 of their validation targets by
    the evaluation code (trie-constrained beam search over every item, `eval.*` settings,
    masked per `eval.mask_history`), plus the teacher-forced loss and whole-SID arg-max
    accuracy of those targets."""
    from .cases import target_ranks
    from .metrics import metric_table
    from .ranker import Case, PromptBuilder, rank_cases, ranker_for

    if not val:
        return {}
    was_training = module.training
    module.eval()
    try:
        tables = index.sid_tables()
        total_loss, n_tok, exact = 0.0, 0, 0
        for s in range(0, len(val), cfg.batch_size):
            pairs = []
            for user, history, target in val[s:s + cfg.batch_size]:
                hist = [tables.item[i] for i in history[-max_history:]]
                user_sid = tables.user[user] if tables.user is not None else None
                pairs.append((seqrec_prompt(hist, user_sid, cfg.template, cfg.packed, tokenizer.eos_token),
                              tables.item[target]))
            batch = {k: v.to(device) for k, v in collate(pairs, tokenizer, cfg.max_response_tokens).items()}
            labels = batch["labels"]
            loss, correct = response_loss(module.lm, module.sid, module.eos_id, batch["input_ids"],
                                          batch["attention_mask"], labels, cfg.sid_softmax)
            n = int((labels != -100).sum())
            total_loss += float(loss) * n
            n_tok += n
            exact += int(correct.all(-1).sum())  # whole SID right: every token is the arg-max
        # Ranking through the evaluation code, on the training model itself: the SID rows are
        # written into the backbone's (frozen) rows first, which the wrappers shadow anyway,
        # so a SID-only head built from them (`eval.scoring: sid`) sees the current rows.
        dynamic.bake(module.lm.get_base_model(), module.sid)
        item_table = index.tables["item"]
        user_table = index.tables.get("user")
        ranker, _ = ranker_for(module.lm, tokenizer, item_table, cfg.val_beams, cfg.val_scoring, "item SID table")
        builder = PromptBuilder(tokenizer, item_table, user_table, cfg.template, cfg.packed)
        cases = [Case(user, "valid", history[-max_history:], history, target) for user, history, target in val]
        ranked = rank_cases(ranker, builder, cases, cfg.val_batch, modes=(cfg.val_masked,))
        ranks = target_ranks(cases, ranked)[cfg.val_masked]
        table = metric_table(ranks, [10])
        return {"val_HR@10": table["HR@10"], "val_NDCG@10": table["NDCG@10"],
                "val_loss": total_loss / max(n_tok, 1), "val_sid_acc": exact / len(val), "val_users": len(val)}
    finally:
        module.train(was_training)


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, module: TTDSModule, optimizer, scheduler, index: IndexState, progress: dict,
                    stamp: dict, history: list, best_state=None) -> None:
    """Everything a resumed run needs, in one atomic folder: trainable tensors, optimizer,
    scheduler, RNG states, the index, the history, and the best validated state so far
    (`best_state`: its tensors and SID tables), so the resumed run saves the same model."""
    with atomic_dir(path) as tmp:
        save_tensors(tmp / "trainable.safetensors", trainable_state(module))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        rng_t, rng_j = rng_state()
        save_tensors(tmp / "rng.safetensors", rng_t)
        for tower, table in index.tables.items():
            write_parquet(tmp / f"{tower}_sids.parquet", table)
            write_npy(tmp / f"{tower}_x.npy", index.x[tower])
        if best_state is not None:
            save_tensors(tmp / "best_trainable.safetensors", best_state[0])
            for tower, table in best_state[1].items():
                write_parquet(tmp / f"best_{tower}_sids.parquet", table)
        write_json(tmp / "state.json", {"fingerprint": stamp, **progress, "rng": rng_j,
                                        "churn": index.churn, "history": history})


def set_aside(path: Path, why: str, main: bool = True) -> None:
    """Move an unusable checkpoint out of the way (kept for inspection), saying why in one
    line (the main process does; the others only leave it alone)."""
    if not main:
        return
    aside = path.with_name(path.name + ".stale")
    replaced = " (replacing an older one)" if aside.exists() else ""
    try:
        if aside.is_dir():
            shutil.rmtree(aside)
        elif aside.exists():
            aside.unlink()
        os.replace(path, aside)
    except OSError as exc:
        raise TTDSError(f"{path} {why}, and it could not be set aside as {aside} ({exc.strerror}): "
                        "move or delete it") from None
    print(f"finetune: {path} {why}; set aside as {aside}{replaced}, starting fresh", file=sys.stderr)


def load_checkpoint(path: Path, module: TTDSModule, optimizer, scheduler, index: IndexState, stamp: dict,
                    main: bool = True):
    """(progress dict, best state or None) when `path` holds a checkpoint made from the same
    params and inputs, else (None, None): a checkpoint from anything else is set aside."""
    if not (path / "state.json").exists():
        return None, None
    state = read_json(path / "state.json")
    made = state.get("fingerprint")
    if not isinstance(made, dict):
        set_aside(path, "was written by an older version (no input fingerprint)", main)
        return None, None
    changed = [k for k in stamp if made.get(k) != stamp[k]]
    if changed:
        set_aside(path, "was made from other " + ", ".join(changed), main)
        return None, None
    best_state = None
    if state.get("best") is not None:
        if not (path / "best_trainable.safetensors").exists():
            set_aside(path, "has a best step but not its state", main)
            return None, None
        best_state = (load_tensors(path / "best_trainable.safetensors"),
                      {t: read_parquet(path / f"best_{t}_sids.parquet") for t in index.tables})
        unknown = set(best_state[0]) - set(module.state_dict())
        if unknown:
            raise TTDSError(f"{path}: best state does not match the model ({sorted(unknown)[0]})")
    missing, unexpected = module.load_state_dict(load_tensors(path / "trainable.safetensors"), strict=False)
    if unexpected:
        raise TTDSError(f"{path}: checkpoint does not match the model ({unexpected[0]})")
    blob = torch.load(path / "optim.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    for tower in list(index.tables):
        index.tables[tower] = read_parquet(path / f"{tower}_sids.parquet")
        index.x[tower] = read_npy(path / f"{tower}_x.npy")
    index.churn = state.get("churn", [])
    set_rng_state(load_tensors(path / "rng.safetensors"), state["rng"])
    return state, best_state


# ---------------------------------------------------------------- refresh

def refresh_due(step: int, samples_per_step: int, every: int) -> bool:
    """Whether optimizer step `step` crossed a multiple of `every` training rows (the
    refresh schedule, `index.refresh_samples`, scales with the batch: 800 rows are 100
    steps at batch 8, and about 3 at batch 256)."""
    return step * samples_per_step // every > (step - 1) * samples_per_step // every


def refresh_index(module: TTDSModule, tokenizer, index: IndexState, texts: dict, params: dict, step: int,
                  device, token_ids: dict | None = None) -> dict:
    """Re-derive every tower's SIDs with the current LLM and tokenizers (dynamic index).
    `token_ids`: a per-tower cache of the tokenised texts, filled at the first refresh."""
    from .embed import tokenize_texts

    max_tokens = get(params, "model.max_text_tokens", int, 64, min_value=1)
    embed_kwargs = {"batch_size": get(params, "embed.batch_size", int, 32, min_value=1),
                    "max_tokens": max_tokens, "device": device, "progress": False}
    token_ids = {} if token_ids is None else token_ids
    record = {"step": step}
    for lay in module.sid.layouts:
        if lay.tower not in token_ids:
            token_ids[lay.tower] = tokenize_texts(tokenizer, texts[lay.tower], max_tokens, lay.tower)
        x, table, ch = dynamic.refresh_tower(module.lm, tokenizer, module.sid.tokenizers[lay.tower],
                                             texts[lay.tower], index.tables[lay.tower], lay,
                                             {**embed_kwargs, "token_ids": token_ids[lay.tower]},
                                             margin=get(params, "index.refresh_margin", float, 0.2,
                                                        min_value=0.0))
        index.x[lay.tower], index.tables[lay.tower] = x, table
        # churn -> churn_item, churn_level_2 -> churn_item_level_2
        record.update({f"churn_{lay.tower}{k[len('churn'):]}": v for k, v in ch.items()})
    index.churn.append(record)
    return record


# ---------------------------------------------------------------- the stage

def run(params: dict, data_dir: str | Path = "data", metrics_dir: str | Path = "metrics",
        live_dir: str | Path = "dvclive/finetune") -> dict:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from transformers import get_cosine_schedule_with_warmup

    from .recommender import save_recommender

    t_start = time.time()
    data_dir, metrics_dir = Path(data_dir), Path(metrics_dir)
    cfg = TrainConfig.from_params(params)
    max_history = get(params, "data.max_history", int, min_value=1)
    cuda = torch.cuda.is_available()
    # cpu=True without CUDA: under torchrun that selects gloo DDP over CPU processes.
    accelerator = Accelerator(cpu=not cuda, gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision="bf16" if cuda else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    device, main = accelerator.device, accelerator.is_main_process
    if cfg.threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        # cuDNN's fused-attention backward returns NaN dQ when an explicit mask is passed,
        # the sequence width is 64 mod 128 and a query row's log-sum-exp is very negative
        # (pytorch/pytorch#196678, from torch 2.11). Every left-padded batch has such rows
        # (padding attends to nothing), so one batch of that width poisons every gradient.
        # The memory-efficient kernel (next in SDPA's order) is exact on the same inputs.
        torch.backends.cuda.enable_cudnn_sdp(False)
    seed_everything(cfg.seed)

    sequences, items, interactions, texts, x, tables = load_inputs(params, data_dir, cfg.towers)
    index = IndexState(tables=tables, x=x)
    ts_align, sid_length = get(params, "tasks.ts_align", bool, False), get(params, "index.length", int)
    if ts_align and sid_length < 2:
        raise TTDSError("params: 'tasks.ts_align' needs SID prefixes, i.e. 'index.length' >= 2")
    weights = tasks.enabled_tasks(get(params, "tasks.weights", dict), get(params, "tasks.high_order", bool),
                                  "user" in cfg.towers, ts_align)
    data = tasks.build_task_data(sequences, items, interactions, max_history,
                                 get(params, "tasks.max_next_user", int, min_value=1), cfg.packed,
                                 align_depth=sid_length - 1,
                                 align_words=get(params, "tasks.ts_align_words", int, 5, min_value=1))
    samples = tasks.build_samples(data, weights, cfg.seed)
    val = tasks.validation_samples(sequences, cfg.val_users, cfg.data_seed)

    tokenizers = load_tokenizers(data_dir, cfg.towers, x, cfg, sid_length,
                                 get(params, "index.codebook_size", int))
    lm, tokenizer, sid = build_model(params, cfg, index, texts, tokenizers, data_dir / "backbone", device)
    module = TTDSModule(lm, sid, cfg, tokenizer.eos_token_id).to(device)
    module.train()
    optimizer = make_optimizer(module, cfg)

    world, rank = accelerator.num_processes, accelerator.process_index
    samples_per_step = cfg.batch_size * cfg.grad_accum * world
    per_epoch = len(epoch_batches(samples, data, cfg, 0, rank, world)) // cfg.grad_accum
    if per_epoch == 0:
        raise TTDSError(f"train.batch_size x train.grad_accum x processes = "
                        f"{cfg.batch_size * cfg.grad_accum * world} exceeds the {len(samples)} training samples")
    total_steps = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    stamp = fingerprint(params, data_dir, {"processes": world, "device": device.type,
                                           "precision": accelerator.mixed_precision})
    ckpt = data_dir / "checkpoints" / "last"
    # the main process decides (and sets a stale checkpoint aside) before the others look
    progress, best_state = load_checkpoint(ckpt, module, optimizer, scheduler, index, stamp, main) \
        if main else (None, None)
    accelerator.wait_for_everyone()
    if not main:
        progress, best_state = load_checkpoint(ckpt, module, optimizer, scheduler, index, stamp, main)
    step = progress["step"] if progress else 0
    epoch0, batch0 = (progress["epoch"], progress["batch"]) if progress else (0, 0)
    history = progress.get("history", []) if progress else []
    best = progress.get("best") if progress else None
    curve = progress.get("validation", []) if progress else []  # one record per epoch-end validation
    module, optimizer = accelerator.prepare(module, optimizer)
    inner = accelerator.unwrap_model(module)

    live = None
    if main:
        from dvclive import Live
        live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, resume=progress is not None,
                    report=None)
    if main and progress:
        print(f"finetune: resuming from step {step} ({ckpt})", file=sys.stderr)

    tokens_seen, t_compute, t0 = 0, 0.0, time.time()  # t_compute: train steps only
    window: dict[str, list[float]] = {}
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=step, desc="finetune", disable=not main, unit="step")
    done = step >= total_steps
    timed_out = False
    stopped_early = False
    skipped: list[int] = []  # steps whose update was skipped for a non-finite gradient
    text_ids: dict[str, list[list[int]]] = {}  # texts tokenised once, re-embedded at every refresh

    def out_of_time() -> bool:
        """`train.max_minutes` spent (every process decides alike: the slowest clock wins)."""
        nonlocal timed_out
        if cfg.max_minutes is None:
            return False
        late = torch.tensor([float(time.time() - t0 > 60.0 * cfg.max_minutes)], device=device)
        timed_out = bool(accelerator.reduce(late, "max").item() > 0)
        return timed_out
    for epoch in range(epoch0, cfg.epochs):
        if done:
            break
        batches = epoch_batches(samples, data, cfg, epoch, rank, world)
        usable = (len(batches) // cfg.grad_accum) * cfg.grad_accum
        start = batch0 if epoch == epoch0 else 0
        for b in range(start, usable):
            idx, tmpl = batches[b]
            tables_now = index.sid_tables()
            pairs = [tasks.render(samples[j], data, tables_now, t, tokenizer.eos_token) for j, t in zip(idx, tmpl)]
            inputs, n_tokens = step_inputs(pairs, index, tokenizer, cfg, inner.sid, step, b, device)
            t_step = time.time()
            with accelerator.accumulate(module):
                losses = module(**inputs)
                accelerator.backward(losses["total"])
                finite = True
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(module.parameters(),
                                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                    finite = bool(torch.isfinite(norm))
                if finite:
                    optimizer.step()
                else:  # one inf/NaN gradient would poison every weight through the clipping
                    skipped.append(step + 1)
                    if main:
                        bad = [n for n, p in inner.named_parameters()
                               if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
                        print(f"finetune: step {step + 1}: non-finite gradient in {len(bad)} tensors "
                              f"({', '.join(bad[:4])}); update skipped", file=sys.stderr)
                optimizer.zero_grad()
            t_compute += time.time() - t_step
            tokens_seen += n_tokens
            for k, v in losses.items():  # read back once per step, below: each read is a host sync
                window.setdefault(k, []).append(v.detach())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            bar.update(1)
            means = torch.stack([torch.stack(v).double().mean() for v in window.values()]).tolist()
            row = {"step": step, "lr": scheduler.get_last_lr()[0],
                   **{f"loss_{k}": m for k, m in zip(window, means)}}
            window = {}
            history.append(row)
            if live is not None:
                for k, v in row.items():
                    if k != "step":
                        live.log_metric(f"train/{k}", v)
                live.next_step()
            if cfg.dynamic and refresh_due(step, samples_per_step, cfg.refresh_samples) and step < total_steps:
                rec = refresh_index(inner, tokenizer, index, texts, params, step, device, text_ids)
                if main:
                    print(f"finetune: refresh at step {step}: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in rec.items() if k != "step"), file=sys.stderr)
                    for k, v in rec.items():
                        if k != "step":
                            live.log_metric(f"index/{k}", v, plot=False)
            done = step >= total_steps or out_of_time()
            if step % cfg.checkpoint_every == 0 and not done:
                if main:
                    save_checkpoint(ckpt, inner, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                    scheduler, index, {"step": step, "epoch": epoch, "batch": b + 1, "best": best,
                                                       "validation": curve},
                                    stamp, history, best_state)
                accelerator.wait_for_everyone()
            if done:
                break
        # epoch end (or the last step): validation and best-state bookkeeping
        metrics = validate(inner, tokenizer, val, index, cfg, max_history, device)
        if main and metrics:
            print(f"finetune: epoch {epoch} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                  file=sys.stderr)
            for k in ("val_HR@10", "val_NDCG@10", "val_loss", "val_sid_acc"):
                live.log_metric(f"val/{k}", metrics[k], plot=False)
        score = (metrics.get("val_NDCG@10", 0.0), metrics.get("val_HR@10", 0.0), -metrics.get("val_loss", 0.0))
        if best is None or score >= tuple(best["score"]):
            best = {"score": list(score), "step": step, **metrics}
            best_state = (trainable_state(inner), {t: tb.copy() for t, tb in index.tables.items()})
        curve.append({"epoch": epoch, "step": step, **metrics})
        # early stopping: `train.patience` validations without a better score. Every process
        # stops alike (their validations could differ in the last bit on a GPU).
        if cfg.patience is not None and not done:
            stale = float(sum(v["step"] > best["step"] for v in curve) >= cfg.patience)
            if accelerator.reduce(torch.tensor([stale], device=device), "max").item() > 0:
                stopped_early = done = True
                if main:
                    print(f"finetune: no better validation for {cfg.patience} epochs; stopping at step {step} "
                          f"(best: step {best['step']})", file=sys.stderr)
    t_train = time.time() - t0
    bar.close()

    if best_state is not None:
        unexpected = inner.load_state_dict(best_state[0], strict=False).unexpected_keys
        if unexpected:  # nothing would load, and the last state would be saved as the best
            raise TTDSError(f"best state does not match the model ({unexpected[0]})")
        index.tables = best_state[1]
    if main:
        save_recommender(data_dir / "model", inner, tokenizer, index.tables, cfg.towers, params)
        last = history[-1] if history else {}
        first = history[0] if history else {}
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary = {
            "steps": step, "epochs": cfg.epochs, "samples": len(samples),
            "task_counts": {t: sum(s.task == t for s in samples) for t in weights},
            "processes": world, "device": str(device),
            "loss_start": {k: v for k, v in first.items() if k.startswith("loss_")},
            "loss_end": {k: v for k, v in last.items() if k.startswith("loss_")},
            "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t_start, 1),
            "step_seconds": round(t_compute / max(len(history) - (progress["step"] if progress else 0), 1), 2),
            "tokens_per_second": round(tokens_seen * world / max(t_compute, 1e-9), 1),
            "peak_rss_mb": round(peak_mb, 1), "churn": index.churn, "best": best,
            "resumed_from_step": progress["step"] if progress else None,
            "stopped_by_max_minutes": timed_out, "stopped_early": stopped_early, "validation": curve,
            "planned_steps": total_steps, "skipped_steps": skipped,
        }
        write_json(metrics_dir / "finetune.json", summary)
        live.end()
        shutil.rmtree(ckpt, ignore_errors=True)  # finished: nothing to resume
    accelerator.wait_for_everyone()
    return {"history": history, "best": best, "churn": index.churn}
