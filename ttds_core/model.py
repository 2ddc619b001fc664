"""TTDS as a model object: the backbone with its LoRA adapters, the SID rows and the
towers' quantizers (`dynamic.SidVocab`), and the semantic index they define (`IndexState`).

- `TTDSModule.loss(**inputs)` -> every term of L = L_LLM + alpha (L_ID + beta L_Token) for one
  batch (`batches.step_inputs` builds the inputs, padded or packed);
- `TTDSModule.rank(...)` -> the constrained ranking of users' next items with the current
  weights and index (the evaluation engine, `ranker`);
- `build_model` / `load_quantizers` / `make_optimizer` / `trainable_state`: how a run sets it up
  and what a checkpoint saves of it; `refresh_index`: the dynamic index's refresh.

Speed on CPU: logits are computed only at the positions that carry a label
(`response_loss`): the 49k-row LM head dominates a small backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import collaborative, dynamic, packing, tasks
from .backbone import decoder_of, hf_model, quiet_peft
from .batches import collate
from .config import get
from .errors import TTDSError
from .io import read_npy, read_parquet
from .prompts import seqrec_prompt
from .train_config import TrainConfig
from .vocab import extend_vocabulary

TOWER_FILES = {"item": ("items", "item_id"), "user": ("users", "user_id")}


# ---------------------------------------------------------------- the index

@dataclass
class IndexState:
    """What the dynamic index changes: SID tables and the cached text representations X.
    `item_pairs`: the training transitions a refresh mixes into re-embedded item vectors
    (`index.cf_mix`; None when it is 0)."""
    tables: dict[str, pd.DataFrame]
    x: dict[str, np.ndarray]
    churn: list[dict] = field(default_factory=list)
    item_pairs: np.ndarray | None = None

    def sid_tables(self) -> tasks.SidTables:
        item = dynamic.sid_strings(self.tables["item"], "item_id", len(self.x["item"]))
        user = dynamic.sid_strings(self.tables["user"], "user_id", len(self.x["user"])) \
            if "user" in self.tables else None
        return tasks.SidTables(item=item, user=user)


# ---------------------------------------------------------------- the model and its losses

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

    def loss(self, **inputs) -> dict:
        """{llm, [id, token,] total} for one batch (`batches.step_inputs`); the forward."""
        return self(**inputs)

    @torch.no_grad()
    def rank(self, tokenizer, index: IndexState, cases: list, beams: int, scoring: str, batch_size: int,
             masked: bool) -> dict:
        """The top-`beams` items of every `cases` user (`ranker.Case`: history, target) by the
        evaluation engine (trie-constrained beam search over every item), with the current
        weights and index; `masked`: the user's history is never recommended. Returns the
        ranked lists per masking (`ranker.rank_cases`).

        The SID rows are written into the backbone's (frozen) rows first, which the wrappers
        shadow anyway, so a SID-only head built from them (`eval.scoring: sid`) sees the
        current rows."""
        from .ranker import PromptBuilder, rank_cases, ranker_for

        was_training = self.training
        self.eval()
        try:
            dynamic.bake(self.lm.get_base_model(), self.sid)
            item_table = index.tables["item"]
            ranker, _ = ranker_for(self.lm, tokenizer, item_table, beams, scoring, "item SID table")
            builder = PromptBuilder(tokenizer, item_table, index.tables.get("user"), self.cfg.template,
                                    self.cfg.packed)
            return rank_cases(ranker, builder, cases, batch_size, modes=(masked,))
        finally:
            self.train(was_training)

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
        return self.combine(l_llm, [dynamic.dmvae_losses(decoder, self.sid.quantizers[tower], ids, mask, x)
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
        decoder = decoder_of(self.lm)
        hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                         attention_mask=packed_mask(batch.position_ids, decoder.config,
                                                    decoder.get_input_embeddings().weight.dtype)).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        total, _ = label_cross_entropy(self.lm, self.sid, self.eos_id, flat[batch.coded_pos], batch.coded_target,
                                       flat[batch.text_pos], batch.text_target)
        return self.combine(total / max(batch.n_labels, 1),
                            [dynamic.dmvae_terms(packing.mean_pool(flat, positions, slots, counts),
                                                 self.sid.quantizers[tower], dm_x[tower])
                             for tower, (positions, slots, counts) in batch.pools.items()])


def packed_mask(position_ids: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor | None:
    """The 4D attention mask of packed rows, built on the device: a token attends to the
    earlier tokens of its own sequence (a sequence starts where its position id is 0).
    Given no mask, transformers finds the sequences itself, reading the position ids back
    to the host (a sync every step); this is the same mask without it. sdpa takes it as
    booleans, eager as an additive mask; other kernels (flash) keep their own varlen path."""
    kind = getattr(config, "_attn_implementation", None)
    if kind not in ("sdpa", "eager"):
        return None
    seq = (position_ids == 0).cumsum(-1)                                        # [B, T]
    width = position_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seq[:, :, None] == seq[:, None, :]) & causal                       # [B, T, T]
    if kind == "sdpa":
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


# ---------------------------------------------------------------- set-up

def load_inputs(params: dict, data_dir: Path, towers: list[str]):
    """What a run reads: (sequences, items, interactions or None, texts per tower, X per tower,
    SID tables per tower), checked against each other."""
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


def load_quantizers(data_dir: Path, towers: list[str], x: dict, cfg: TrainConfig, length: int,
                    codebook_size: int) -> dict[str, nn.Module]:
    """Each tower's quantizer from warmup (`data/quantizer`), trainable when the index is dynamic."""
    from .quantize import load_quantizer

    out = {}
    for tower in towers:
        path = data_dir / "quantizer" / f"{tower}.safetensors"
        q, qcfg = load_quantizer(path, in_dim=x[tower].shape[1])
        if q.kind != cfg.kind or q.length != length or q.codebook_size != codebook_size:
            raise TTDSError(f"{path}: quantizer is {q.kind} {q.length}x{q.codebook_size}, params ask for "
                            f"{cfg.kind} {length}x{codebook_size} (rerun warmup)")
        trainable = cfg.dynamic and q.learns
        for p in q.parameters():
            p.requires_grad_(trainable)
        out[tower] = q.train(trainable)
    return out


def build_model(params: dict, cfg: TrainConfig, index: IndexState, texts: dict, quantizers: dict,
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
                           quantizers=quantizers, tie_codebooks=cfg.tie)
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
    sid, groups = module.sid, {"lora": [], "rows": [], "quantizer": []}
    q_ids = {id(p) for p in sid.quantizers.parameters()}
    row_ids = {id(p) for n, p in sid.named_parameters() if id(p) not in q_ids}
    for name, p in module.named_parameters():
        if id(p) in q_ids:
            if p.requires_grad:
                groups["quantizer"].append(p)
        elif id(p) in row_ids:
            p.requires_grad_(True)
            groups["rows"].append(p)
        elif p.requires_grad:
            groups["lora"].append(p)
    spec = [{"params": groups["lora"], "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": groups["rows"], "lr": cfg.embedding_lr, "weight_decay": 0.0},
            {"params": groups["quantizer"], "lr": cfg.quantizer_lr, "weight_decay": 0.0}]
    # fused: one kernel per parameter group instead of a dozen operators per tensor, and it
    # can skip a non-finite update on the device (`found_inf`, see finetune.run)
    return torch.optim.AdamW([g for g in spec if g["params"]], fused=True if cfg.fused_optimizer else None)


def trainable_state(module: TTDSModule, quantizers: bool = True) -> dict[str, torch.Tensor]:
    """Everything that training changes: LoRA weights and the SidVocab (rows, projections,
    quantizers with their buffers; `quantizers=False` leaves the quantizers out, which
    `data/model/quantizers.safetensors` holds anyway). The frozen backbone is not saved."""
    sid_prefix = None
    for name, mod in module.named_modules():
        if mod is module.sid:
            sid_prefix = name + "."
            break
    skip = f"{sid_prefix}quantizers." if sid_prefix and not quantizers else None
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if ("lora_" in k or (sid_prefix and k.startswith(sid_prefix))) and not (skip and k.startswith(skip))}


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
    from .ranker import Case

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
        cases = [Case(user, "valid", history[-max_history:], history, target) for user, history, target in val]
        ranked = module.rank(tokenizer, index, cases, cfg.val_beams, cfg.val_scoring, cfg.val_batch, cfg.val_masked)
        ranks = target_ranks(cases, ranked)[cfg.val_masked]
        table = metric_table(ranks, [10])
        return {"val_HR@10": table["HR@10"], "val_NDCG@10": table["NDCG@10"],
                "val_loss": total_loss / max(n_tok, 1), "val_sid_acc": exact / len(val), "val_users": len(val)}
    finally:
        module.train(was_training)


# ---------------------------------------------------------------- the dynamic index's refresh

def refresh_due(step: int, samples_per_step: int, every: int) -> bool:
    """Whether optimizer step `step` crossed a multiple of `every` training rows (the
    refresh schedule, `index.refresh_samples`, scales with the batch: 800 rows are 100
    steps at batch 8, and about 3 at batch 256)."""
    return step * samples_per_step // every > (step - 1) * samples_per_step // every


def refresh_index(module: TTDSModule, tokenizer, index: IndexState, texts: dict, params: dict, step: int,
                  device, token_ids: dict | None = None) -> dict:
    """Re-derive every tower's SIDs with the current LLM and quantizers (dynamic index), or, with
    `index.refresh_embeddings: backbone`, with the current quantizers from the vectors the index
    was built from (`index.x`, never replaced then).
    `token_ids`: a per-tower cache of the tokenised texts, filled at the first refresh."""
    from .embedding import tokenize_texts

    max_tokens = get(params, "model.max_text_tokens", int, 64, min_value=1)
    embed_kwargs = {"batch_size": get(params, "embed.batch_size", int, 32, min_value=1),
                    "max_tokens": max_tokens, "device": device, "progress": False}
    margin = get(params, "index.refresh_margin", float, 0.2, min_value=0.0)
    re_embed = get(params, "index.refresh_embeddings", str, "llm", choices=dynamic.REFRESH_EMBEDDINGS) == "llm"
    token_ids = {} if token_ids is None else token_ids
    gamma = collaborative.cf_mix(params)
    record = {"step": step}
    for lay in module.sid.layouts:
        quantizer, old = module.sid.quantizers[lay.tower], index.tables[lay.tower]
        if re_embed:
            if lay.tower not in token_ids:
                token_ids[lay.tower] = tokenize_texts(tokenizer, texts[lay.tower], max_tokens, lay.tower)
            transform = None
            if lay.tower == "item" and gamma > 0:  # the same collaborative mix the index was built with
                transform = lambda v: collaborative.mix(v, index.item_pairs, gamma)  # noqa: E731
            x, table, ch = dynamic.refresh_tower(module.lm, tokenizer, quantizer, texts[lay.tower], old, lay,
                                                 {**embed_kwargs, "token_ids": token_ids[lay.tower]},
                                                 margin=margin, transform=transform)
        else:  # the vectors the index was built from (collaborative mix included), kept as they are
            x = index.x[lay.tower]
            table, ch = dynamic.requantize(quantizer, x, old, lay, margin)
        index.x[lay.tower], index.tables[lay.tower] = x, table
        # churn -> churn_item, churn_level_2 -> churn_item_level_2
        record.update({f"churn_{lay.tower}{k[len('churn'):]}": v for k, v in ch.items()})
    index.churn.append(record)
    return record
