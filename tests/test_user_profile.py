"""The test-time user profile: the user text through a chosen split, the user SIDs re-derived
from it as the model's own table was, and evaluate ranking test (only test) with them."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from test_evaluate import PARAMS, SEQUENCES, rec  # noqa: F401  (the fixture)
from ttds_core import evaluate as ev
from ttds_core import user_profile as up
from ttds_core.embedding import embed_texts
from ttds_core.errors import TTDSError
from ttds_core.quantize import build_quantizer
from ttds_core.sids import resolve_collisions, sid_table
from ttds_core.user_text import UserTextRule, user_texts

RULE = UserTextRule(items=10, review_chars=200, text_chars=512)
TITLES = np.array(["Mario", "Zelda", "Halo", "Doom", "Tetris"])


def dynamic(params: dict, on: bool) -> dict:
    """`params` with `index.dynamic` set: the derivation reads it from the params, as evaluate's does."""
    return {**params, "index": {**params["index"], "dynamic": on}}


def interactions() -> pd.DataFrame:
    """Two users; user 0 reviews every item, user 1 none; pos order, last = test."""
    rows = []
    for user, items in ((0, [0, 1, 2, 3]), (1, [4, 2, 0])):
        for pos, item in enumerate(items):
            split = "test" if pos == len(items) - 1 else "valid" if pos == len(items) - 2 else "train"
            rows.append({"user_id": user, "item_id": item, "pos": pos, "split": split,
                         "review": f"review of {TITLES[item]}" if user == 0 else None, "summary": None})
    return pd.DataFrame(rows).astype({"review": "string", "summary": "string"})


def test_a_validation_row_not_known_to_precede_the_test_target_is_withheld(tmp_path):
    inter = interactions()
    inter["timestamp"] = pd.array([1, 2, 3, 4, 1, 5, 5], dtype="Int64")  # user 1: validation and test tied
    inter.loc[2, "review"] = inter.loc[3, "review"]  # user 0: one review over two variants (valid = test)
    titles = pd.DataFrame({"item_id": range(len(TITLES)), "title": TITLES})
    inter.to_parquet(tmp_path / "interactions.parquet")
    titles.to_parquet(tmp_path / "items.parquet")
    params = {"data": {"user_text_items": 10, "review_chars": 200, "user_text_chars": 512}}
    texts, withheld = up.test_time_texts(tmp_path, params)
    assert withheld == 2 and texts == user_texts(inter.sort_values(["user_id", "pos"]), TITLES, RULE)[0]
    assert not any("Doom" in t for t in texts)
    inter["timestamp"] = pd.array([1, 2, 3, 4, 1, 5, 6], dtype="Int64")
    inter.loc[2, "review"] = "review of Halo"
    inter.to_parquet(tmp_path / "interactions.parquet")
    texts, withheld = up.test_time_texts(tmp_path, params)
    assert withheld == 0 and texts == user_texts(inter, TITLES, RULE, up.TEST_TIME_SPLITS)[0]


def test_texts_through_validation_add_the_validation_row_and_never_the_test_row():
    inter = interactions()
    train, _ = user_texts(inter, TITLES, RULE)
    fresh, with_reviews = user_texts(inter, TITLES, RULE, up.TEST_TIME_SPLITS)
    assert train == ["Reviews: review of Zelda | review of Mario", "Recent items: Tetris"]
    assert fresh == ["Reviews: review of Halo | review of Zelda | review of Mario", "Recent items: Halo; Tetris"]
    assert with_reviews == 1
    assert not any("Doom" in t for t in train + fresh)  # user 0's test item and its review
    assert not any("Mario" in t for t in (train[1], fresh[1]))  # user 1's test item


def test_serving_texts_hold_every_interaction_the_test_row_too(tmp_path):
    inter = interactions()
    inter["timestamp"] = pd.array([1, 2, 3, 3, 1, 5, 5], dtype="Int64")  # ties withhold nothing at serving time
    inter.to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": range(len(TITLES)), "title": TITLES}).to_parquet(tmp_path / "items.parquet")
    texts = up.serving_texts(tmp_path, {"data": {"user_text_items": 10, "review_chars": 200, "user_text_chars": 512}})
    assert texts == ["Reviews: review of Doom | review of Halo | review of Zelda | review of Mario",
                     "Recent items: Mario; Halo; Tetris"]


@pytest.fixture
def tower(tiny_lm):
    """A tiny backbone, four user texts, an RQ quantizer fitted on their embeddings and the
    user table it gives (as warmup + build_sids make it)."""
    model, tok = tiny_lm
    tok.padding_side = "left"
    texts = ["great fun Mario", "Zelda controller", "kids love it", "headset cable charger"]
    x = embed_texts(model, tok, texts, batch_size=32, max_tokens=64, progress=False)
    torch.manual_seed(0)
    q = build_quantizer({"kind": "rq", "in_dim": x.shape[1], "length": 2, "codebook_size": 4, "code_dim": 8,
                         "widths": [x.shape[1], 16, 8], "seed": 0})
    q.fit_normalisation(torch.as_tensor(x))
    q.init_kmeans(torch.as_tensor(x), sample=len(x), iters=10, seed=0)
    q.eval()
    ids = np.arange(len(texts))
    codes = q.codes(torch.as_tensor(x), ids=ids).numpy()
    own = sid_table(ids, codes, resolve_collisions(codes), "user")
    params = {"embed": {"batch_size": 3}, "model": {"max_text_tokens": 64},
              "index": {"max_suffix": 8, "refresh_margin": 0.2}}
    return model, tok, texts, q, own, params


def test_static_index_rederives_the_models_own_table_from_the_same_texts(tower):
    model, tok, texts, q, own, params = tower
    again = up.fresh_user_sids(texts, own.sample(frac=1.0, random_state=0), q, model, tok, dynamic(params, False))
    pd.testing.assert_frame_equal(again.reset_index(drop=True), own.reset_index(drop=True))
    # another text gives that user the codes of its own embedding, everyone else keeps theirs
    changed = ["Super Mario Bros. Nintendo Switch"] + texts[1:]
    new = up.fresh_user_sids(changed, own, q, model, tok, dynamic(params, False))
    x = embed_texts(model, tok, changed, batch_size=32, max_tokens=64, progress=False)
    expect = q.codes(torch.as_tensor(x), ids=np.arange(4)).numpy()
    assert [list(c) for c in new["codes"]] == expect.tolist()
    assert new["codes"].iloc[1:].tolist() == own["codes"].iloc[1:].tolist()


def test_dynamic_index_keeps_codes_within_the_refresh_margin(tower):
    model, tok, texts, q, own, params = tower
    changed = ["Super Mario Bros. Nintendo Switch"] + texts[1:]
    # margin .999: a new code must be 1,000 times closer, so nobody's SID moves (hysteresis)
    sticky_params = dynamic({**params, "index": {"max_suffix": 8, "refresh_margin": 0.999}}, True)
    sticky = up.fresh_user_sids(changed, own, q, model, tok, sticky_params)
    assert sticky["sid"].tolist() == own["sid"].tolist()


def test_a_user_table_of_other_users_is_one_line(tower):
    model, tok, texts, q, own, params = tower
    with pytest.raises(TTDSError, match="does not match the 3 users of the processed data"):
        up.fresh_user_sids(texts[:3], own, q, model, tok, dynamic(params, False))


def test_a_collision_set_over_max_suffix_stops_a_static_index_and_keeps_a_dynamic_table(tower, caplog):
    model, tok, texts, q, own, params = tower
    few = {**params, "index": {"max_suffix": 2, "refresh_margin": 0.0}}
    with pytest.raises(TTDSError, match="user profile at test time: .*max_suffix"):
        up.fresh_user_sids([texts[0]] * 4, own, q, model, tok, dynamic(few, False))
    kept = up.fresh_user_sids([texts[0]] * 4, own, q, model, tok, dynamic(few, True))  # as a refresh does
    assert kept["sid"].tolist() == own["sid"].tolist() and "SIDs kept" in caplog.text
    with pytest.raises(TTDSError, match="user profile at serving: .*max_suffix"):  # serving names itself
        up.fresh_user_sids([texts[0]] * 4, own, q, model, tok, dynamic(few, False), purpose="serving")


def test_evaluate_ranks_test_with_the_test_table_and_validation_with_the_models_own(rec):  # noqa: F811
    cfg = ev.eval_settings(PARAMS)
    _, base = ev.evaluate(rec, SEQUENCES, cfg)
    other = rec.user_sids.copy()
    other["sid"] = other["sid"].tolist()[::-1]  # every user gets another user's SID
    metrics, ranks = ev.evaluate(rec, SEQUENCES, cfg, test_user_sids=other)
    valid = ranks["split"] == "valid"
    pd.testing.assert_frame_equal(ranks[valid].reset_index(drop=True), base[base["split"] == "valid"].reset_index(drop=True))
    # test ranks are those of the model's own table renamed: the same as ranking with `other` as the model's table
    swapped = copy.copy(rec)
    swapped.user_sids = other
    _, expect = ev.evaluate(swapped, SEQUENCES, cfg)
    pd.testing.assert_frame_equal(ranks[~valid].reset_index(drop=True),
                                  expect[expect["split"] == "test"].reset_index(drop=True))
    assert metrics["test_user_sids_changed"] == 1.0
    assert ev.evaluate(rec, SEQUENCES, cfg)[0]["test_user_sids_changed"] == 0.0
    # the share counts the ranked users only
    one_changed = rec.user_sids.copy()
    one_changed.loc[0, "sid"] = one_changed.loc[1, "sid"]
    sample = copy.deepcopy(PARAMS)
    sample["eval"]["max_users"] = 2
    picked = ev.select_users(SEQUENCES, 2, PARAMS["seed"])["user_id"].tolist()
    share = ev.evaluate(rec, SEQUENCES, ev.eval_settings(sample), test_user_sids=one_changed)[0]["test_user_sids_changed"]
    assert share == (0.5 if 0 in picked else 0.0)


def test_training_profile_and_no_user_tower_keep_the_models_table(rec):  # noqa: F811
    params = copy.deepcopy(PARAMS)
    table, withheld = up.test_user_sids("training", params, rec, "missing", "missing", "missing")
    assert table is rec.user_sids and withheld == 0
    no_tower = copy.copy(rec)
    no_tower.user_sids = None
    assert up.test_user_sids("fresh", params, no_tower, "missing", "missing", "missing") == (None, 0)
    params["eval"]["user_profile"] = "stale"
    with pytest.raises(TTDSError, match="eval.user_profile"):
        ev.eval_settings(params)


@pytest.mark.parametrize("is_dynamic, refresh_embeddings, expected", [
    (False, "llm", "backbone"), (True, "llm", "trained LLM"), (True, "backbone", "backbone")])
def test_the_profile_embeds_with_what_the_refreshes_embedded_with(monkeypatch, is_dynamic, refresh_embeddings,
                                                                   expected):
    from types import SimpleNamespace

    from ttds_core import backbone, recommender

    monkeypatch.setattr(recommender, "load_final_quantizers", lambda model_dir: {"user": "quantizer"})
    monkeypatch.setattr(backbone, "load_backbone", lambda params, device, backbone_dir: ("backbone", "tokenizer"))
    seen = []
    monkeypatch.setattr(up, "fresh_user_sids", lambda texts, own, quantizer, embedder, tokenizer, params, purpose:
                        seen.append(embedder))
    params = {"index": {"dynamic": is_dynamic, "refresh_embeddings": refresh_embeddings, "max_suffix": 8}}
    rec = SimpleNamespace(model="trained LLM", tokenizer="tokenizer", user_sids=None, device="cpu")
    up.user_sids_of(["a user text"], params, rec, "model", "backbone")
    assert seen == [expected]


def test_a_serving_cache_hit_path_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, ttds_core.serve; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
