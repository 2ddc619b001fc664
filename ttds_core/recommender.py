"""The trained recommender on disk (`data/model/`, see docs/architecture.md) and back.

Written by `finetune`, read by `evaluate` and serving:
- `adapter/`: the peft LoRA adapter (safetensors),
- `sid_rows.safetensors`: `input` / `output` rows of the SID tokens (the effective rows:
  free rows plus projected codebook vectors when `index.tie_embeddings`),
- `tokenizer/`: the extended (text) tokenizer,
- `item_sids.parquet`, `user_sids.parquet`: the SID tables at the end of training
  (`user_sids.parquet` is empty when the user tower is off),
- `quantizers.safetensors`: the item / user quantizers (RQ-VAE, LSH or random) at the end
  of training (their configs in the metadata),
- `recommender.json`: where the SID block starts and what it holds,
- `trainable.safetensors`: the trainable tensors themselves but for the quantizers (LoRA,
  the free SID rows and codebook projections: `model.trainable_state`), which the rows above
  are computed from; with `quantizers.safetensors`, what a warm start (`finetune
  --warm-start`) goes on training from.

`load_recommender` rebuilds a plain causal LM: backbone, vocabulary resized to the saved
tokenizer, SID rows written into the embedding matrices, LoRA merged. Its outputs equal
the training-time model's (tested), and ordinary `generate` works on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .config import get
from .errors import TTDSError
from .io import atomic_dir, load_tensors, read_json, read_parquet, save_tensors, write_json, write_parquet

SID_COLUMNS = {"item": ["item_id", "codes", "suffix", "sid"], "user": ["user_id", "codes", "suffix", "sid"]}


@dataclass
class Recommender:
    model: torch.nn.Module
    tokenizer: object
    item_sids: pd.DataFrame
    user_sids: pd.DataFrame | None
    device: torch.device
    meta: dict


def save_recommender(model_dir: str | Path, module, tokenizer, tables: dict[str, pd.DataFrame],
                     towers: list[str], params: dict, trainable: dict[str, torch.Tensor]) -> None:
    """Write `model_dir` atomically from a trained `model.TTDSModule` and its trainable
    tensors but for the quantizers (`model.trainable_state(module, quantizers=False)`)."""
    from .quantize import quantizer_config

    sid = module.sid
    with atomic_dir(model_dir) as tmp:
        module.lm.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        # peft writes target_modules in set order, which follows Python's hash seed: sort it
        # so identical weights give an identical folder (and DVC hash).
        config = tmp / "adapter" / "adapter_config.json"
        meta = json.loads(config.read_text())
        if isinstance(meta.get("target_modules"), list):
            meta["target_modules"] = sorted(meta["target_modules"])
        config.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        with torch.no_grad():
            save_tensors(tmp / "sid_rows.safetensors", {"input": sid.in_weight(), "output": sid.out_weight()},
                         metadata={"first_id": sid.first_id, "n_rows": sid.n_rows})
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_parquet(tmp / "item_sids.parquet", tables["item"])
        users = tables["user"] if "user" in tables else pd.DataFrame(
            {c: pd.Series(dtype="int64" if c in ("user_id", "suffix") else object) for c in SID_COLUMNS["user"]})
        write_parquet(tmp / "user_sids.parquet", users)
        state, configs = {}, {}
        for tower, q in sid.quantizers.items():
            configs[tower] = quantizer_config(q)
            state.update({f"{tower}.{k}": v for k, v in q.state_dict().items()})
        save_tensors(tmp / "quantizers.safetensors", state or {"_empty": torch.zeros(0)},
                     metadata={"configs": json.dumps(configs)})
        save_tensors(tmp / "trainable.safetensors", trainable)
        write_json(tmp / "recommender.json", {
            "first_id": sid.first_id, "n_rows": sid.n_rows, "towers": towers,
            "layouts": [vars(lay) for lay in sid.layouts], "tied_head": sid.out_rows is None,
            "tie_embeddings": bool(len(sid.proj)), "vocab_size": len(tokenizer),
            "template": get(params, "train.template", int, 0),
            "seqrec_format": get(params, "tasks.seqrec_format", str, "packed"),
            "max_history": get(params, "data.max_history", int)})


def load_recommender(params: dict, model_dir: str | Path = "data/model", backbone_dir: str | Path = "data/backbone",
                     device=None, merge: bool = True) -> Recommender:
    """The trained recommender in eval mode on `device` (LoRA merged unless `merge=False`)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .backbone import load_backbone, pick_device, quiet_peft

    model_dir = Path(model_dir)
    meta = read_json(model_dir / "recommender.json")
    device = torch.device(device) if device is not None else pick_device()
    model, _ = load_backbone(params, device=device, backbone_dir=backbone_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer", trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise TTDSError(f"{model_dir}/tokenizer: not a readable tokenizer ({exc.__class__.__name__})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    first, n = int(meta["first_id"]), int(meta["n_rows"])
    if len(tokenizer) != meta["vocab_size"] or first + n > len(tokenizer):
        raise TTDSError(f"{model_dir}/tokenizer: {len(tokenizer)} tokens, recommender.json expects "
                        f"{meta['vocab_size']} (rerun finetune)")
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=False)
    rows = load_tensors(model_dir / "sid_rows.safetensors")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        if rows["input"].shape != (n, emb.shape[1]):
            raise TTDSError(f"{model_dir}/sid_rows.safetensors: rows {tuple(rows['input'].shape)}, "
                            f"expected ({n}, {emb.shape[1]}) for this backbone (model.* params changed?)")
        emb[first:first + n] = rows["input"].to(emb.dtype)
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head[first:first + n] = rows["output"].to(head.dtype)
    with quiet_peft():
        model = PeftModel.from_pretrained(model, model_dir / "adapter", is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    model = model.to(device).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    item_sids = read_parquet(model_dir / "item_sids.parquet", SID_COLUMNS["item"])
    user_sids = read_parquet(model_dir / "user_sids.parquet", SID_COLUMNS["user"])
    return Recommender(model=model, tokenizer=tokenizer, item_sids=item_sids,
                       user_sids=user_sids if len(user_sids) else None, device=device, meta=meta)


def load_final_quantizers(model_dir: str | Path = "data/model") -> dict:
    """The item / user quantizers at the end of training, in eval mode."""
    from safetensors import safe_open

    from .quantize import build_quantizer

    path = Path(model_dir) / "quantizers.safetensors"
    if not path.is_file():
        raise TTDSError(f"{path}: not found (run finetune first)")
    with safe_open(str(path), framework="pt") as fh:
        configs = json.loads((fh.metadata() or {}).get("configs", "{}"))
        state = {k: fh.get_tensor(k) for k in fh.keys()}
    out = {}
    for tower, cfg in configs.items():
        q = build_quantizer(cfg)
        q.load_state_dict({k[len(tower) + 1:]: v for k, v in state.items() if k.startswith(tower + ".")})
        out[tower] = q.eval()
    return out
