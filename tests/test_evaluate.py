"""The evaluate stage on a tiny random LLaMA: split logic, full ranking, masking, outputs."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from test_ranker import CODEBOOK, LENGTH, SUFFIXES, exhaustive, sid_table
from ttds_core import evaluate as ev
from ttds_core.errors import TTDSError
from ttds_core.metrics import metric_table
from ttds_core.tokens import sid_string, tower_vocabulary
from ttds_core.vocab import extend_vocabulary

SEQUENCES = pd.DataFrame({"user_id": [0, 1, 2, 3],
                          "items": [[0, 4, 9, 2, 7], [3, 1, 5], [13, 12, 11, 10, 2, 5, 6], [8, 9, 10, 11]]})

PARAMS = {"seed": 7, "eval": {"beams": 20, "batch_size": 3, "mask_history": False, "max_users": None,
                              "scoring": "full", "ks": [1, 5, 10]},
          "data": {"max_history": 3}, "train": {"template": 0},
          "tasks": {"seqrec_format": "prefix"}}  # the format of the exhaustive PromptBuilder below


@pytest.fixture
def rec(tiny_lm):
    model, tok = tiny_lm
    extend_vocabulary(model, tok, tower_vocabulary("item", LENGTH, CODEBOOK, SUFFIXES)
                      + tower_vocabulary("user", 2, CODEBOOK, SUFFIXES))
    torch.manual_seed(1)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
    users = pd.DataFrame({"user_id": [0, 1, 2, 3], "codes": [[0, 1], [1, 1], [2, 3], [3, 0]], "suffix": -1})
    users["sid"] = [sid_string("user", c) for c in users["codes"]]
    return SimpleNamespace(model=model, tokenizer=tok, item_sids=sid_table(), user_sids=users)


def test_leave_one_out_cases():
    valid = ev.eval_cases(SEQUENCES, "valid", max_history=3)
    test = ev.eval_cases(SEQUENCES, "test", max_history=3)
    assert (valid[2].history, valid[2].seen, valid[2].target) == ([11, 10, 2], [13, 12, 11, 10, 2], 5)
    assert (test[2].history, test[2].seen, test[2].target) == ([10, 2, 5], [13, 12, 11, 10, 2, 5], 6)
    assert (test[1].history, test[1].target) == ([3, 1], 5) and (valid[1].history, valid[1].target) == ([3], 1)


def test_ranks_match_exhaustive_scoring_masked_and_unmasked(rec):
    cfg = ev.eval_settings(PARAMS)
    metrics, ranks = ev.evaluate(rec, SEQUENCES, cfg)
    assert len(ranks) == 4 * 2 * 2 and set(ranks.columns) == {"user_id", "split", "target", "rank", "masked"}
    build = ev.PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, 0)
    for case in ev.eval_cases(SEQUENCES, "valid", 3) + ev.eval_cases(SEQUENCES, "test", 3):
        # exhaustive scores do not depend on masking: the masked order is the full order
        # without the user's history
        full = [i for i, _ in exhaustive(rec.model, rec.tokenizer, build(case.user_id, case.history),
                                         rec.item_sids)]
        for masked in (False, True):
            order = [i for i in full if not (masked and i in case.seen)]
            row = ranks[(ranks.user_id == case.user_id) & (ranks.split == case.split) & (ranks.masked == masked)]
            assert int(row["rank"].iloc[0]) == order.index(case.target) + 1
    for split in ("test", "valid"):
        for masked in (False, True):
            rows = ranks[(ranks.split == split) & (ranks.masked == masked)]
            key = split + ("_masked" if masked else "")
            assert metrics[key] == metric_table([int(r) for r in rows["rank"]], [1, 5, 10])
    assert metrics["users"] == 4 and metrics["beams"] == 20 and metrics["user_tower"] is True
    assert metrics["headline"] == "test" and metrics["user_sample"] == "all"


def test_masking_frees_slots_ranks_outside_beam_are_null_and_runs_repeat(rec):
    params = copy.deepcopy(PARAMS)
    params["eval"].update(beams=10, mask_history=True, batch_size=4)
    cfg = ev.eval_settings(params)
    metrics, ranks = ev.evaluate(rec, SEQUENCES, cfg)
    _, again = ev.evaluate(rec, SEQUENCES, cfg)
    pd.testing.assert_frame_equal(ranks, again)
    assert metrics["headline"] == "test_masked"
    assert ranks["rank"].isna().any()  # 14 items, 10 beams: some targets fall outside
    assert ranks["rank"].dropna().between(1, 10).all()
    # masking never ranks a target worse: history items above it are removed
    un = ranks[~ranks.masked].set_index(["user_id", "split"])["rank"]
    ma = ranks[ranks.masked].set_index(["user_id", "split"])["rank"]
    for key, r in un.dropna().items():
        assert not pd.isna(ma[key]) and ma[key] <= r


def test_seeded_user_sample_is_recorded_and_stable():
    a = ev.select_users(SEQUENCES, 2, seed=3)
    b = ev.select_users(SEQUENCES, 2, seed=3)
    assert a["user_id"].tolist() == b["user_id"].tolist() and len(a) == 2
    assert ev.select_users(SEQUENCES, None, seed=3)["user_id"].tolist() == [0, 1, 2, 3]


def test_bad_params_and_inputs_give_one_line_errors(rec):
    params = copy.deepcopy(PARAMS)
    params["eval"]["beams"] = 5
    with pytest.raises(TTDSError, match="eval.beams"):
        ev.eval_settings(params)
    params["eval"].update(beams=20, ks=[0, 5])
    with pytest.raises(TTDSError, match="eval.ks"):
        ev.eval_settings(params)
    short = pd.DataFrame({"user_id": [0], "items": [[1, 2]]})
    with pytest.raises(TTDSError, match="fewer than 3 items"):
        ev.select_users(short, None, 0)
    unknown = pd.DataFrame({"user_id": [0], "items": [[1, 2, 99]]})
    with pytest.raises(TTDSError, match="item 99 has no SID"):
        ev.evaluate(rec, unknown, ev.eval_settings(PARAMS))


def test_run_writes_the_contract_files(rec, tmp_path, monkeypatch):
    import ttds_core.recommender as recommender

    processed, model_dir = tmp_path / "processed", tmp_path / "model"
    processed.mkdir()
    model_dir.mkdir()
    (model_dir / "recommender.json").write_text("{}")
    SEQUENCES.to_parquet(processed / "sequences.parquet")
    monkeypatch.setattr(recommender, "load_recommender", lambda params, **kw: rec)
    params = copy.deepcopy(PARAMS)
    params["eval"].update(max_users=2, user_profile="training")  # the fresh profile: test_user_profile.py
    ev.run(params, processed_dir=processed, model_dir=model_dir, out_dir=tmp_path / "eval",
           metrics_path=tmp_path / "eval.json")
    metrics = json.loads((tmp_path / "eval.json").read_text())
    for key in ("test", "valid", "test_masked", "valid_masked"):
        assert set(metrics[key]) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}
    ranks = pd.read_parquet(tmp_path / "eval" / "ranks.parquet")
    assert str(ranks["rank"].dtype) == "Int64" and ranks["masked"].dtype == bool
    with pytest.raises(TTDSError, match="no trained model"):
        ev.run(PARAMS, processed_dir=processed, model_dir=tmp_path / "missing")


def test_popularity_reference_by_hand():
    # training parts: [0, 4, 9], [3], [13, 12, 11, 10, 2], [8, 9] -> item 9 twice, 9 items once
    # order: 9 | 0 2 3 4 8 10 11 12 13 | 1 5 6 7 (ties by lower id)
    cases = [ev.Case(0, "test", [], [0, 4, 9, 2], 7), ev.Case(1, "valid", [], [3], 1),
             ev.Case(3, "test", [], [8, 9, 10], 11)]
    ranks = ev.popularity_ranks(SEQUENCES, cases, 14)
    assert ranks[False] == [14, 11, 8]
    assert ranks[True] == [10, 10, 5]  # history items ranked above the target are removed


def test_popularity_prior_ranks_by_model_score_plus_lambda_log_training_count(rec):
    """eval.popularity_prior: ranks follow the exhaustive score + lambda * log(n + 1), n counted
    over the training parts only (a validation or test target adds nothing)."""
    import math

    params = copy.deepcopy(PARAMS)
    params["eval"]["popularity_prior"] = 2.0
    cfg = ev.eval_settings(params)
    assert cfg.popularity_prior == 2.0 and ev.eval_settings(PARAMS).popularity_prior == 0.0
    metrics, ranks = ev.evaluate(rec, SEQUENCES, cfg)
    assert metrics["popularity_prior"] == 2.0
    counts = {i: 0 for i in range(14)}
    for items in SEQUENCES["items"]:
        for i in items[:-2]:
            counts[i] += 1
    build = ev.PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, 0)
    for case in ev.eval_cases(SEQUENCES, "valid", 3) + ev.eval_cases(SEQUENCES, "test", 3):
        scored = exhaustive(rec.model, rec.tokenizer, build(case.user_id, case.history), rec.item_sids)
        order = [i for i, _ in sorted(((i, s + 2.0 * math.log(counts[i] + 1)) for i, s in scored),
                                      key=lambda p: -p[1])]
        row = ranks[(ranks.user_id == case.user_id) & (ranks.split == case.split) & ~ranks.masked]
        assert int(row["rank"].iloc[0]) == order.index(case.target) + 1
    params["eval"]["popularity_prior"] = -0.5
    with pytest.raises(TTDSError, match="eval.popularity_prior"):
        ev.eval_settings(params)
