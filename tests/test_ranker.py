"""The ranking engine (trie tables + shared-prefix beam search) against exhaustive scoring
on a tiny random LLaMA."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from ttds_core.ranker import Ranker, SidTables, build_tables, item_token_ids
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
    return model, tok, table, build_tables(table, tok)


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


@torch.no_grad()
def exhaustive_trie(model, tok, prompt, table, exclude=()):
    """Every item the user may get, scored as `scoring="trie"` defines it: at each step the
    log-softmax over only the continuations some non-excluded item's SID + EOS takes there."""
    items = [int(i) for i in table["item_id"] if int(i) not in exclude]
    sids = dict(zip(table["item_id"].astype(int), table["sid"]))
    resps = {i: encode_response(tok, sids[i]) for i in items}
    scores = []
    for i in items:
        r = resps[i]
        logits = model(input_ids=torch.tensor([prompt + r])).logits[0].float()
        total = 0.0
        for t, tok_id in enumerate(r):
            allowed = sorted({o[t] for o in resps.values() if len(o) > t and o[:t] == r[:t]})
            logp = torch.log_softmax(logits[len(prompt) - 1 + t, allowed], -1)
            total += float(logp[allowed.index(tok_id)])
        scores.append((i, total))
    return sorted(scores, key=lambda p: -p[1])


HISTORIES = [[0, 4, 9], [3, 1], [13, 12, 11, 10, 2, 5]]


def ranked_items(results):
    return [[i for i, _ in r] for r in results]


@pytest.mark.parametrize("scoring", ["full", "sid"])
def test_exhaustive_beam_width_equals_exhaustive_scoring(setup, scoring):
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=20, scoring=scoring)  # >= nodes at every depth: exact
    prompts = prompts_for(tok, table, HISTORIES)
    batch = ranker.encode(prompts)
    plain, masked = ranker.search(batch), ranker.search(batch, HISTORIES)
    allowed = tables.tokens if scoring == "sid" else None
    for prompt, hist, got, got_masked in zip(prompts, HISTORIES, plain, masked):
        want = exhaustive(model, tok, prompt, table, allowed_ids=allowed)
        assert [i for i, _ in got] == [i for i, _ in want]       # all 14 items, suffixed SIDs too
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)
        want_masked = [p for p in want if p[0] not in hist]
        assert [i for i, _ in got_masked] == [i for i, _ in want_masked]
        assert [s for _, s in got_masked] == pytest.approx([s for _, s in want_masked], abs=1e-4)


def test_trie_scoring_renormalises_over_the_allowed_continuations(setup):
    """`scoring="trie"` at an exhaustive beam width: every item scored by the log-softmax over
    the continuations the user's trie allows at each step, masked (history items excluded,
    so their siblings take their mass) and unmasked."""
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=20, scoring="trie")
    prompts = prompts_for(tok, table, HISTORIES)
    batch = ranker.encode(prompts)
    plain, masked = ranker.search(batch), ranker.search(batch, HISTORIES)
    full = Ranker(model, tok, tables, beams=20, scoring="full").search(batch, HISTORIES)
    for prompt, hist, got, got_masked, got_full in zip(prompts, HISTORIES, plain, masked, full):
        want = exhaustive_trie(model, tok, prompt, table)
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)
        want_masked = exhaustive_trie(model, tok, prompt, table, exclude=hist)
        assert [i for i, _ in got_masked] == [i for i, _ in want_masked]
        assert [s for _, s in got_masked] == pytest.approx([s for _, s in want_masked], abs=1e-4)
        assert math.log(sum(math.exp(s) for _, s in got_masked)) == pytest.approx(0.0, abs=1e-4)  # a distribution
        assert sum(math.exp(s) for _, s in got_full) < 0.99   # full scoring loses the excluded and invalid mass


@pytest.mark.parametrize("strength", [0.5, 3.0])
def test_popularity_prior_adds_lambda_log_weight_to_every_item(setup, strength):
    """With an exhaustive beam the prior ranks by log P(SID) + lambda * log w(item), masked
    and unmasked, the suffixed SIDs too."""
    model, tok, table, tables = setup
    weights = {i: float(1 + (7 * i) % 11) for i in table["item_id"].astype(int)}
    ranker = Ranker(model, tok, tables, beams=20, prior=tables.prior(weights, strength))
    prompts = prompts_for(tok, table, HISTORIES)
    batch = ranker.encode(prompts)
    plain, masked = ranker.search(batch), ranker.search(batch, HISTORIES)
    for prompt, hist, got, got_masked in zip(prompts, HISTORIES, plain, masked):
        want = sorted(((i, s + strength * math.log(weights[i])) for i, s in exhaustive(model, tok, prompt, table)),
                      key=lambda p: -p[1])
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)
        want_masked = [p for p in want if p[0] not in hist]
        assert [i for i, _ in got_masked] == [i for i, _ in want_masked]


def test_popularity_prior_zero_is_no_prior_and_bad_weights_are_one_line(setup):
    model, tok, table, tables = setup
    assert tables.prior({i: 1.0 for i in range(14)}, 0.0) is None
    with pytest.raises(TTDSError, match="no weight for item 13"):
        tables.prior({i: 1.0 for i in range(13)}, 1.0)
    with pytest.raises(TTDSError, match="positive finite"):
        tables.prior([0.0] * 14, 1.0)
    with pytest.raises(TTDSError, match="expected a finite number >= 0"):
        tables.prior([1.0] * 14, -1.0)


@pytest.mark.parametrize("beta", [0.7, 5.0])
def test_copy_penalty_subtracts_beta_from_items_under_a_history_first_code(setup, beta):
    """With an exhaustive beam the copy penalty ranks by log P(SID) - beta * [the item's first
    code is that of a history item], with the popularity prior too, masked and unmasked."""
    model, tok, table, tables = setup
    weights = {i: float(1 + (5 * i) % 7) for i in table["item_id"].astype(int)}
    ranker = Ranker(model, tok, tables, beams=20, prior=tables.prior(weights, 0.5), copy_penalty=beta)
    prompts = prompts_for(tok, table, HISTORIES)
    batch = ranker.encode(prompts)
    plain, masked = ranker.search(batch, history=HISTORIES), ranker.search(batch, HISTORIES, history=HISTORIES)
    for prompt, hist, got, got_masked in zip(prompts, HISTORIES, plain, masked):
        firsts = {CODES[h][0] for h in hist}
        want = sorted(((i, s + 0.5 * math.log(weights[i]) - beta * (CODES[i][0] in firsts))
                       for i, s in exhaustive(model, tok, prompt, table)), key=lambda p: -p[1])
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-4)
        want_masked = [p for p in want if p[0] not in hist]
        assert [i for i, _ in got_masked] == [i for i, _ in want_masked]
        assert [s for _, s in got_masked] == pytest.approx([s for _, s in want_masked], abs=1e-4)
    if beta == 5.0:   # strong enough to move an item of a copied first code below the others
        assert ranked_items(plain) != ranked_items(Ranker(model, tok, tables, beams=20,
                                                          prior=tables.prior(weights, 0.5)).search(batch))


def test_copy_penalty_zero_is_the_model_and_bad_values_are_one_line(setup):
    model, tok, table, tables = setup
    batch = Ranker(model, tok, tables, beams=20).encode(prompts_for(tok, table, HISTORIES))
    assert Ranker(model, tok, tables, beams=20, copy_penalty=0.0).search(batch, history=HISTORIES) == \
        Ranker(model, tok, tables, beams=20).search(batch)
    for bad in (-0.5, float("nan"), "x"):
        with pytest.raises(TTDSError, match="'eval.copy_penalty' = .*expected a finite number >= 0"):
            Ranker(model, tok, tables, beams=20, copy_penalty=bad)
    with pytest.raises(ValueError, match="one history per prompt"):
        Ranker(model, tok, tables, beams=20, copy_penalty=1.0).search(batch)


def test_small_beam_returns_distinct_real_items_deterministically(setup):
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=5)
    batch = ranker.encode(prompts_for(tok, table, HISTORIES))
    first, again = ranker.search(batch, HISTORIES), ranker.search(batch, HISTORIES)
    assert first == again  # the prefilled cache is shared, never consumed
    for hist, got in zip(HISTORIES, first):
        items = [i for i, _ in got]
        assert len(items) == 5 and len(set(items)) == 5
        assert set(items) <= set(table["item_id"]) and not set(items) & set(hist)
        scores = [s for _, s in got]
        assert scores == sorted(scores, reverse=True)


def test_fewer_items_left_than_beams(setup):
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=20)
    batch = ranker.encode(prompts_for(tok, table, [[0]]))
    got = ranker.search(batch, [list(range(12))])[0]  # 2 of 14 items left
    assert sorted(i for i, _ in got) == [12, 13]


def test_batched_padding_matches_single_prompts(setup):
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=6)
    prompts = prompts_for(tok, table, HISTORIES)
    batched = ranker.search(ranker.encode(prompts))
    for prompt, got in zip(prompts, batched):
        single = ranker.search(ranker.encode([prompt]))[0]
        assert [i for i, _ in got] == [i for i, _ in single]
        assert [s for _, s in got] == pytest.approx([s for _, s in single], abs=1e-4)


def test_sparse_tables_rank_like_dense_ones(setup):
    model, tok, table, tables = setup
    sparse = SidTables(item_token_ids(table, tok), tok.eos_token_id, dense_limit=0)
    assert all(t is None for t in sparse._dense)
    prompts = prompts_for(tok, table, HISTORIES)
    for beams in (3, 20):
        a, b = Ranker(model, tok, tables, beams=beams), Ranker(model, tok, sparse, beams=beams)
        assert a.search(a.encode(prompts), HISTORIES) == b.search(b.encode(prompts), HISTORIES)


def test_random_catalogue_matches_exhaustive_top_k(tiny_lm):
    """A denser random catalogue (60 items, depth 3 over 5 codes + suffixes): with beams at
    least the widest depth, the top 10 equals exhaustive scoring's top 10, masked too."""
    model, tok = tiny_lm
    extend_vocabulary(model, tok, tower_vocabulary("item", 3, 5, 8))
    torch.manual_seed(3)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    gen = torch.Generator().manual_seed(0)
    codes = [tuple(int(c) for c in torch.randint(0, 5, (3,), generator=gen)) for _ in range(60)]
    table = sid_table(codes)
    tables = build_tables(table, tok)
    ranker = Ranker(model, tok, tables, beams=max(tables.n_nodes))
    hists = [[0, 1, 2], [5, 59, 30, 31], [7]]
    prompts = prompts_for(tok, table, hists)
    batch = ranker.encode(prompts)
    for masked in (False, True):
        results = ranker.search(batch, hists if masked else None)
        for prompt, hist, got in zip(prompts, hists, results):
            want = [p for p in exhaustive(model, tok, prompt, table) if not (masked and p[0] in hist)]
            assert [i for i, _ in got[:10]] == [i for i, _ in want[:10]]
            assert [s for _, s in got[:10]] == pytest.approx([s for _, s in want[:10]], abs=1e-4)


def test_lora_wrapped_model_ranks_like_its_merged_copy(setup):
    import copy

    from peft import LoraConfig, get_peft_model

    model, tok, table, tables = setup
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False)).eval()
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    prompts = prompts_for(tok, table, HISTORIES)
    a, b = Ranker(peft_model, tok, tables, beams=20), Ranker(merged, tok, tables, beams=20)
    got, want = a.search(a.encode(prompts)), b.search(b.encode(prompts))
    assert ranked_items(got) == ranked_items(want)
    want_exhaustive = exhaustive(merged, tok, prompts[0], table)
    assert ranked_items(got)[0] == [i for i, _ in want_exhaustive]


def test_tables_follow_every_sid_and_close_excluded_branches(setup):
    _, tok, table, tables = setup
    seqs = item_token_ids(table, tok)
    assert len(seqs[4]) == LENGTH + 1 and len(seqs[0]) == LENGTH  # suffixed vs plain SID
    for item, seq in seqs.items():
        node = torch.tensor(0)
        for d, token in enumerate(seq):
            col = tables.cols[d].tolist().index(token)
            node = tables.child(d, node)[col]
            assert int(node) >= 0
        assert int(tables.item_end[len(seq)][node]) == item
    # (1, 2, 3) holds items 4, 5, 6 only: excluding all three closes that node for that prompt only
    blocked = tables.blocked([[4, 5, 6], [4], []])
    node_123 = int(tables.item_nodes[4, 3])
    assert blocked.closed[3][:, node_123].tolist() == [True, False, False]
    assert blocked.ends[4][:, int(tables.item_nodes[4, 4])].tolist() == [True, True, False]
    assert bool(blocked.closed[2][0, int(tables.item_nodes[4, 2])])       # (1, 2): items 4, 5, 6 only
    assert not bool(blocked.closed[1][0, int(tables.item_nodes[4, 1])])   # (1): item 7 is left
    # (0, 2) is no prefix of any SID
    assert int(tables.child(1, tables.item_nodes[0, 1])[tables.cols[1].tolist().index(seqs[13][1])]) == -1


def test_duplicate_sids_and_unknown_tokens_are_rejected(setup):
    _, tok, table, _ = setup
    dup = table.copy()
    dup.loc[1, "sid"] = dup.loc[0, "sid"]
    with pytest.raises(TTDSError, match="same SID"):
        build_tables(dup, tok)
    bad = table.copy()
    bad.loc[0, "sid"] = "<a_0><b_0><z_9>"
    with pytest.raises(TTDSError, match="not in the tokenizer vocabulary"):
        build_tables(bad, tok)
    with pytest.raises(TTDSError, match="empty"):
        SidTables({}, eos_id=0)


def test_bad_settings_are_one_line_errors(setup):
    model, tok, _, tables = setup
    with pytest.raises(TTDSError, match="eval.scoring"):
        Ranker(model, tok, tables, beams=4, scoring="fast")
    with pytest.raises(TTDSError, match="eval.beams"):
        Ranker(model, tok, tables, beams=0)
    assert type(model.get_output_embeddings()).__name__ == "Linear"
    assert model.config._attn_implementation != "ttds_shared_prefix"  # restored after every step


def test_one_beam_is_greedy_decoding(setup):
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=1)
    prompts = prompts_for(tok, table, HISTORIES)
    got = ranker.search(ranker.encode(prompts))
    for prompt, ranked in zip(prompts, got):
        assert len(ranked) == 1
        seq, ids = [], prompt
        with torch.no_grad():  # follow the arg-max of the allowed tokens, as greedy decoding would
            node = torch.tensor(0)
            for d in range(tables.depth + 1):
                logits = torch.log_softmax(model(input_ids=torch.tensor([ids + seq])).logits[0, -1].float(), -1)
                end = int(tables.item_end[d][node]) if d > 0 else -1
                options = {}
                if d < tables.depth:
                    kids = tables.child(d, node)
                    options = {int(t): int(c) for t, c in zip(tables.cols[d], kids) if int(c) >= 0}
                if end >= 0:
                    options[tok.eos_token_id] = -1
                best = max(options, key=lambda t: float(logits[t]))
                if best == tok.eos_token_id:
                    break
                seq.append(best)
                node = torch.tensor(options[best])
        assert ranked[0][0] == end


def test_attention_settings_are_restored_when_a_step_fails(setup, monkeypatch):
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=4)
    batch = ranker.encode(prompts_for(tok, table, HISTORIES))
    before = model.config._attn_implementation

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ranker.decoder.layers[0].mlp, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        ranker.search(batch)
    assert model.config._attn_implementation == before
    assert all(layer.self_attn.config._attn_implementation == before for layer in model.model.layers)


def test_a_layer_that_bypasses_the_shared_prefix_is_refused(setup, monkeypatch):
    """If some layer attended without the prompt (an architecture the engine does not
    cover), the beams would be scored without their history: refuse, never rank."""
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=4)
    batch = ranker.encode(prompts_for(tok, table, HISTORIES))
    monkeypatch.setattr(ranker, "_configs", [model.config])  # layer configs left on sdpa
    layer_cfg = model.model.layers[1].self_attn
    import copy
    monkeypatch.setattr(layer_cfg, "config", copy.copy(model.config))
    with pytest.raises(TTDSError, match="not supported"):
        ranker.search(batch)


@torch.no_grad()
def test_first_log_probs_are_the_models_first_step(setup):
    model, tok, table, tables = setup
    ranker = Ranker(model, tok, tables, beams=4, scoring="full")
    prompts = prompts_for(tok, table, HISTORIES)
    got = ranker.first_log_probs(ranker.encode(prompts))
    for row, prompt in zip(got, prompts):
        want = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)[tables.cols[0]]
        assert row.tolist() == pytest.approx(want.tolist(), abs=1e-4)
