"""The previous ranker, kept as a reference for benchmarks and the equivalence check:
constrained beam search over item semantic IDs (SIDs) with Hugging Face `generate`.

`ttds_core.ranker` replaced it everywhere in the product (about 4x faster on 2 CPU cores,
see docs/ranking.md). It is kept here, unchanged but for its imports, so that
`bench.bench_eval` can time both on the same prompts and `bench.compare_rankers` can check
that they return the same items.

The model may only spell real items: a prefix trie of the item SID table, over token
ids, tells `generate` which tokens may follow the tokens generated so far
(`prefix_allowed_tokens_fn`). SIDs have variable length (M code tokens, plus a suffix
token only for colliding code tuples, §4.2.5); after a complete SID the only allowed
token is EOS, so every finished beam is exactly one item. Per-user exclusion (history
masking) works on the same trie: every node keeps the number of items below it, and a
user's excluded items are subtracted, so no branch that leads only to excluded items
is ever entered and the freed beam slots go to other items.

Scores are the sum of the token log-probabilities of the SID and its EOS under the
full-vocabulary softmax (HF applies the constraint after `log_softmax`), and
`length_penalty=0.0` ranks by that sum: a suffixed SID is one token longer, and HF's
default length normalisation would favour it for no reason.

`scoring="sid"` is a cheaper variant for small CPUs: on the decoding steps the LM head
is computed only for the SID tokens and EOS (about 2% of SmolLM2's 49k rows; the head
is most of a decoding step's cost with few layers), so each token's probability is
normalised over the tokens that can legally appear there instead of the whole
vocabulary. A trained model puts nearly all its mass on SID tokens after the response
prefix, so the two agree closely; "full" is the exact model likelihood.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ttds_core.backbone import hf_model
from ttds_core.errors import TTDSError
from ttds_core.ranker import item_token_ids, left_pad

# HF beam search parks padding beams and never-finished hypotheses at about -1e9; a real
# SID's log-probability is many orders of magnitude above this.
_DEAD_SCORE = -1.0e8


@dataclass
class Exclusion:
    """Items one user must not be recommended, as per-node counts on a trie."""

    items: frozenset = frozenset()
    node_counts: dict = field(default_factory=dict)


SCORINGS = ("full", "sid")


class SidTrie:
    """A prefix tree of token-id sequences, one per item.

    Nodes are integers (0 = root); `children[n]` maps a token id to a child node,
    `count[n]` is the number of items whose sequence passes through or ends at `n`,
    and `item_at[n]` is the item whose sequence ends at `n` (or None).
    """

    def __init__(self, sequences: Mapping[int, Sequence[int]], eos_id: int):
        if not sequences:
            raise TTDSError("item SID table is empty: nothing to recommend")
        self.eos_id = int(eos_id)
        self.children: list[dict[int, int]] = [{}]
        self.count: list[int] = [0]
        self.item_at: list[int | None] = [None]
        self.path: dict[int, list[int]] = {}  # item -> nodes from the root's child to its end
        for item, seq in sequences.items():
            self._insert(int(item), [int(t) for t in seq])
        self.max_length = max(len(seq) for seq in sequences.values())
        self._allowed_cache: dict[int, list[int]] = {}

    def _insert(self, item: int, seq: list[int]) -> None:
        if not seq:
            raise TTDSError(f"item {item}: empty SID")
        if self.eos_id in seq:
            raise TTDSError(f"item {item}: SID contains the EOS token")
        node, path = 0, []
        self.count[0] += 1
        for tok in seq:
            nxt = self.children[node].get(tok)
            if nxt is None:
                nxt = len(self.children)
                self.children[node][tok] = nxt
                self.children.append({})
                self.count.append(0)
                self.item_at.append(None)
            node = nxt
            self.count[node] += 1
            path.append(node)
        if self.item_at[node] is not None:
            raise TTDSError(f"items {self.item_at[node]} and {item} have the same SID: SIDs must be unique")
        self.item_at[node] = item
        self.path[item] = path

    def __len__(self) -> int:
        return len(self.path)

    def tokens(self) -> list[int]:
        """Every token id that can be generated: the trie's edges and EOS."""
        return sorted({tok for kids in self.children for tok in kids} | {self.eos_id})

    def walk(self, tokens: Iterable[int]) -> int | None:
        """Node reached by `tokens` from the root, or None when they leave the trie."""
        node = 0
        for tok in tokens:
            node = self.children[node].get(int(tok))
            if node is None:
                return None
        return node

    def exclusion(self, items: Iterable[int]) -> Exclusion:
        """Per-node counts of `items` (items not in the trie are ignored)."""
        counts: dict[int, int] = {}
        known = frozenset(int(i) for i in items if int(i) in self.path)
        for item in known:
            for node in self.path[item]:
                counts[node] = counts.get(node, 0) + 1
        return Exclusion(known, counts)

    def allowed(self, tokens: Sequence[int], exclusion: Exclusion | None = None) -> list[int]:
        """Tokens that may follow `tokens` (generated so far) on the way to a non-excluded item.

        Off-trie or finished sequences (HF keeps a few padding beams alive) may only
        emit EOS; their scores are -inf or ~-1e9 and they are dropped afterwards.
        """
        node = 0
        for tok in tokens:
            if tok == self.eos_id:
                return [self.eos_id]
            node = self.children[node].get(tok)
            if node is None:
                return [self.eos_id]
        if exclusion is None or not exclusion.items:
            cached = self._allowed_cache.get(node)
            if cached is None:
                cached = list(self.children[node])
                if self.item_at[node] is not None:
                    cached.append(self.eos_id)
                self._allowed_cache[node] = cached
            return cached
        out = [tok for tok, child in self.children[node].items()
               if self.count[child] > exclusion.node_counts.get(child, 0)]
        item = self.item_at[node]
        if item is not None and item not in exclusion.items:
            out.append(self.eos_id)
        return out or [self.eos_id]

    def item_of(self, tokens: Sequence[int]) -> int | None:
        """Item spelled by `tokens` (generation output: SID, then EOS, then padding), or None."""
        node = 0
        for tok in tokens:
            if tok == self.eos_id:
                return self.item_at[node]
            node = self.children[node].get(int(tok))
            if node is None:
                return None
        return self.item_at[node]


def build_item_trie(item_sids, tokenizer, source: str = "item SID table") -> SidTrie:
    return SidTrie(item_token_ids(item_sids, tokenizer, source), tokenizer.eos_token_id)


def search_config(tokenizer, beams: int, max_new_tokens: int):
    """A GenerationConfig for deterministic beam search that sets every field affecting scores.

    `do_sample=False` is explicit: newer transformers and many checkpoints' generation
    configs default to sampling, which silently turns beam search into beam sampling.
    """
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0,
        num_beams=beams, num_return_sequences=beams, num_beam_groups=1, diversity_penalty=0.0,
        do_sample=False, temperature=1.0, top_k=None, top_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, renormalize_logits=False,
        length_penalty=0.0, early_stopping=False, use_cache=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
        # output_scores is what makes HF return `sequences_scores` (it also keeps the
        # per-step log-probs, a few hundred MB per batch at most)
        output_scores=True, return_dict_in_generate=True,
    )


@contextlib.contextmanager
def _only_this_config(model, config):
    """`generate` fills every field left unset in the passed config from
    `model.generation_config` (chat checkpoints set sampling, repetition penalties,
    suppressed tokens...). Swapping ours in for the call makes the search depend on
    nothing but what `search_config` sets."""
    hf = hf_model(model)
    saved = hf.generation_config
    hf.generation_config = config
    try:
        yield
    finally:
        hf.generation_config = saved


class _SubsetHead(nn.Module):
    """An LM head that computes only `token_ids`' logits; every other logit is -inf."""

    def __init__(self, head: nn.Module, token_ids: list[int]):
        super().__init__()
        self.out_features = head.weight.shape[0]
        self.register_buffer("ids", torch.as_tensor(token_ids, dtype=torch.long, device=head.weight.device))
        self.weight = nn.Parameter(head.weight.detach()[self.ids].clone(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach()[self.ids].clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = hidden.new_full((*hidden.shape[:-1], self.out_features), float("-inf"))
        out[..., self.ids] = nn.functional.linear(hidden, self.weight, self.bias)
        return out


@contextlib.contextmanager
def _sid_head(model, subset: _SubsetHead | None):
    """Swap in the SID-only head for the duration of a search (no-op when None)."""
    if subset is None:
        yield
        return
    hf = hf_model(model)
    full = hf.get_output_embeddings()
    hf.set_output_embeddings(subset)
    try:
        yield
    finally:
        hf.set_output_embeddings(full)


@dataclass
class PromptBatch:
    """Left-padded prompts and the KV cache of all but their last token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: object  # transformers.DynamicCache over input_ids[:, :-1]


class ConstrainedRanker:
    """Top-`beams` items per prompt by trie-constrained beam search.

    Each prompt is prefilled once (`encode`) and its cache is copied into every beam
    and every search (`search`), so evaluating masked and unmasked rankings costs one
    prefill, not 2 x beams. The instruction prefix is the same for every user, but
    with left padding it sits at a different position in each row (RoPE keys depend
    on position), so a single shared prefix cache cannot be spliced into a batch;
    HF's prompt-cache reuse only covers a batch that shares the whole prefix.
    """

    def __init__(self, model, tokenizer, trie: SidTrie, beams: int, scoring: str = "full"):
        if beams < 1:
            raise TTDSError(f"params: 'eval.beams' = {beams!r}, expected at least 1")
        if scoring not in SCORINGS:
            raise TTDSError(f"params: 'eval.scoring' = {scoring!r}, expected one of {', '.join(SCORINGS)}")
        self.model, self.tokenizer, self.trie, self.beams = model, tokenizer, trie, int(beams)
        self.scoring = scoring
        self.subset_head = (_SubsetHead(hf_model(model).get_output_embeddings(), trie.tokens())
                            if scoring == "sid" else None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.config = search_config(tokenizer, self.beams, trie.max_length + 1)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[Sequence[int]]) -> PromptBatch:
        """Left-pad `prompts` (token ids) and prefill the cache of all tokens but the last."""
        from transformers import DynamicCache

        if min(len(p) for p in prompts) < 2:
            raise TTDSError("a prompt must have at least 2 tokens")
        ids, mask, positions = left_pad(prompts, self.pad_id, self.device)
        cache = DynamicCache(config=hf_model(self.model).config)
        self.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                   past_key_values=cache, use_cache=True, logits_to_keep=1)
        return PromptBatch(ids, mask, cache)

    @torch.no_grad()
    def search(self, batch: PromptBatch, exclusions: Sequence[Exclusion | None] | None = None,
               constrained: bool = True) -> list[list[tuple[int, float]]]:
        """Per prompt, up to `beams` distinct (item, score) pairs, best first.

        `exclusions[i]` removes items from prompt i's trie. `constrained=False` runs the
        same beam search without the trie (for benchmarks): off-trie outputs are dropped.
        """
        import copy

        n = batch.input_ids.shape[0]
        if exclusions is not None and len(exclusions) != n:
            raise ValueError("one exclusion per prompt expected")
        prompt_len = batch.input_ids.shape[1]
        cache = copy.deepcopy(batch.cache)
        cache.batch_repeat_interleave(self.beams)  # generate() expands input_ids, not a passed cache
        trie = self.trie

        def allowed(row: int, sent: torch.Tensor) -> list[int]:
            return trie.allowed(sent[prompt_len:].tolist(), exclusions[row] if exclusions else None)

        with _only_this_config(self.model, self.config), _sid_head(self.model, self.subset_head):
            out = self.model.generate(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, past_key_values=cache,
                generation_config=self.config, prefix_allowed_tokens_fn=allowed if constrained else None)
        sequences = out.sequences[:, prompt_len:].view(n, self.beams, -1).tolist()
        scores = out.sequences_scores.view(n, self.beams).float().tolist()
        return [self._items(seqs, scs) for seqs, scs in zip(sequences, scores)]

    def _items(self, seqs: list[list[int]], scores: list[float]) -> list[tuple[int, float]]:
        ranked: list[tuple[int, float]] = []
        seen: set[int] = set()
        for seq, score in sorted(zip(seqs, scores), key=lambda p: -p[1]):
            if not score > _DEAD_SCORE:  # also drops NaN / -inf
                continue
            item = self.trie.item_of(seq)
            if item is not None and item not in seen:
                seen.add(item)
                ranked.append((item, score))
        return ranked


def rank_cases_hf(ranker: ConstrainedRanker, build_prompt, cases, batch_size: int,
                  modes: tuple[bool, ...] = (False, True)) -> dict[bool, list[list[tuple[int, float]]]]:
    """The previous `evaluate.rank_cases`: length-sorted batches, one prefill, one search per mode."""
    prompts = [build_prompt(c.user_id, c.history) for c in cases]
    order = sorted(range(len(cases)), key=lambda i: (len(prompts[i]), i))
    out: dict[bool, list] = {m: [None] * len(cases) for m in modes}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = ranker.encode([prompts[i] for i in idx])
        for masked in modes:
            excl = [ranker.trie.exclusion(cases[i].seen) for i in idx] if masked else None
            for i, ranked in zip(idx, ranker.search(batch, excl)):
                out[masked][i] = ranked
    return out
