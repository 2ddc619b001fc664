"""The ranking engine: trie-constrained beam search over item semantic IDs, written for speed.

One engine serves `evaluate`, validation inside `finetune`, `precompute` and `ttds recommend`.
It does not use Hugging Face `generate`: HF beam search prefills every prompt once per beam,
reorders the whole KV cache at every step and calls a Python function per row per step for
the constraint. Here, as in YouTube's STATIC and NVIDIA's `sid_gr`:

- **The trie is a set of transition tables** on the model's device (`SidTables`). SIDs have
  a fixed structure (M codes, a suffix token for colliding tuples only, then EOS), so depth
  d of the trie only ever holds the tokens of level d: table d maps (node at depth d,
  column) -> node at depth d+1, or -1, over the few hundred tokens that occur at that depth.
  Dense per depth where it fits (`dense_limit` entries), sorted keys + binary search where it
  does not. The constraint for every row of a batch is one gather and a compare per step:
  no Python loop over rows and no host synchronisation inside the decoding loop.
- **Each prompt is prefilled once and its KV cache is shared by its beams.** Only the few
  generated positions live per beam (and are reordered when beams are re-chosen); the
  beams' queries attend to the shared prompt keys through one batched matmul per layer
  (`_shared_prefix_attention`, plugged in through transformers' `AttentionInterface`:
  LLaMA-family decoders with full attention, LoRA-wrapped or merged; other architectures
  are refused with one line, never ranked wrongly).
- **History masking is a mask on the same tables.** Per user, the excluded items are
  counted per node in one scatter; a child is open while it holds more items than the user
  excludes below it, and EOS is allowed at a node only if its item is not excluded. Masked
  and unmasked rankings reuse one prefill.

Scores. A ranked item's score is the sum of the log-probabilities of its SID tokens and
the EOS that closes it, plus, with a popularity prior (`Prior`, `eval.popularity_prior` =
lambda > 0), lambda * log(weight of the item): the search then ranks by
log P(SID | prompt) + lambda * log w(item), a product of the model and a popularity
distribution. The prior is spread over the trie so that beams are pruned by it too: a
step into node n adds lambda * (log W(n) - log W(parent)), where W(n) is the summed weight
of the items below n, and closing an item adds lambda * (log w(item) - log W(node)); the
terms telescope to lambda * log w(item). With a copy penalty (`eval.copy_penalty` = beta > 0)
an item whose first code is the first code of an item in the prompt's history loses beta:
the search ranks by log P(SID | prompt) - beta * [first code in the history] (+ the prior).
It is applied at the first step, so beams are pruned by it too. Why: the fine-tuned LLM
copies first codes from its prompt far more often than next items share one with the
history (docs/benchmark.md, "The model copies first codes from its prompt"), as LMs boost
tokens of their context; a repetition penalty of the kind LLM decoding uses, on the
first code only. `scoring="full"` normalises every step over the whole vocabulary
(the model's exact likelihood, paper eq. 9); `scoring="sid"` normalises over the tokens that
occur in some item SID plus EOS (the candidates constrained decoding can pick; training's
`loss.sid_softmax: sid` normalises over all SID rows plus EOS, a superset), so the LM head is
computed for ~1k rows instead of ~49k. `scoring="trie"` normalises every step over the
continuations the trie allows at that node for that user (its open children, and EOS where
the node ends an item the user may get): a locally normalised score, where the mass the
model puts on an excluded (history) item or an invalid token goes to the siblings instead of
being lost. It is not the model's likelihood; it ranks otherwise only through that
redistribution.

The search. Every prompt starts with one live beam at the root. At depth d each live beam is
extended by every allowed token of depth d: the extensions with EOS are finished items and
enter the prompt's pool of the `beams` best finished items; the `beams` best other
extensions become the live beams of depth d+1. After the deepest level the pool is the
ranking: at most `beams` distinct real items, best first. With at least as many beams as
the trie has nodes at any depth the search is exhaustive: the returned `beams` items are
exactly the best `beams` by their full-SID scores.
Ties are broken deterministically: among equal live candidates the earlier beam, then the
lower token id, wins; among equal finished items the lower item id ranks first.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .cases import Case  # noqa: F401  (a ranking query; re-exported for callers)
from .errors import TTDSError
from .tokens import split_sid
from .vocab import encode_prompt, encode_response

SCORINGS = ("full", "sid", "trie")
_NEG = float("-inf")
# 64M int32 entries (256 MB) at most per dense depth table; a larger depth uses sorted keys
DENSE_LIMIT = 1 << 26


def item_token_ids(item_sids, tokenizer, source: str = "item SID table") -> dict[int, list[int]]:
    """item_id -> token ids of its SID, tokenised exactly as the training targets are."""
    for col in ("item_id", "sid"):
        if col not in item_sids.columns:
            raise TTDSError(f"{source}: missing column {col}")
    vocab = tokenizer.get_vocab()
    out: dict[int, list[int]] = {}
    for item, sid in zip(item_sids["item_id"].tolist(), item_sids["sid"].tolist()):
        toks = split_sid(str(sid))
        if not toks:
            raise TTDSError(f"{source}: item {item} has no SID tokens in {sid!r}")
        missing = [t for t in toks if t not in vocab]
        if missing:
            raise TTDSError(f"{source}: token {missing[0]} of item {item} is not in the tokenizer vocabulary")
        out[int(item)] = encode_response(tokenizer, str(sid))[:-1]  # drop the EOS
    return out


class SidTables:
    """The item SID trie as per-depth transition tables (see the module docstring).

    Depth d (0 = root) holds `n_nodes[d]` nodes, ordered by their token prefix. For d < depth:
    `cols[d]` are the token ids that occur at position d of some SID (sorted), and
    `child(d, nodes)` gives each node's child per column (-1: no such edge). `count[d]` is the
    number of items at or below each node, `item_end[d]` the item whose SID ends at the
    node (-1: none). `item_nodes[item, d]` is the node of `item` at depth d (-1 past its end).
    """

    def __init__(self, sequences: Mapping[int, Sequence[int]], eos_id: int, device="cpu",
                 dense_limit: int = DENSE_LIMIT):
        if not sequences:
            raise TTDSError("item SID table is empty: nothing to recommend")
        self.eos_id = int(eos_id)
        self.device = torch.device(device)
        seqs = {int(i): tuple(int(t) for t in s) for i, s in sequences.items()}
        for item, seq in seqs.items():
            if item < 0:
                raise TTDSError(f"item {item}: item ids must be >= 0")
            if not seq:
                raise TTDSError(f"item {item}: empty SID")
            if self.eos_id in seq:
                raise TTDSError(f"item {item}: SID contains the EOS token")
        by_seq: dict[tuple, int] = {}
        for item, seq in seqs.items():
            if seq in by_seq:
                raise TTDSError(f"items {by_seq[seq]} and {item} have the same SID: SIDs must be unique")
            by_seq[seq] = item
        self.depth = max(len(s) for s in seqs.values())   # longest SID, in tokens
        self.n_items = len(seqs)
        # nodes of depth d = the distinct d-token prefixes, in sorted order
        prefixes = [sorted({s[:d] for s in seqs.values() if len(s) >= d}) for d in range(self.depth + 1)]
        index = [{p: n for n, p in enumerate(level)} for level in prefixes]
        self.n_nodes = [len(level) for level in prefixes]
        self.cols: list[torch.Tensor] = []
        self._dense: list[torch.Tensor | None] = []
        self._keys: list[torch.Tensor | None] = []
        self._vals: list[torch.Tensor | None] = []
        self.count: list[torch.Tensor] = []
        self.item_end: list[torch.Tensor] = []
        for d in range(self.depth + 1):
            count = np.zeros(self.n_nodes[d], dtype=np.int64)
            end = np.full(self.n_nodes[d], -1, dtype=np.int64)
            for seq, item in by_seq.items():
                if len(seq) >= d:
                    count[index[d][seq[:d]]] += 1
                if len(seq) == d:
                    end[index[d][seq]] = item
            self.count.append(torch.as_tensor(count, device=self.device))
            self.item_end.append(torch.as_tensor(end, device=self.device))
            if d == self.depth:
                break
            cols = sorted({p[d] for p in prefixes[d + 1]})
            col_of = {t: c for c, t in enumerate(cols)}
            parent = np.asarray([index[d][p[:d]] for p in prefixes[d + 1]], dtype=np.int64)
            col = np.asarray([col_of[p[d]] for p in prefixes[d + 1]], dtype=np.int64)
            child = np.arange(len(prefixes[d + 1]), dtype=np.int64)
            self.cols.append(torch.as_tensor(cols, dtype=torch.long, device=self.device))
            width = len(cols)
            if self.n_nodes[d] * width <= dense_limit:
                table = np.full((self.n_nodes[d], width), -1, dtype=np.int32)
                table[parent, col] = child
                self._dense.append(torch.as_tensor(table, device=self.device))
                self._keys.append(None)
                self._vals.append(None)
            else:  # sorted (node * width + col) keys, looked up by binary search
                keys = parent * width + col
                order = np.argsort(keys, kind="stable")
                self._dense.append(None)
                self._keys.append(torch.as_tensor(keys[order], device=self.device))
                self._vals.append(torch.as_tensor(child[order].astype(np.int32), device=self.device))
        nodes = np.full((max(seqs) + 1, self.depth + 1), -1, dtype=np.int64)
        for seq, item in by_seq.items():
            for d in range(len(seq) + 1):
                nodes[item, d] = index[d][seq[:d]]
        self.item_nodes = torch.as_tensor(nodes, device=self.device)
        self.item_length = torch.as_tensor((nodes >= 0).sum(1) - 1, device=self.device)  # -1: no such item
        # every token a SID can contain, and EOS: the `scoring="sid"` normalisation set
        self.tokens = sorted({t for s in seqs.values() for t in s} | {self.eos_id})
        self.sequences = {item: list(seq) for item, seq in seqs.items()}

    def __len__(self) -> int:
        return self.n_items

    def __contains__(self, item: int) -> bool:
        return int(item) in self.sequences

    @property
    def nbytes(self) -> int:
        """Memory of the tables on the device."""
        parts = [t for group in (self._dense, self._keys, self._vals, self.count, self.item_end, self.cols)
                 for t in group if t is not None] + [self.item_nodes, self.item_length]
        return int(sum(t.numel() * t.element_size() for t in parts))

    def child(self, d: int, nodes: torch.Tensor) -> torch.Tensor:
        """Children of `nodes` (depth d) per column of depth d: [..., width_d], -1 = no edge."""
        width = self.cols[d].numel()
        if self._dense[d] is not None:
            return self._dense[d][nodes].long()
        keys, vals = self._keys[d], self._vals[d]
        want = nodes.unsqueeze(-1) * width + torch.arange(width, device=nodes.device)
        pos = torch.searchsorted(keys, want).clamp(max=keys.numel() - 1)
        return torch.where(keys[pos] == want, vals[pos].long(), torch.full_like(want, -1))

    def prior(self, weights: Mapping[int, float] | np.ndarray, strength: float) -> Prior | None:
        """The popularity prior lambda * log w(item) for these tables (None when lambda = 0).

        `weights[item]` > 0 for every item of the tables (e.g. its training count + 1); items
        the tables do not hold are ignored."""
        strength = float(strength)
        if not np.isfinite(strength) or strength < 0:
            raise TTDSError(f"popularity prior strength {strength!r}, expected a finite number >= 0")
        if strength == 0.0:
            return None
        items = sorted(self.sequences)
        if isinstance(weights, Mapping):
            missing = next((i for i in items if i not in weights), None)
            if missing is not None:
                raise TTDSError(f"popularity prior: no weight for item {missing}")
            w = np.asarray([float(weights[i]) for i in items])
        else:
            weights = np.asarray(weights, dtype=np.float64)
            if weights.ndim != 1 or len(weights) <= items[-1]:
                raise TTDSError(f"popularity prior: {len(weights)} weights for item ids up to {items[-1]}")
            w = weights[items]
        if not np.all(np.isfinite(w) & (w > 0)):
            raise TTDSError("popularity prior: every item weight must be a positive finite number")
        ids = torch.as_tensor(items, dtype=torch.long, device=self.device)
        w = torch.as_tensor(w, dtype=torch.float64, device=self.device)
        nodes = []
        for d in range(self.depth + 1):
            at = self.item_nodes[ids, d]
            inside = at >= 0
            mass = torch.zeros(self.n_nodes[d], dtype=torch.float64, device=self.device)
            mass.scatter_add_(0, at[inside], w[inside])
            nodes.append((strength * mass.clamp(min=1e-300).log()).float())
        item = torch.zeros(self.item_nodes.shape[0], dtype=torch.float32, device=self.device)
        item[ids] = (strength * w.log()).float()
        return Prior(nodes, item, strength)

    def first_codes(self, items: Sequence[Iterable[int]]) -> torch.Tensor:
        """[B, n_nodes[1]] float: 1 where the depth-1 node (first code) is that of some item
        of `items[b]` (unknown items are ignored), else 0."""
        out = torch.zeros((len(items), self.n_nodes[1]), dtype=torch.float32, device=self.device)
        for b, row in enumerate(items):
            known = [int(i) for i in row if int(i) in self.sequences]
            if known:
                out[b, self.item_nodes[torch.as_tensor(known, device=self.device), 1]] = 1.0
        return out

    def blocked(self, excluded: Sequence[Iterable[int]]) -> "Blocked":
        """Per prompt and depth, the nodes whose every item is excluded, and the excluded ends.

        `excluded[b]` are prompt b's items not to recommend (unknown items are ignored)."""
        rows = [sorted({int(i) for i in items if int(i) in self.sequences}) for items in excluded]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.as_tensor(r, dtype=torch.long)
        ids = ids.to(self.device)
        valid = ids >= 0
        safe = ids.clamp(min=0)
        length = torch.where(valid, self.item_length[safe], -1)
        closed, ends = [], []
        for d in range(self.depth + 1):
            nodes = self.item_nodes[safe, d]
            inside = valid & (nodes >= 0)
            counts = torch.zeros(len(rows), self.n_nodes[d], dtype=torch.long, device=self.device)
            counts.scatter_add_(1, nodes.clamp(min=0), inside.long())
            closed.append(counts >= self.count[d])        # every item below is excluded
            end = torch.zeros(len(rows), self.n_nodes[d], dtype=torch.long, device=self.device)
            end.scatter_add_(1, nodes.clamp(min=0), (inside & (length == d)).long())
            ends.append(end > 0)
        return Blocked(closed, ends)


@dataclass
class Prior:
    """A popularity prior on the items of a `SidTables` (module docstring, "Scores").

    `node[d][n]` = lambda * log W(n), W(n) the summed weight of the items at or below node n
    of depth d; `item[i]` = lambda * log w(i) (0 for ids outside the tables)."""

    node: list[torch.Tensor]
    item: torch.Tensor
    strength: float


@dataclass
class Blocked:
    """`closed[d][b, node]`: no item below is left for prompt b; `ends[d][b, node]`: the
    item ending at node is excluded for prompt b."""

    closed: list[torch.Tensor]
    ends: list[torch.Tensor]


def build_tables(item_sids, tokenizer, device="cpu", source: str = "item SID table") -> SidTables:
    return SidTables(item_token_ids(item_sids, tokenizer, source), tokenizer.eos_token_id, device)


# ---------------------------------------------------------------- shared-prefix attention

_ATTENTION = "ttds_shared_prefix"


@dataclass
class SharedPrefix:
    """The prompts' KV cache, one entry per prompt (not per beam), for every layer."""

    keys: list[torch.Tensor]     # per layer [B, kv_heads, T, head_dim]
    values: list[torch.Tensor]
    mask: torch.Tensor           # [B, T] bool: real (not padding) prompt positions
    beams: int
    calls: int = 0               # layers that attended through it (checked after every step)


def _shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             shared_prefix: SharedPrefix | None = None, **kwargs):
    """Attention of one new token per beam over its prompt (shared by the prompt's beams)
    and its own generated tokens. query [B*K, H, 1, D]; key / value [B*K, Hkv, t, D] are
    the generated positions (the cache holds only those). Returns [B*K, 1, H, D]."""
    if shared_prefix is None:
        raise RuntimeError("the shared-prefix attention needs the prompts' cache (ranker internals)")
    unsupported = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:
        raise TTDSError(f"backbone attention uses {unsupported[0]}, which the ranker does not implement")
    pre = shared_prefix
    pre.calls += 1
    layer = module.layer_idx
    pk, pv = pre.keys[layer], pre.values[layer]
    b, kv, t_pre, d = pk.shape
    rows, heads, q_len, _ = query.shape
    k, g, t_gen = pre.beams, heads // kv, key.shape[2]
    scale = scaling if scaling is not None else d ** -0.5
    query = query * scale                       # before the products: no fp16 overflow
    q = query.reshape(b, k, kv, g, d).permute(0, 2, 1, 3, 4).reshape(b, kv, k * g, d)
    s_pre = torch.matmul(q, pk.transpose(-1, -2)).float()                    # [B, Hkv, K*g, T]
    s_pre = s_pre.masked_fill(~pre.mask[:, None, None, :], _NEG)
    qg = query.reshape(rows, kv, g, d)
    s_gen = torch.matmul(qg, key.transpose(-1, -2)).float()                # [B*K, Hkv, g, t]
    s_gen = s_gen.reshape(b, k, kv, g, t_gen).permute(0, 2, 1, 3, 4).reshape(b, kv, k * g, t_gen)
    w = torch.softmax(torch.cat([s_pre, s_gen], dim=-1), dim=-1).to(value.dtype)
    out = torch.matmul(w[..., :t_pre], pv)                                    # [B, Hkv, K*g, D]
    vg = value.reshape(b, k, kv, t_gen, d).permute(0, 2, 1, 3, 4)            # [B, Hkv, K, t, D]
    wg = w[..., t_pre:].reshape(b, kv, k, g, t_gen)
    out = out.reshape(b, kv, k, g, d) + torch.matmul(wg, vg)
    return out.permute(0, 2, 1, 3, 4).reshape(rows, 1, heads, d), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_ATTENTION, _shared_prefix_attention)
    # the ranker passes a ready 4D mask, which mask creation returns as it is; registered
    # anyway so that the lookup by name can never fail (the prompt's padding is in SharedPrefix)
    AttentionMaskInterface.register(_ATTENTION, lambda *args, **kwargs: None)


@contextlib.contextmanager
def _attention(configs: list, name: str):
    """Run with attention implementation `name` in every config of `configs` (the model's and
    each attention layer's, which composite models keep apart), restoring them after.
    Not thread-safe: one search at a time per model."""
    saved = [c._attn_implementation_internal for c in configs]
    for c in configs:
        c._attn_implementation_internal = name
    try:
        yield
    finally:
        for c, value in zip(configs, saved):
            c._attn_implementation_internal = value


def _check_backbone(hf, decoder) -> list:
    """The configs to switch for the shared-prefix attention; one line when the backbone
    does something the engine does not reproduce (it would rank silently wrong)."""
    name = type(hf).__name__
    if not getattr(hf, "_can_set_attn_implementation", lambda: False)():
        raise TTDSError(f"backbone {name} does not use transformers' attention interface, which the ranker "
                        "needs (LLaMA-family decoders do)")
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        raise TTDSError(f"backbone {name} has sliding-window or other non-full attention layers, "
                        "which the ranker does not implement")
    for attr in ("final_logit_softcapping", "attn_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise TTDSError(f"backbone {name} sets {attr}, which the ranker does not implement")
    layers = [m for m in decoder.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
    configs = {id(hf.config): hf.config, id(decoder.config): decoder.config}
    configs.update({id(m.config): m.config for m in layers})
    return list(configs.values())


# ---------------------------------------------------------------- the ranker


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, position ids) of left-padded `prompts`; positions count real
    tokens from 0, as `generate` derives them from a left-padded mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)



@dataclass
class PromptBatch:
    """Prompts prefilled once: the shared cache and the hidden state after each prompt."""

    prefix: SharedPrefix
    last_hidden: torch.Tensor    # [B, hidden]
    positions: torch.Tensor      # [B] position of the first generated token (= real prompt length)


class Ranker:
    """Top-`beams` items per prompt by trie-constrained beam search (module docstring)."""

    def __init__(self, model, tokenizer, tables: SidTables, beams: int, scoring: str = "full",
                 prior: Prior | None = None, copy_penalty: float = 0.0):
        from .backbone import decoder_of, hf_model

        if beams < 1:
            raise TTDSError(f"params: 'eval.beams' = {beams!r}, expected at least 1")
        if scoring not in SCORINGS:
            raise TTDSError(f"params: 'eval.scoring' = {scoring!r}, expected one of {', '.join(SCORINGS)}")
        self.model, self.tokenizer, self.tables, self.beams, self.scoring = model, tokenizer, tables, int(beams), scoring
        self.prior = prior   # popularity prior (`SidTables.prior`), or None; may be swapped between searches
        self.copy_penalty = check_copy_penalty(copy_penalty)  # beta; may be changed between searches
        self.hf = hf_model(model)
        self.decoder = decoder_of(self.hf)
        self._configs = _check_backbone(self.hf, self.decoder)
        _register_attention()
        self.device = next(model.parameters()).device
        if (tables.device.type, tables.device.index or 0) != (self.device.type, self.device.index or 0):
            raise TTDSError(f"SID tables on {tables.device}, model on {self.device}: build them on the model's device")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        head = self.hf.get_output_embeddings()
        # positions of each depth's columns (and EOS) in the scored logits
        if scoring in ("sid", "trie"):  # "trie" renormalises over a subset of these rows
            ids = torch.as_tensor(tables.tokens, dtype=torch.long, device=self.device)
            self._head_w = head.weight.detach()[ids]
            bias = getattr(head, "bias", None)
            self._head_b = None if bias is None else bias.detach()[ids]
            where = {t: i for i, t in enumerate(tables.tokens)}
            self._col_pos = [torch.as_tensor([where[int(t)] for t in c.tolist()], dtype=torch.long,
                                             device=self.device) for c in tables.cols]
            self._eos_pos = where[tables.eos_id]
        else:
            self._head = head
            self._col_pos = list(tables.cols)
            self._eos_pos = tables.eos_id

    # -------------------------------------------------------------- model calls

    def _log_probs(self, hidden: torch.Tensor, d: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Log-probabilities of depth d's columns [..., width_d] (None at the last depth) and of EOS [...]."""
        if self.scoring in ("sid", "trie"):
            logits = torch.nn.functional.linear(hidden, self._head_w, self._head_b).float()
        else:
            logits = self._head(hidden).float()
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        cols = logits[..., self._col_pos[d]] - lse if d < self.tables.depth else None
        return cols, logits[..., self._eos_pos] - lse[..., 0]

    @torch.no_grad()
    def first_log_probs(self, batch: PromptBatch) -> torch.Tensor:
        """[B, width_0] log-probabilities of the first SID token's columns (`tables.cols[0]`)
        after each prompt, as the search scores its first step (no prior, no penalty)."""
        return self._log_probs(batch.last_hidden, 0)[0]

    @torch.no_grad()
    def encode(self, prompts: Sequence[Sequence[int]]) -> PromptBatch:
        """Left-pad `prompts` (token ids) and prefill them once."""
        from transformers import DynamicCache

        if min(len(p) for p in prompts) < 1:
            raise TTDSError("a prompt must have at least 1 token")
        ids, mask, positions = left_pad(prompts, self.pad_id, self.device)
        cache = DynamicCache(config=self.hf.config)
        out = self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True)
        real = mask.bool()
        keys, values = [], []
        for layer in cache.layers:
            keys.append(layer.keys)
            # padded positions are never attended, but 0 x NaN would still poison the sum
            values.append(layer.values.masked_fill(~real[:, None, :, None], 0.0))
        prefix = SharedPrefix(keys, values, real, self.beams)
        return PromptBatch(prefix, out.last_hidden_state[:, -1], mask.sum(-1))

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, prefix: SharedPrefix, cache) -> torch.Tensor:
        """One decoding step for all beams: tokens [B, K] at positions [B, K] -> hidden [B, K, h]."""
        b, k = tokens.shape
        gen = cache.get_seq_length() + 1
        mask = torch.ones((b * k, 1, 1, gen), dtype=torch.bool, device=self.device)  # all generated: visible
        before = prefix.calls
        with _attention(self._configs, _ATTENTION):
            out = self.decoder(input_ids=tokens.reshape(b * k, 1), position_ids=positions.reshape(b * k, 1),
                               attention_mask=mask, past_key_values=cache, use_cache=True, shared_prefix=prefix)
        if prefix.calls - before != len(prefix.keys):  # a layer attended some other way: its beams saw no prompt
            raise TTDSError(f"backbone {type(self.hf).__name__}: {prefix.calls - before} of {len(prefix.keys)} "
                            "layers used the ranker's attention; this architecture is not supported")
        return out.last_hidden_state[:, -1].reshape(b, k, -1)

    # -------------------------------------------------------------- the search

    @torch.no_grad()
    def search(self, batch: PromptBatch, excluded: Sequence[Iterable[int]] | None = None,
               constrained: bool = True, history: Sequence[Iterable[int]] | None = None
               ) -> list[list[tuple[int, float]]]:
        """Per prompt, up to `beams` distinct (item, score) pairs, best first.

        `excluded[i]` are items prompt i must not get (history masking). With `self.prior`,
        scores include lambda * log w(item); with `self.copy_penalty` = beta > 0, items whose
        first code is that of an item of `history[i]` (prompt i's history, required then)
        lose beta (module docstring, "Scores"). `constrained=False`
        runs the same search without the tables (every token of a depth allowed after
        every beam), for benchmarks only: its items are meaningless."""
        from transformers import DynamicCache

        tab, K, prior = self.tables, self.beams, self.prior
        B = batch.last_hidden.shape[0]
        if excluded is not None and len(excluded) != B:
            raise ValueError("one exclusion list per prompt expected")
        blocked = tab.blocked(excluded) if excluded is not None else None
        copied = None
        if self.copy_penalty > 0:
            if history is None or len(history) != B:
                raise ValueError("a copy penalty needs one history per prompt")
            copied = self.copy_penalty * tab.first_codes(history)   # [B, first codes]
        dev = self.device
        node = torch.zeros((B, K), dtype=torch.long, device=dev)
        score = torch.full((B, K), _NEG, device=dev)
        score[:, 0] = 0.0 if prior is None else prior.node[0][0]  # one live beam per prompt at the root
        pool_item = torch.full((B, K), -1, dtype=torch.long, device=dev)
        pool_score = torch.full((B, K), _NEG, device=dev)
        batch_idx = torch.arange(B, device=dev)[:, None]
        cache = DynamicCache(config=self.hf.config)
        hidden = batch.last_hidden[:, None, :]         # the root: every beam shares the prompt's state
        for d in range(tab.depth + 1):
            cols_lp, eos_lp = self._log_probs(hidden, d)
            if d == 0:  # the root's one state serves every beam slot
                cols_lp = cols_lp.expand(B, K, -1)
            else:  # beams at a node that ends an item may close it with EOS
                item = tab.item_end[d][node]
                ends = item >= 0
                if blocked is not None:
                    ends &= ~blocked.ends[d][batch_idx, node]
            if d < tab.depth:
                if constrained:
                    child = tab.child(d, node)                                       # [B, K, W]
                    ok = child >= 0
                    if blocked is not None:
                        ok &= ~blocked.closed[d + 1][batch_idx[..., None], child.clamp(min=0)]
                else:
                    width = tab.cols[d].numel()
                    child = torch.zeros((B, K, width), dtype=torch.long, device=dev)
                    ok = torch.ones((B, K, width), dtype=torch.bool, device=dev)
            if self.scoring == "trie":
                cols_lp, eos_lp = _renormalise(cols_lp, ok if d < tab.depth else None,
                                               eos_lp, ends if d > 0 else None)
            if d > 0:  # finished: the closing EOS
                close = score + eos_lp
                if prior is not None:  # lambda * (log w(item) - log W(node))
                    close = close + prior.item[item.clamp(min=0)] - prior.node[d][node]
                fin = torch.where(ends, close, _NEG)
                pool_item, pool_score = _merge_pool(pool_item, pool_score, torch.where(ends, item, -1), fin, K)
            if d == tab.depth:
                break
            step = score[..., None] + cols_lp
            if prior is not None:  # lambda * (log W(child) - log W(node))
                step = step + prior.node[d + 1][child.clamp(min=0)] - prior.node[d][node][..., None]
            if d == 0 and copied is not None:  # beta on the first codes of the prompt's history
                step = step - copied[batch_idx[..., None], child.clamp(min=0)]
            cand = torch.where(ok, step, _NEG).reshape(B, -1)
            # stable sort: among equal scores the earlier beam, then the lower token id, wins
            top = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :K]
            parent, col = top // cols_lp.shape[-1], top % cols_lp.shape[-1]
            score = cand.gather(1, top)
            node = child.reshape(B, -1).gather(1, top).clamp(min=0)
            tokens = tab.cols[d][col]
            if d > 0:
                cache.reorder_cache((batch_idx * K + parent).reshape(-1))
            hidden = self._step(tokens, (batch.positions[:, None] + d).expand(B, K), batch.prefix, cache)
        items, scores = pool_item.tolist(), pool_score.tolist()   # the one host transfer
        return [[(i, s) for i, s in zip(it, sc) if i >= 0 and s > _NEG] for it, sc in zip(items, scores)]


def _renormalise(cols_lp: torch.Tensor, cols_ok: torch.Tensor | None, eos_lp: torch.Tensor,
                 eos_ok: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities renormalised over the allowed continuations of each beam: the
    columns where `cols_ok` and EOS where `eos_ok` (None: that kind is not allowed at all).
    A beam with nothing allowed keeps its values (it is never extended)."""
    parts = []
    if cols_ok is not None:
        parts.append(torch.where(cols_ok, cols_lp, _NEG))
    if eos_ok is not None:
        parts.append(torch.where(eos_ok, eos_lp, _NEG)[..., None])
    lse = torch.logsumexp(torch.cat(parts, dim=-1), dim=-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (None if cols_lp is None else cols_lp - lse[..., None]), eos_lp - lse


def _merge_pool(items: torch.Tensor, scores: torch.Tensor, new_items: torch.Tensor, new_scores: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of two (item, score) pools: by score, equal scores by lower item id."""
    all_items = torch.cat([items, new_items], dim=1)
    all_scores = torch.cat([scores, new_scores], dim=1)
    by_item = torch.sort(all_items, dim=1, stable=True).indices
    all_items, all_scores = all_items.gather(1, by_item), all_scores.gather(1, by_item)
    best = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :k]
    return all_items.gather(1, best), all_scores.gather(1, best)


# ---------------------------------------------------------------- ranking cases


class PromptBuilder:
    """Token ids of the seqrec prompt for a user and a history, as training built them."""

    def __init__(self, tokenizer, item_sids, user_sids, template: int, packed: bool = False):
        self.tokenizer, self.template, self.packed = tokenizer, template, packed
        self.item_sid = dict(zip(item_sids["item_id"].astype(int), item_sids["sid"].astype(str)))
        self.user_sid = (dict(zip(user_sids["user_id"].astype(int), user_sids["sid"].astype(str)))
                         if user_sids is not None and len(user_sids) else None)

    def __call__(self, user_id: int, history: list[int]) -> list[int]:
        from .prompts import seqrec_prompt

        missing = next((i for i in history if i not in self.item_sid), None)
        if missing is not None:
            raise TTDSError(f"item {missing} (history of user {user_id}) has no SID in the model's item table")
        user = None
        if self.user_sid is not None:
            user = self.user_sid.get(user_id)
            if user is None:
                raise TTDSError(f"user {user_id} has no SID in the model's user table")
        text = seqrec_prompt([self.item_sid[i] for i in history], user, self.template, self.packed,
                             self.tokenizer.eos_token)
        return encode_prompt(self.tokenizer, text)


def rank_cases(ranker: Ranker, build_prompt: PromptBuilder, cases: list[Case], batch_size: int,
               modes: tuple[bool, ...] = (False, True), progress: str | None = None
               ) -> dict[bool, list[list[tuple[int, float]]]]:
    """Ranked (item, score) lists per case, for each masking mode (False = unmasked;
    True = the case's `seen` items excluded).

    Cases are sorted by prompt length so a batch carries little padding; each batch is
    prefilled once and searched once per mode.
    """
    from tqdm.auto import tqdm

    prompts = [build_prompt(c.user_id, c.history) for c in cases]
    order = sorted(range(len(cases)), key=lambda i: (len(prompts[i]), i))
    out: dict[bool, list] = {m: [None] * len(cases) for m in modes}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=progress, unit="batch", disable=progress is None):
        batch = ranker.encode([prompts[i] for i in idx])
        history = [cases[i].history for i in idx]   # the prompts' items (the copy penalty's)
        for masked in modes:
            excluded = [cases[i].seen for i in idx] if masked else None
            for i, ranked in zip(idx, ranker.search(batch, excluded, history=history)):
                out[masked][i] = ranked
    return out


def check_copy_penalty(beta) -> float:
    """`eval.copy_penalty` as a float, or the one-line error."""
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        beta = float("nan")
    if not np.isfinite(beta) or beta < 0:
        raise TTDSError(f"params: 'eval.copy_penalty' = {beta!r}, expected a finite number >= 0")
    return beta


def ranker_for(model, tokenizer, item_sids, beams: int, scoring: str,
               source: str = "model item SID table", popularity=None, prior: float = 0.0,
               copy_penalty: float = 0.0) -> tuple[Ranker, SidTables]:
    """The ranker of `model` over the items of `item_sids`, its tables on the model's device;
    with `prior` = lambda > 0, a popularity prior from `popularity` (item weights); with
    `copy_penalty` = beta > 0, the first codes of the prompt's history lose beta."""
    tables = build_tables(item_sids, tokenizer, next(model.parameters()).device, source)
    item_prior = None
    if prior:
        if popularity is None:
            raise TTDSError("a popularity prior needs item weights")
        item_prior = tables.prior(popularity, prior)
    return Ranker(model, tokenizer, tables, beams, scoring, item_prior, copy_penalty), tables
