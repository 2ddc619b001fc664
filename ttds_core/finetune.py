"""The `finetune` stage: LoRA fine-tuning of the backbone on the task mixture, with the
DM-VAE losses and the dynamic semantic index (paper eq. 15, SPEC "Dynamic index").

    L = L_LLM + loss.alpha * (L_ID + loss.beta * L_Token)        (L_ID/L_Token: loss.dm_vae)

This module is the loop, readable top to bottom (`run`). The pieces: `train_config` (the
run's settings and the fingerprint a checkpoint must match), `model` (TTDS as a model
object: its losses, its ranking, its set-up, validation and the index refresh), `batches`
(what each step trains on), `tasks` (the samples), `checkpoint` (the folder format, shared
with the baselines), `recommender` (writes `data/model`).

Learning rates (AdamW): `train.lr` for LoRA, `train.embedding_lr` for the new SID rows
and the codebook projections (they start from scratch), `train.quantizer_lr` for the
RQ-VAE quantizers of a dynamic index (they start from warmup and must not drift away
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

Warm start (`ttds finetune --warm-start <model folder>`, outside the DVC pipeline: the GPU
recipe's second slot): training starts from a trained model folder's trainable tensors and
SID tables (`recommender`: `trainable.safetensors`, `*_sids.parquet`) instead of fresh LoRA
weights and warm-up's index, with a fresh optimizer and learning-rate schedule over
`train.epochs`. The model must have been made with the same model, LoRA, index and tower
params and the same data (what is checked: every tensor's name and shape, and the SID
tables' sizes; the GPU recipe also refuses a model trained with other params); the cached X
of the items and users is the embed stage's until the first refresh. Not the uninterrupted
run's result: Adam's moments, the position in the schedule and the data order start again
(they cannot travel back from a GPU slot).
"""

from __future__ import annotations

import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import collaborative, tasks
from .batches import epoch_batches, step_inputs, user_token_drops
from .config import get, seed_everything
from .errors import TTDSError
from .io import write_json
from .model import (IndexState, TTDSModule, build_model, load_inputs, load_quantizers, make_optimizer, refresh_due,
                    refresh_index, trainable_state, validate)
from .train_config import TrainConfig, fingerprint
from .train_state import load_checkpoint, save_checkpoint


# ---------------------------------------------------------------- set-up

@dataclass
class Job:
    """What a run trains on and with, built once at start-up (`prepare`)."""
    data: tasks.TaskData
    samples: list[tasks.Sample]
    weights: dict[str, float]       # enabled tasks and their mixture weights
    val: list                       # the fixed validation users (user, history, target)
    texts: dict[str, list[str]]     # per tower: the texts a refresh re-embeds
    index: IndexState
    tokenizer: object
    module: TTDSModule


def prepare(params: dict, cfg: TrainConfig, data_dir: Path, max_history: int, device) -> Job:
    sequences, items, interactions, texts, x, tables = load_inputs(params, data_dir, cfg.towers)
    gamma, pairs = collaborative.cf_mix(params), None
    if gamma > 0:  # the item vectors the index was built from, from the sequences already read
        pairs = collaborative.transition_pairs(list(sequences["items"]))
        x["item"] = collaborative.mix(x["item"], pairs, gamma)
    index = IndexState(tables=tables, x=x, item_pairs=pairs)
    ts_align, sid_length = get(params, "tasks.ts_align", bool, False), get(params, "index.length", int)
    weights = tasks.enabled_tasks(get(params, "tasks.weights", dict), get(params, "tasks.high_order", bool),
                                  "user" in cfg.towers, ts_align)
    data = tasks.build_task_data(sequences, items, interactions, max_history,
                                 get(params, "tasks.max_next_user", int, min_value=1), cfg.packed,
                                 align_depth=sid_length - 1,
                                 align_words=get(params, "tasks.ts_align_words", int, 5, min_value=1))
    samples = tasks.build_samples(data, weights, cfg.seed)
    val = tasks.validation_samples(sequences, cfg.val_users, cfg.data_seed)
    quantizers = load_quantizers(data_dir, cfg.towers, x, cfg, sid_length, get(params, "index.codebook_size", int))
    lm, tokenizer, sid = build_model(params, cfg, index, texts, quantizers, data_dir / "backbone", device)
    module = TTDSModule(lm, sid, cfg, tokenizer.eos_token_id).to(device)
    module.train()
    return Job(data, samples, weights, val, texts, index, tokenizer, module)


def apply_warm_start(module: TTDSModule, index: IndexState, folder: Path) -> str:
    """Load a trained model folder's trainable tensors into `module` and its SID tables into
    `index` (module docstring, "Warm start"); returns the sha256 over every file it read
    (trainable tensors, quantizers, SID tables), so a checkpoint of the run resumes only
    from the same folder content."""
    from .dynamic import sid_strings
    from .io import load_tensors, read_parquet
    from .model import TOWER_FILES
    from .recommender import SID_COLUMNS

    path = folder / "trainable.safetensors"
    if not path.is_file():
        raise TTDSError(f"--warm-start {folder}: no trainable.safetensors there (a model folder written by finetune)")
    state, own = load_tensors(path), trainable_state(module, quantizers=False)
    # the quantizers are in quantizers.safetensors ("<tower>.<tensor>"), not twice in the folder
    stored_q = load_tensors(folder / "quantizers.safetensors")
    for tower, q in module.sid.quantizers.items():
        state.update({k: v for k, v in stored_q.items() if k.startswith(f"{tower}.")})
        own.update({f"{tower}.{k}": v for k, v in q.state_dict().items()})
    odd = sorted(set(own) ^ set(state)) or [k for k in sorted(own) if own[k].shape != state[k].shape]
    if odd:
        raise TTDSError(f"--warm-start {folder}: its tensor {odd[0]} does not fit this model (it needs the same "
                        f"model, lora, index and tower params)")
    for tower, q in module.sid.quantizers.items():
        q.load_state_dict({k[len(tower) + 1:]: state.pop(k) for k in list(state) if k.startswith(f"{tower}.")})
    module.load_state_dict(state, strict=False)
    for tower in list(index.tables):
        key = TOWER_FILES[tower][1]
        table = read_parquet(folder / f"{tower}_sids.parquet", SID_COLUMNS[tower])
        table = table[SID_COLUMNS[tower]].sort_values(key).reset_index(drop=True)
        if len(table) != len(index.tables[tower]):
            raise TTDSError(f"--warm-start {folder}: {tower}_sids.parquet has {len(table)} rows, this data "
                            f"{len(index.tables[tower])} (another data subset?)")
        sid_strings(table, key, len(table))  # checks completeness
        index.tables[tower] = table
    return warm_start_digest(folder, list(index.tables))


def warm_start_digest(folder: Path, towers: list[str]) -> str:
    """sha256 over the names and bytes of the files a warm start reads from `folder`."""
    import hashlib

    digest = hashlib.sha256()
    for name in ["trainable.safetensors", "quantizers.safetensors"] + [f"{t}_sids.parquet" for t in towers]:
        digest.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes())
    return digest.hexdigest()


def start_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    cuda = torch.cuda.is_available()
    # cpu=True without CUDA: under torchrun that selects gloo DDP over CPU processes.
    accelerator = Accelerator(cpu=not cuda, gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision="bf16" if cuda else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if cfg.threads is not None and accelerator.device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if accelerator.device.type == "cuda":
        # cuDNN's fused-attention backward returns NaN dQ when an explicit mask is passed,
        # the sequence width is 64 mod 128 and a query row's log-sum-exp is very negative
        # (pytorch/pytorch#196678, from torch 2.11). Every left-padded batch has such rows
        # (padding attends to nothing), so one batch of that width poisons every gradient.
        # The memory-efficient kernel (next in SDPA's order) is exact on the same inputs.
        torch.backends.cuda.enable_cudnn_sdp(False)
    return accelerator


# ---------------------------------------------------------------- the stage

def run(params: dict, data_dir: str | Path = "data", metrics_dir: str | Path = "metrics",
        live_dir: str | Path = "dvclive/finetune", warm_start: str | Path | None = None) -> dict:
    from transformers import get_cosine_schedule_with_warmup

    from .recommender import save_recommender

    t_start = time.time()
    data_dir, metrics_dir = Path(data_dir), Path(metrics_dir)
    cfg = TrainConfig.from_params(params)
    max_history = get(params, "data.max_history", int, min_value=1)
    accelerator = start_accelerator(cfg)
    device, main = accelerator.device, accelerator.is_main_process
    seed_everything(cfg.seed)
    job = prepare(params, cfg, data_dir, max_history, device)
    index, tokenizer = job.index, job.tokenizer
    warm = None
    if warm_start is not None:
        warm = {"from": str(warm_start), "sha256": apply_warm_start(job.module, index, Path(warm_start))}
        if main:
            print(f"finetune: warm start from {warm_start} (its weights and SID tables; a fresh optimizer "
                  f"and schedule)", file=sys.stderr)
    optimizer = make_optimizer(job.module, cfg)

    world, rank = accelerator.num_processes, accelerator.process_index
    samples_per_step = cfg.batch_size * cfg.grad_accum * world
    per_epoch = len(epoch_batches(job.samples, job.data, cfg, 0, rank, world)) // cfg.grad_accum
    if per_epoch == 0:
        raise TTDSError(f"train.batch_size x train.grad_accum x processes = "
                        f"{cfg.batch_size * cfg.grad_accum * world} exceeds the {len(job.samples)} training samples")
    total_steps = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps)
    stamp = fingerprint(params, data_dir, {"processes": world, "device": device.type,
                                           "precision": accelerator.mixed_precision})
    if warm is not None:  # a checkpoint resumes only the run that started from the same model
        stamp["warm_start"] = warm["sha256"][:16]
    ckpt = data_dir / "checkpoints" / "last"
    # the main process decides (and sets a stale checkpoint aside) before the others look
    p = load_checkpoint(ckpt, job.module, optimizer, scheduler, index, stamp, main) if main else None
    accelerator.wait_for_everyone()
    if not main:
        p = load_checkpoint(ckpt, job.module, optimizer, scheduler, index, stamp, main)
    epoch0, batch0 = p.epoch, p.batch
    module, optimizer = accelerator.prepare(job.module, optimizer)
    inner = accelerator.unwrap_model(module)

    live = None
    if main:
        from .live import open_live
        live = open_live(str(live_dir), resume=p.resumed_from is not None)
    if main and p.resumed_from is not None:
        print(f"finetune: resuming from step {p.step} ({ckpt})", file=sys.stderr)

    tokens_seen, t_compute, t0 = 0, 0.0, time.time()  # t_compute: train steps only
    window: dict[str, list[torch.Tensor]] = {}
    from tqdm.auto import tqdm
    bar = tqdm(total=total_steps, initial=p.step, desc="finetune", disable=not main, unit="step")
    done = p.step >= total_steps
    timed_out = stopped_early = False
    skipped: list[int] = []  # steps whose update was skipped for a non-finite gradient
    text_ids: dict[str, list[list[int]]] = {}  # texts tokenised once, re-embedded at every refresh
    # steps not yet read back: (step, lr, loss names, their means on the device, non-finite flag or None)
    pending: list[tuple[int, float, list[str], torch.Tensor, torch.Tensor | None]] = []
    base_opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer

    def out_of_time() -> bool:
        """`train.max_minutes` spent (every process decides alike: the slowest clock wins)."""
        nonlocal timed_out
        if cfg.max_minutes is None:
            return False
        late = time.time() - t0 > 60.0 * cfg.max_minutes
        if world > 1:
            late = accelerator.reduce(torch.tensor([float(late)], device=device), "max").item() > 0
        timed_out = bool(late)
        return timed_out

    def read_back() -> None:
        """The pending steps' losses and skip flags to the host in one transfer (the only host
        sync of the loop's steps), then the history rows and dvclive's curves, step by step."""
        if not pending:
            return
        flat = torch.cat([torch.cat([m, (f if f is not None else torch.zeros((), device=m.device)).reshape(1).double()])
                          for _, _, _, m, f in pending]).tolist()
        at = 0
        for step, lr, names, _, flag in pending:
            values, at = flat[at:at + len(names) + 1], at + len(names) + 1
            if flag is not None and values[-1] > 0:  # the fused step skipped this update on the device
                skipped.append(step)
                if main:
                    print(f"finetune: step {step}: non-finite gradient; update skipped", file=sys.stderr)
            row = {"step": step, "lr": lr, **{f"loss_{k}": v for k, v in zip(names, values)}}
            p.history.append(row)
            if live is not None:
                for k, v in row.items():
                    if k != "step":
                        live.log_metric(f"train/{k}", v)
                live.next_step()
        pending.clear()

    for epoch in range(epoch0, cfg.epochs):
        if done:
            break
        batches = epoch_batches(job.samples, job.data, cfg, epoch, rank, world)
        drops = user_token_drops(len(job.samples), cfg, epoch)
        usable = (len(batches) // cfg.grad_accum) * cfg.grad_accum
        for b in range(batch0 if epoch == epoch0 else 0, usable):
            # one micro-step: render the batch, forward, backward; the update at the last micro-step
            idx, tmpl = batches[b]
            tables_now = index.sid_tables()
            pairs = [tasks.render(job.samples[j], job.data, tables_now, t, tokenizer.eos_token,
                                  drop_user=drops is not None and bool(drops[j]))
                     for j, t in zip(idx, tmpl)]
            inputs, n_tokens = step_inputs(pairs, index, tokenizer, cfg, inner.sid, p.step, b, device)
            t_step = time.time()
            flag = None
            with accelerator.accumulate(module):
                losses = module(**inputs)
                accelerator.backward(losses["total"])
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(module.parameters(),
                                                       cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                    if cfg.fused_optimizer:
                        # decided on the device: the fused kernel skips the update where found_inf
                        # is 1 (one inf/NaN gradient would poison every weight through the clipping)
                        flag = (~torch.isfinite(norm)).float().reshape(())
                        base_opt.found_inf = flag
                        optimizer.step()
                    elif bool(torch.isfinite(norm)):
                        optimizer.step()
                    else:
                        skipped.append(p.step + 1)
                        if main:
                            report_non_finite(inner, p.step + 1)
                else:
                    optimizer.step()  # accelerate skips it between accumulation boundaries
                optimizer.zero_grad()
            t_compute += time.time() - t_step
            tokens_seen += n_tokens
            for k, v in losses.items():
                window.setdefault(k, []).append(v.detach())
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            p.step += 1
            bar.update(1)
            pending.append((p.step, scheduler.get_last_lr()[0], list(window),
                            torch.stack([torch.stack(v).double().mean() for v in window.values()]), flag))
            window = {}
            refresh = cfg.dynamic and refresh_due(p.step, samples_per_step, cfg.refresh_samples) and p.step < total_steps
            checkpoint = p.step % cfg.checkpoint_every == 0
            if p.step % cfg.log_every == 0 or refresh or checkpoint or p.step >= total_steps:
                read_back()
                done = p.step >= total_steps or out_of_time()
            if refresh:
                rec = refresh_index(inner, tokenizer, index, job.texts, params, p.step, device, text_ids)
                if main:
                    print(f"finetune: refresh at step {p.step}: " + ", ".join(
                        f"{k} {v:.3f}" for k, v in rec.items() if k != "step"), file=sys.stderr)
                    for k, v in rec.items():
                        if k != "step":
                            live.log_metric(f"index/{k}", v, plot=False)
            if checkpoint and not done:
                p.epoch, p.batch = epoch, b + 1
                if main:
                    save_checkpoint(ckpt, inner, base_opt, scheduler, index, p, stamp)
                accelerator.wait_for_everyone()
            if done:
                break
        read_back()  # before validation: the history is whole at every epoch end
        # epoch end (or the last step): validation and best-state bookkeeping
        metrics = validate(inner, tokenizer, job.val, index, cfg, max_history, device)
        if main and metrics:
            print(f"finetune: epoch {epoch} step {p.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                  file=sys.stderr)
            for k in ("val_HR@10", "val_NDCG@10", "val_loss", "val_sid_acc"):
                live.log_metric(f"val/{k}", metrics[k], plot=False)
        score = (metrics.get("val_NDCG@10", 0.0), metrics.get("val_HR@10", 0.0), -metrics.get("val_loss", 0.0))
        if p.best is None or score >= tuple(p.best["score"]):
            p.best = {"score": list(score), "step": p.step, **metrics}
            p.best_state = (trainable_state(inner), {t: tb.copy() for t, tb in index.tables.items()})
        p.validation.append({"epoch": epoch, "step": p.step, **metrics})
        # early stopping: `train.patience` validations without a better score. Every process
        # stops alike (their validations could differ in the last bit on a GPU).
        if cfg.patience is not None and not done:
            stale = float(sum(v["step"] > p.best["step"] for v in p.validation) >= cfg.patience)
            if accelerator.reduce(torch.tensor([stale], device=device), "max").item() > 0:
                stopped_early = done = True
                if main:
                    print(f"finetune: no better validation for {cfg.patience} epochs; stopping at step {p.step} "
                          f"(best: step {p.best['step']})", file=sys.stderr)
    t_train = time.time() - t0
    bar.close()

    if p.best_state is not None:  # the model saved is the best validated one, not the last
        unexpected = inner.load_state_dict(p.best_state[0], strict=False).unexpected_keys
        if unexpected:  # nothing would load, and the last state would be saved as the best
            raise TTDSError(f"best state does not match the model ({unexpected[0]})")
        index.tables = p.best_state[1]
    if main:
        save_recommender(data_dir / "model", inner, tokenizer, index.tables, cfg.towers, params,
                         trainable_state(inner, quantizers=False))
        last = p.history[-1] if p.history else {}
        first = p.history[0] if p.history else {}
        summary = {
            "steps": p.step, "epochs": cfg.epochs, "samples": len(job.samples),
            "task_counts": {t: sum(s.task == t for s in job.samples) for t in job.weights},
            "processes": world, "device": str(device),
            "loss_start": {k: v for k, v in first.items() if k.startswith("loss_")},
            "loss_end": {k: v for k, v in last.items() if k.startswith("loss_")},
            "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t_start, 1),
            "step_seconds": round(t_compute / max(len(p.history) - (p.resumed_from or 0), 1), 2),
            "tokens_per_second": round(tokens_seen * world / max(t_compute, 1e-9), 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "churn": index.churn, "best": p.best, "resumed_from_step": p.resumed_from,
            "stopped_by_max_minutes": timed_out, "stopped_early": stopped_early, "validation": p.validation,
            "planned_steps": total_steps, "skipped_steps": skipped, "warm_start": warm,
        }
        write_json(metrics_dir / "finetune.json", summary)
        live.end()
        shutil.rmtree(ckpt, ignore_errors=True)  # finished: nothing to resume
    accelerator.wait_for_everyone()
    return {"history": p.history, "best": p.best, "churn": index.churn}


def report_non_finite(module: TTDSModule, step: int) -> None:
    bad = [n for n, q in module.named_parameters() if q.grad is not None and not bool(torch.isfinite(q.grad).all())]
    print(f"finetune: step {step}: non-finite gradient in {len(bad)} tensors ({', '.join(bad[:4])}); update skipped",
          file=sys.stderr)
