"""One fine-tuning step, current vs lean: operator calls, host syncs, padding, CPU time.

    python -m bench.bench_step [--steps 3] [--large-layers 1] [--out FILE]

Builds the model exactly as `finetune` does from this workspace's pipeline outputs
(`data/processed`, `data/embeddings`, `data/quantizer`, `data/sids`, `data/backbone`:
run `dvc repro build_sids` first) and runs the real step -- `batches.step_inputs` (the
rendered task rows and the step's DM-VAE entities), `TTDSModule`, backward, clipping with
the finite check, AdamW, the loss read-back -- on the first full batches of epoch 0 in three
layouts:

- current: left-padded batch, DM-VAE terms in two more forwards (`train.packing: false`)
  with the params' LoRA dropout;
- packed: `train.packing: true` (padding-free rows, DM-VAE rows in the same forward);
- lean: packed, `lora.dropout: 0` (no dropout masks drawn in every adapted layer),
  `train.fused_optimizer: true` (one AdamW kernel per group; a non-finite step is skipped on
  the device instead of being checked on the host) and `train.log_every` > 1 (the losses are
  not read back after the step).

at batch 8 with the params' backbone depth (`model.num_layers`) and at batch 256 with
each of `--large-layers` decoder layers (one and two layers keep a 256-row CPU step to
seconds; the difference between them is what every further layer adds, so the calls of a
full-depth step, `--full-layers`, are extrapolated from them). Operator calls and host syncs
(`aten::_local_scalar_dense`: what `.item()`, `float()` and `bool()` of a tensor run; each
one stops a GPU until its queue drains; AdamW's reads of its host-side step counters are
not counted) are counted over one step after a warm-up, operator calls by torch.profiler; CPU seconds per sample are the mean of `--steps` further steps. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ttds_core import dynamic, finetune, tasks
from ttds_core.batches import dm_entities, epoch_batches, step_inputs
from ttds_core.config import get, load_params, seed_everything, with_overrides
from ttds_core.model import make_optimizer
from ttds_core.train_config import TrainConfig

VARIANTS = {"current": {}, "packed": {"train.packing": True},
            "lean": {"train.packing": True, "lora.dropout": 0.0, "train.fused_optimizer": True, "train.log_every": 50}}


class SyncCounter(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`aten::_local_scalar_dense`)."""

    def __init__(self):
        super().__init__()
        self.count, self._paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self._paused:
            self.count += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False


def measure(params: dict, batch_size: int, steps: int) -> dict:
    cfg = TrainConfig.from_params(params)
    torch.set_num_threads(cfg.threads or 1)
    seed_everything(cfg.seed)
    job = finetune.prepare(params, cfg, Path("data"), get(params, "data.max_history", int), "cpu")
    module, tok, index, samples, data = job.module, job.tokenizer, job.index, job.samples, job.data
    sid = module.sid
    optimizer = make_optimizer(module, cfg)
    # full batches only: the epoch's last, partial batch would understate the step
    batches = [b for b in epoch_batches(samples, data, cfg, 0, 0, 1) if len(b[0]) == batch_size]
    tables_now = index.sid_tables()

    syncs = SyncCounter()

    def one_step(b: int) -> tuple[int, float]:
        idx, tmpl = batches[b % len(batches)]
        pairs = [tasks.render(samples[j], data, tables_now, t, tok.eos_token) for j, t in zip(idx, tmpl)]
        with syncs.paused():  # data preparation reads host tensors only
            inputs, n_tokens = step_inputs(pairs, index, tok, cfg, sid, b, 0, "cpu")
        losses = module(**inputs)
        losses["total"].backward()
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
        if cfg.fused_optimizer:  # as the loop: the skip is decided on the device
            optimizer.found_inf = (~torch.isfinite(norm)).float().reshape(())
            optimizer.step()
        elif bool(torch.isfinite(norm)):  # as the loop: one inf/NaN gradient skips the update
            with syncs.paused():  # AdamW reads its step counters, which stay on the host on a GPU too
                optimizer.step()
        optimizer.zero_grad()
        means = torch.stack([v.detach().double() for v in losses.values()])
        if cfg.log_every == 1:
            means.tolist()  # the loop's read-back after every step
        shape = inputs["packed"].input_ids.shape if cfg.packing else inputs["input_ids"].shape
        positions = shape[0] * shape[1] + (0 if cfg.packing else sum(
            v[0].numel() for v in (inputs["dm"] or {}).values()))
        return n_tokens, positions

    from torch.profiler import ProfilerActivity, profile

    one_step(0)  # warm-up: allocator, kernels, lazy init
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        one_step(1)
    calls = int(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
    with syncs:  # a step of its own: the counting mode would add operator calls to the profile
        one_step(2)
    times, tokens, positions = [], 0, 0
    for b in range(3, 3 + steps):
        t = time.perf_counter()
        n, p = one_step(b)
        times.append(time.perf_counter() - t)
        tokens += n
        positions += p
    dm_tokens = 0
    if cfg.dm_vae:  # the DM-VAE rows' tokens are real work too
        for tower, (strings, _) in dm_entities(index, cfg, 0, 0).items():
            dm_tokens += sum(len(r) for r in dynamic.sid_token_rows(tok, strings))
    real = tokens + dm_tokens * steps
    return {"aten_calls_per_step": calls, "aten_calls_per_sample": round(calls / batch_size, 1),
            "host_syncs_per_step": syncs.count, "padding_share": round(1 - real / positions, 3),
            "seconds_per_step": round(float(np.mean(times)), 3),
            "ms_per_sample": round(1000 * float(np.mean(times)) / batch_size, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--large-layers", default="1,2", help="depths measured at the large batch")
    ap.add_argument("--full-layers", type=int, default=30, help="depth the large batch's calls are extrapolated to")
    ap.add_argument("--sizes", default="8,256", help="batch sizes (the first at the params' depth)")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args()
    base = load_params(args.params)
    result = {"threads": get(base, "train.threads", int, 1, allow_none=True), "rows": [], "extrapolated": []}
    large = [int(x) for x in args.large_layers.split(",")]
    for i, size in enumerate(int(s) for s in args.sizes.split(",")):
        depths = [get(base, "model.num_layers", int, 4, allow_none=True)] if i == 0 else large
        for layers in depths:
            for name, overrides in VARIANTS.items():
                params = with_overrides(base, {**overrides, "train.batch_size": size, "model.num_layers": layers})
                row = {"batch_size": size, "num_layers": layers, "variant": name, **measure(params, size, args.steps)}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
        if i > 0 and len(large) >= 2:
            for name in VARIANTS:
                (a, b) = [next(r for r in result["rows"] if (r["batch_size"], r["num_layers"], r["variant"]) == (size, d, name))
                          for d in large[:2]]
                per_layer = (b["aten_calls_per_step"] - a["aten_calls_per_step"]) / (large[1] - large[0])
                calls = a["aten_calls_per_step"] + per_layer * (args.full_layers - large[0])
                row = {"batch_size": size, "num_layers": args.full_layers, "variant": name,
                       "aten_calls_per_layer_per_step": round(per_layer), "aten_calls_per_step": round(calls),
                       "aten_calls_per_sample": round(calls / size, 1), "host_syncs_per_step": b["host_syncs_per_step"]}
                result["extrapolated"].append(row)
                print("extrapolated", json.dumps(row), flush=True)
    if args.out:
        from ttds_core.io import write_json
        write_json(args.out, result)


if __name__ == "__main__":
    main()
