"""Training batches: which samples each micro-step takes (`epoch_batches`), rendered into
left-padded prompt+response rows (`collate`) or padding-free packed rows (`packed_batch`,
`train.packing`), with the step's DM-VAE entities (`dm_entities`); `step_inputs` gives the
keyword inputs of `TTDSModule.loss` for one micro-step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from . import dynamic, packing, tasks
from .train_config import TrainConfig
from .vocab import encode_prompt, encode_response

if TYPE_CHECKING:
    from .model import IndexState


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


def user_token_drops(n_samples: int, cfg: TrainConfig, epoch: int) -> np.ndarray | None:
    """Which samples of `epoch` render without the user SID (`train.user_token_dropout`), or
    None when nothing is dropped. Seeded by (seed, epoch) on a stream of its own, so the
    sample order and templates are those of a run without dropout, and a resumed epoch
    drops the same prompts."""
    if cfg.user_dropout <= 0:
        return None
    return np.random.default_rng([cfg.seed, epoch, 1]).random(n_samples) < cfg.user_dropout


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
