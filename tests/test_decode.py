"""Trie-constrained beam search against exhaustive scoring on a tiny random LLaMA."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from ttds_core.decode import ConstrainedRanker, SidTrie, build_item_trie
from ttds_core.errors import TTDSError
from ttds_core.prompts import seqrec_prompt
from ttds_core.tokens import sid_string, tower_vocabulary
from ttds_core.vocab import encode_prompt, extend_vocabulary, encode_response

LENGTH, CODEBOOK, SUFFIXES = 3, 4, 4

# 14 items; (1,2,3) and (0,0,1) collide and get suffixes, so SIDs have 3 or 4 tokens.
CODES = [(0, 0, 0), (0, 0, 1), (0, 0, 1), (0, 1, 2), (1, 2, 3), (1, 2, 3), (1, 2, 3), (1, 3, 0),
         (2, 0, 0), (2, 1, 1), (3, 3, 3), (3, 2, 1), (0, 3, 2), (2, 2, 2)]


def sid_table(codes=CODES) -> pd.DataFrame:
    groups: dict = {}
    for c in codes:
        groups[c] = groups.get(c, 0) + 1
    seen: dict = {}
    rows = []
    for item, c in enumerate(codes):
        suffix = -1
        if groups[c] > 1:
            suffix = seen.get(c, 0)
            seen[c] = suffix + 1
        rows.append({"item_id": item, "codes": list(c), "suffix": suffix, "sid": sid_string("item", c, suffix)})
    return pd.DataFrame(rows)


@pytest.fixture
def setup(tiny_lm):
    model, tok = tiny_lm
    extend_vocabulary(model, tok, tower_vocabulary("item", LENGTH, CODEBOOK, SUFFIXES))
    torch.manual_seed(1)
    with torch.no_grad():  # give the new rows real, distinct weights
        model.get_input_embeddings().weight.normal_(0, 1.0)
    table = sid_table()
    return model, tok, table, build_item_trie(table, tok)


def prompts_for(tok, table, histories):
    sids = table.set_index("item_id")["sid"]
    return [encode_prompt(tok, seqrec_prompt([sids[i] for i in h])) for h in histories]


@torch.no_grad()
def exhaustive(model, tok, prompt, table, exclude=(), allowed_ids=None):
    """Every item's SID + EOS scored by the model (one right-padded batch): the sum of the
    response tokens' log-probs under the full softmax (or over `allowed_ids` only), best first."""
    items = [int(i) for i in table["item_id"] if int(i) not in exclude]
    sids = dict(zip(table["item_id"].astype(int), table["sid"]))
    resps = [encode_response(tok, sids[i]) for i in items]
    width = len(prompt) + max(len(r) for r in resps)
    ids = torch.full((len(items), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(resps):
        ids[row, :len(prompt) + len(r)] = torch.tensor(prompt + r)
        mask[row, :len(prompt) + len(r)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    if allowed_ids is not None:
        keep = torch.full((logits.shape[-1],), float("-inf"))
        keep[torch.tensor(allowed_ids)] = 0.0
        logits = logits + keep
    logp = torch.log_softmax(logits, -1)
    scores = [float(sum(logp[row, len(prompt) - 1 + t, tok_id] for t, tok_id in enumerate(r)))
              for row, r in enumerate(resps)]
    return sorted(zip(items, scores), key=lambda p: -p[1])


HISTORIES = [[0, 4, 9], [3, 1], [13, 12, 11, 10, 2, 5]]


def test_beam_search_equals_exhaustive_scoring(setup):
    model, tok, table, trie = setup
    ranker = ConstrainedRanker(model, tok, trie, beams=20)  # more beams than items: search is exact
    prompts = prompts_for(tok, table, HISTORIES)
    results = ranker.search(ranker.encode(prompts))
    for prompt, got in zip(prompts, results):
        want = exhaustive(model, tok, prompt, table)
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)


def test_masked_search_equals_exhaustive_without_history(setup):
    model, tok, table, trie = setup
    ranker = ConstrainedRanker(model, tok, trie, beams=20)
    prompts = prompts_for(tok, table, HISTORIES)
    excl = [trie.exclusion(h) for h in HISTORIES]
    results = ranker.search(ranker.encode(prompts), excl)
    for prompt, hist, got in zip(prompts, HISTORIES, results):
        want = exhaustive(model, tok, prompt, table, exclude=set(hist))
        assert [i for i, _ in got] == [i for i, _ in want]
        assert not set(hist) & {i for i, _ in got}


def test_small_beam_returns_distinct_real_items_deterministically(setup):
    model, tok, table, trie = setup
    ranker = ConstrainedRanker(model, tok, trie, beams=5)
    batch = ranker.encode(prompts_for(tok, table, HISTORIES))
    excl = [trie.exclusion(h) for h in HISTORIES]
    first, again = ranker.search(batch, excl), ranker.search(batch, excl)
    assert first == again  # the prefilled cache is copied, never consumed
    for hist, got in zip(HISTORIES, first):
        items = [i for i, _ in got]
        assert len(items) == 5 and len(set(items)) == 5
        assert set(items) <= set(table["item_id"]) and not set(items) & set(hist)
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)


def test_batched_padding_matches_single_prompts(setup):
    model, tok, table, trie = setup
    ranker = ConstrainedRanker(model, tok, trie, beams=6)
    prompts = prompts_for(tok, table, HISTORIES)
    batched = ranker.search(ranker.encode(prompts))
    for prompt, got in zip(prompts, batched):
        single = ranker.search(ranker.encode([prompt]))[0]
        assert [i for i, _ in got] == [i for i, _ in single]
        assert [s for _, s in got] == pytest.approx([s for _, s in single], abs=1e-4)


def test_sampling_defaults_of_the_checkpoint_are_ignored(setup):
    model, tok, table, trie = setup
    ranker = ConstrainedRanker(model, tok, trie, beams=8)
    batch = ranker.encode(prompts_for(tok, table, HISTORIES))
    clean = ranker.search(batch)
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_k, gc.repetition_penalty, gc.length_penalty = True, 0.3, 2, 3.0, 1.0
    torch.manual_seed(123)
    assert ranker.search(batch) == clean
    assert model.generation_config.do_sample is True  # restored after the call


def test_trie_allows_only_sid_continuations_and_eos_after_complete_sid(setup):
    _, tok, table, trie = setup
    eos = tok.eos_token_id
    ids = {int(i): encode_response(tok, s)[:-1] for i, s in zip(table["item_id"], table["sid"])}
    assert len(ids[4]) == LENGTH + 1 and len(ids[0]) == LENGTH  # suffixed vs plain SID
    for item, seq in ids.items():
        for t in range(len(seq)):
            assert seq[t] in trie.allowed(seq[:t])
        assert trie.allowed(seq) == [eos]
        assert trie.item_of(seq + [eos, eos]) == item
    assert trie.item_of(ids[4][:-1]) is None  # a code tuple without its suffix is no item
    assert trie.allowed([ids[0][0], ids[13][1]]) == [eos]  # (0, 2) is no prefix: only EOS


def test_exclusion_prunes_branches_with_only_excluded_items(setup):
    _, tok, table, trie = setup
    ids = {int(i): encode_response(tok, s)[:-1] for i, s in zip(table["item_id"], table["sid"])}
    # items 4, 5, 6 are the only ones under (1, 2, 3): excluding all three closes that branch
    excl = trie.exclusion([4, 5, 6])
    assert ids[4][2] not in trie.allowed(ids[4][:2], excl)
    assert ids[7][1] in trie.allowed(ids[7][:1], excl)  # sibling branch (1, 3, 0) stays open
    assert trie.allowed(ids[4][:3], trie.exclusion([4])) == sorted(
        [ids[5][3], ids[6][3]], key=trie.allowed(ids[4][:3]).index)


def test_duplicate_sids_and_unknown_tokens_are_rejected(setup):
    _, tok, table, _ = setup
    dup = table.copy()
    dup.loc[1, "sid"] = dup.loc[0, "sid"]
    with pytest.raises(TTDSError, match="same SID"):
        build_item_trie(dup, tok)
    bad = table.copy()
    bad.loc[0, "sid"] = "<a_0><b_0><z_9>"
    with pytest.raises(TTDSError, match="not in the tokenizer vocabulary"):
        build_item_trie(bad, tok)
    with pytest.raises(TTDSError, match="empty"):
        SidTrie({}, eos_id=0)


def test_sid_scoring_normalises_over_sid_tokens_only(setup):
    model, tok, table, trie = setup
    ranker = ConstrainedRanker(model, tok, trie, beams=20, scoring="sid")
    prompts = prompts_for(tok, table, HISTORIES)
    results = ranker.search(ranker.encode(prompts))
    for prompt, got in zip(prompts, results):
        want = exhaustive(model, tok, prompt, table, allowed_ids=trie.tokens())
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)
    assert type(model.get_output_embeddings()).__name__ == "Linear"  # full head restored
    with pytest.raises(TTDSError, match="eval.scoring"):
        ConstrainedRanker(model, tok, trie, beams=4, scoring="fast")
