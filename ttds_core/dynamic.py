"""SID token rows, the DM-VAE losses and the dynamic index refresh (paper §4.2.2-4.2.3).

SID rows. The SID tokens are appended to the vocabulary (`vocab.extend_vocabulary`) and
their rows live in `SidVocab`, outside the frozen backbone matrix: `SidEmbedding` and
`SidHead` wrap the backbone's input embedding and LM head and substitute those rows, so
only they (plus LoRA) train. peft's `trainable_token_indices` trains new rows too, but it
cannot make a row a *function* of the quantizer's codebooks, which `index.tie_embeddings`
needs: with it, the row of code token (level m, code c) is

    row = free_row + P(codebook_m[c])          (P: Linear code_dim -> d, one per tower)

so the gradient of the recommendation loss reaches the codebooks directly (the codebook
lookup by token id is an index, nothing discrete to straight-through). P starts at zero,
so training starts from the chosen initialisation (`init.sid_embeddings`). The same rows
serve as LM-head rows when the backbone ties input and output embeddings (LLaMA-small
checkpoints such as SmolLM2 do); otherwise the head has its own free rows.

DM-VAE. L_ID = ||X^S - X^I||^2 averaged over the d dimensions (so `loss.alpha` does not
depend on the backbone width), X^S = mean-pooled LLM states of the SID tokens alone,
X^I = the cached text representation (detached). L_Token = the quantizer's residual
quantisation loss (eq. 13) on X^I.

Refresh. Every `index.refresh_samples` training rows (dynamic index only) all item / user texts are
re-embedded by the *current* LLM (LoRA active), re-quantised by the current quantizers,
collisions re-resolved; churn (share of entities whose SID changed) is reported.
`index.refresh_embeddings: backbone` skips the re-embedding: a refresh re-quantises the embed
stage's vectors, so only the jointly trained quantizers move codes (the LLM's adapted text states
drift from the base ones and made a worse index on the benchmark: docs/benchmark.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from .errors import TTDSError
from .tokens import tower_vocabulary

# What a refresh quantizes (`index.refresh_embeddings`): every text re-embedded by the current
# LLM (the paper), or the embed stage's vectors of the backbone without LoRA.
REFRESH_EMBEDDINGS = ("llm", "backbone")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TowerLayout:
    """Where a tower's tokens sit inside the SID block: codes (level-major) then suffixes."""
    tower: str
    offset: int        # first row inside the SID block
    length: int        # M levels
    codebook_size: int
    max_suffix: int

    @property
    def n_codes(self) -> int:
        return self.length * self.codebook_size

    @property
    def n_rows(self) -> int:
        return self.n_codes + self.max_suffix

    def tokens(self) -> list[str]:
        return tower_vocabulary(self.tower, self.length, self.codebook_size, self.max_suffix)


def make_layouts(towers: list[str], length: int, codebook_size: int, max_suffix: int) -> list[TowerLayout]:
    out, offset = [], 0
    for tower in towers:
        lay = TowerLayout(tower, offset, length, codebook_size, max_suffix)
        out.append(lay)
        offset += lay.n_rows
    return out


def codebook_matrix(quantizer, length: int) -> torch.Tensor | None:
    """All codebooks stacked level-major [M*N, code_dim] (None for LSH / random codes)."""
    books = [quantizer.codebook(m) for m in range(length)]
    if any(b is None for b in books):
        return None
    return torch.cat(books, dim=0)


class SidVocab(nn.Module):
    """The trainable rows of the SID tokens (and the quantizers when they are tied in)."""

    def __init__(self, first_id: int, layouts: list[TowerLayout], dim: int, tied_head: bool,
                 quantizers: dict[str, nn.Module] | None = None, tie_codebooks: bool = False):
        super().__init__()
        self.first_id = first_id
        self.layouts = layouts
        self.n_rows = sum(lay.n_rows for lay in layouts)
        self.rows = nn.Parameter(torch.zeros(self.n_rows, dim))
        self.out_rows = None if tied_head else nn.Parameter(torch.zeros(self.n_rows, dim))
        self.quantizers = nn.ModuleDict(quantizers or {})
        self.proj = nn.ModuleDict()
        if tie_codebooks:
            for lay in layouts:
                q = self.quantizers[lay.tower] if lay.tower in self.quantizers else None
                book = codebook_matrix(q, lay.length) if q is not None else None
                if book is None:
                    log.warning("index.tie_embeddings: the %s quantizer has no codebooks (LSH/random); "
                                "its SID rows stay free", lay.tower)
                    continue
                proj = nn.Linear(book.shape[1], dim, bias=False)
                nn.init.zeros_(proj.weight)  # start exactly from the chosen initialisation
                self.proj[lay.tower] = proj

    @property
    def last_id(self) -> int:
        return self.first_id + self.n_rows

    def layout(self, tower: str) -> TowerLayout:
        for lay in self.layouts:
            if lay.tower == tower:
                return lay
        raise TTDSError(f"no SID tokens for the {tower} tower")

    def in_weight(self) -> torch.Tensor:
        """Input rows [n_rows, d]: free rows (+ projected codebook vectors when tied)."""
        if not len(self.proj):
            return self.rows
        parts = []
        for lay in self.layouts:
            rows = self.rows[lay.offset:lay.offset + lay.n_rows]
            if lay.tower in self.proj:
                book = codebook_matrix(self.quantizers[lay.tower], lay.length)
                tied = self.proj[lay.tower](book.to(rows.dtype))
                rows = torch.cat([rows[:lay.n_codes] + tied, rows[lay.n_codes:]], dim=0)
            parts.append(rows)
        return torch.cat(parts, dim=0)

    def out_weight(self) -> torch.Tensor:
        return self.in_weight() if self.out_rows is None else self.out_rows


class SidEmbedding(nn.Module):
    """The backbone's (frozen) input embedding with the SID rows substituted."""

    def __init__(self, base: nn.Embedding, sid: SidVocab):
        super().__init__()
        self.base = base
        self.sid = sid

    @property
    def weight(self) -> torch.Tensor:  # what HF utilities look at
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        is_sid = (input_ids >= self.sid.first_id) & (input_ids < self.sid.last_id)
        # no early exit when no token is a SID: asking would stop a GPU for a host sync
        local = (input_ids - self.sid.first_id).clamp(0, self.sid.n_rows - 1)
        rows = self.sid.in_weight().to(out.dtype)[local]
        return torch.where(is_sid.unsqueeze(-1), rows, out)


class SidHead(nn.Module):
    """The backbone's (frozen) LM head with the SID columns recomputed from the SID rows."""

    def __init__(self, base: nn.Module, sid: SidVocab):
        super().__init__()
        self.base = base
        # Shared with SidEmbedding, where it is registered; a tuple keeps it from being
        # registered twice (parameters and state dicts must name it once).
        self._sid = (sid,)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        sid = self._sid[0]
        logits = self.base(hidden)
        sid_logits = hidden @ sid.out_weight().to(hidden.dtype).T
        return torch.cat([logits[..., :sid.first_id], sid_logits.to(logits.dtype),
                          logits[..., sid.last_id:]], dim=-1)


def install(model, sid: SidVocab) -> None:
    """Wrap `model`'s input embedding and LM head (a CausalLM or a PeftModel around one)."""
    from .backbone import decoder_of, hf_model

    base = hf_model(model)
    decoder = decoder_of(base)
    if isinstance(decoder.embed_tokens, SidEmbedding):
        raise TTDSError("SID rows are already installed on this model")
    decoder.embed_tokens = SidEmbedding(decoder.embed_tokens, sid)
    base.lm_head = SidHead(base.lm_head, sid)


def is_tied(model) -> bool:
    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", None)
    if tied is None and hasattr(cfg, "get_text_config"):
        tied = getattr(cfg.get_text_config(), "tie_word_embeddings", False)
    return bool(tied)


def bake(model, sid: SidVocab) -> None:
    """Write the effective SID rows into a plain (unwrapped) model's matrices, for inference."""
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[sid.first_id:sid.last_id] = sid.in_weight().to(emb.dtype)
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head[sid.first_id:sid.last_id] = sid.out_weight().to(head.dtype)
        elif sid.out_rows is not None:
            raise TTDSError("model has tied embeddings but the SID rows were trained untied")


# ---------------------------------------------------------------- initialisation

def token_text_embeddings(model, tokenizer, texts: list[str], max_tokens: int) -> torch.Tensor:
    """Mean *input-token* embedding of each text (no forward pass): SA-Init's raw material."""
    emb = model.get_input_embeddings().weight.detach()
    out = torch.zeros(len(texts), emb.shape[1], dtype=torch.float32)
    for j, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if ids:
            out[j] = emb[torch.tensor(ids, device=emb.device)].float().mean(0).cpu()
    return out


def init_rows(sid: SidVocab, std: float, generator: torch.Generator, semantic: dict | None = None) -> None:
    """Random rows N(0, std) (std of the backbone's rows); with `semantic`
    ({tower: (codes [n, M] array, text embeddings [n, d])}) each code token's row is the
    mean text embedding of the entities currently under it (TS-Rec SA-Init). Codes no
    entity uses and suffix tokens stay random."""
    with torch.no_grad():
        rand = torch.randn(sid.rows.shape, generator=generator) * std
        sid.rows.copy_(rand.to(sid.rows.dtype))
        if sid.out_rows is not None:
            sid.out_rows.copy_(rand.to(sid.out_rows.dtype))
        for tower, (codes, emb) in (semantic or {}).items():
            lay = sid.layout(tower)
            codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
            for m in range(lay.length):
                sums = torch.zeros(lay.codebook_size, emb.shape[1])
                counts = torch.zeros(lay.codebook_size)
                sums.index_add_(0, codes[:, m], emb.float())
                counts.index_add_(0, codes[:, m], torch.ones(len(codes)))
                used = counts > 0
                mean = sums[used] / counts[used].unsqueeze(1)
                idx = lay.offset + m * lay.codebook_size + torch.nonzero(used).squeeze(1)
                sid.rows[idx] = mean.to(sid.rows.dtype)
                if sid.out_rows is not None:
                    sid.out_rows[idx] = mean.to(sid.out_rows.dtype)


# ---------------------------------------------------------------- SID tables

def sid_strings(table: pd.DataFrame, key: str, n: int) -> list[str]:
    """SID string per entity id 0..n-1 from a `data/sids`-schema table (checked complete)."""
    if len(table) != n or not np.array_equal(np.sort(table[key].to_numpy()), np.arange(n)):
        raise TTDSError(f"SID table: expected one row per {key} 0..{n - 1}, got {len(table)} rows")
    return table.sort_values(key)["sid"].tolist()


def table_codes(table: pd.DataFrame, key: str) -> np.ndarray:
    t = table.sort_values(key)
    return np.asarray([list(c) for c in t["codes"]], dtype=np.int64)


def check_table_fits(table: pd.DataFrame, lay: TowerLayout, name: str) -> None:
    codes = table_codes(table, table.columns[0])
    if codes.shape[1] != lay.length:
        raise TTDSError(f"{name}: SIDs have {codes.shape[1]} codes, but index.length = {lay.length} "
                        "(rerun build_sids)")
    if codes.min() < 0 or codes.max() >= lay.codebook_size:
        raise TTDSError(f"{name}: codes outside 0..{lay.codebook_size - 1} (index.codebook_size)")
    if int(table["suffix"].max()) >= lay.max_suffix:
        raise TTDSError(f"{name}: a collision suffix {int(table['suffix'].max())} exceeds "
                        f"index.max_suffix = {lay.max_suffix}")


def make_table(tower: str, ids: np.ndarray, codes: np.ndarray) -> pd.DataFrame:
    """A `data/sids`-schema table from raw codes: collisions resolved by the shared rule."""
    from .sids import resolve_collisions, sid_table

    suffix = resolve_collisions(codes)
    return sid_table(ids, codes, suffix, tower)


# ---------------------------------------------------------------- DM-VAE

def sid_token_rows(tokenizer, sids: list[str]) -> list[list[int]]:
    """Token ids of SID strings alone (the X^S input)."""
    return [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sids]


def encode_sids(tokenizer, sids: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded token ids + mask of SID strings alone (the X^S input)."""
    rows = sid_token_rows(tokenizer, sids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, width - len(r):] = torch.tensor(r)
        mask[j, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def dmvae_losses(decoder, quantizer, sid_ids: torch.Tensor, sid_mask: torch.Tensor,
                 x_text: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_ID (SID level, eq. 12) and L_Token (token level, eq. 13) for one tower's batch.

    The quantizer learns from L_Token only when its parameters are trainable (dynamic
    RQ index); LSH / random codes have no quantisation loss (0).
    """
    from .embedding import mean_pool

    return dmvae_terms(mean_pool(decoder, sid_ids, sid_mask), quantizer, x_text)


def dmvae_terms(x_sid: torch.Tensor, quantizer, x_text: torch.Tensor) -> dict[str, torch.Tensor]:
    """L_ID and L_Token from the pooled SID states X^S (however the forward computed them)."""
    x_sid = x_sid.float()
    x_text = x_text.float().detach()
    l_id = (x_sid - x_text).pow(2).mean()
    l_token = quantizer.rq_loss(x_text) if quantizer is not None else None
    if l_token is None:  # a kind that learns nothing (LSH, random)
        l_token = torch.zeros((), device=x_text.device)
    return {"id": l_id, "token": l_token}


# ---------------------------------------------------------------- refresh

@torch.no_grad()
def quantize_codes(quantizer, x: np.ndarray, previous: np.ndarray | None = None, margin: float = 0.0
                   ) -> np.ndarray:
    """Codes [n, M] of rows of `x` (row i = entity i: random codes are keyed by id). With a
    `margin` > 0, each row keeps its `previous` codes unless the new ones win by it
    (`sticky_codes`, hysteresis), for the kinds that have hysteresis."""
    was_training = quantizer.training
    quantizer.eval()
    dev = next(iter(quantizer.buffers()), torch.zeros(())).device
    x = torch.as_tensor(x, dtype=torch.float32, device=dev)
    codes = quantizer.sticky_codes(x, previous, margin) if margin > 0 else None
    if codes is None:  # no margin, or a kind without hysteresis
        codes = quantizer.codes(x, ids=np.arange(len(x)))
    quantizer.train(was_training)
    return torch.as_tensor(codes).cpu().numpy().astype(np.int64)


def refresh_tower(model, tokenizer, quantizer, texts: list[str], old: pd.DataFrame, lay: TowerLayout,
                  embed_kwargs: dict, margin: float = 0.0, transform=None) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Re-embed `texts` with the current LLM, re-quantise, re-resolve collisions.
    `transform`: applied to the re-embedded X before quantizing (the item tower's
    `index.cf_mix`), so a refresh quantizes the same kind of vector warm-up did.

    `margin` > 0 keeps an entity's code at a level unless the nearest code is closer by
    that relative margin (`RQVAE.sticky_codes`), or an LSH bit unless its projection
    crossed the hyperplane by that many standard deviations (`LSHQuantizer.sticky_codes`);
    random codes never change. Returns (new X, new
    table, churn record: `churn` = share of entities whose SID changed, `churn_level_m`
    = share whose first m codes changed). A collision set larger than `index.max_suffix`
    cannot be written with the reserved tokens: the old table is kept (with a warning)
    and churn is 0 for that refresh.
    """
    from .embedding import embed_texts

    was_training = model.training
    model.eval()
    x = embed_texts(model, tokenizer, texts, **embed_kwargs)
    if transform is not None:
        x = transform(x)
    if was_training:
        model.train()
    table, record = requantize(quantizer, x, old, lay, margin)
    return x, table, record


def requantize(quantizer, x: np.ndarray, old: pd.DataFrame, lay: TowerLayout, margin: float = 0.0
               ) -> tuple[pd.DataFrame, dict]:
    """The second half of a refresh: the new SID table of the vectors `x` (re-standardised,
    quantized with hysteresis against `old`, collisions re-resolved) and its churn record
    (`refresh_tower`)."""
    from .sids import churn

    # LoRA shifts the mean and scale of the pooled states as a whole; re-standardising
    # keeps the quantizer at the operating point it was trained at, so codes move only
    # where the relative geometry of the entities moved (a fixed warm-up normalisation
    # flipped most codes at the first refresh).
    quantizer.fit_normalisation(x)
    key = old.columns[0]
    previous = table_codes(old, key)
    codes = quantize_codes(quantizer, x, previous, margin)
    table = make_table(lay.tower, old[key].sort_values().to_numpy(), codes)
    if int(table["suffix"].max()) >= lay.max_suffix:
        log.warning("refresh: %s collision set of %d exceeds index.max_suffix=%d; SIDs kept",
                    lay.tower, int(table["suffix"].max()) + 1, lay.max_suffix)
        return old, {"churn": 0.0, **{f"churn_level_{m + 1}": 0.0 for m in range(lay.length)}}
    record = {"churn": float(churn(old, table))}
    for m in range(lay.length):
        record[f"churn_level_{m + 1}"] = float((previous[:, :m + 1] != codes[:, :m + 1]).any(1).mean())
    return table, record

