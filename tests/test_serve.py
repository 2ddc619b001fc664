"""`ttds recommend` and the top-K cache on a tiny random LLaMA."""

from __future__ import annotations

import copy

import pandas as pd
import pytest

from test_evaluate import PARAMS, SEQUENCES, rec  # noqa: F401  (fixture)
from ttds_core import serve
from ttds_core.errors import TTDSError

SERVE_PARAMS = copy.deepcopy(PARAMS)
SERVE_PARAMS["eval"].update(beams=6, batch_size=4)
# the training-time user SID: the fresh profile needs a trained model folder (the last tests)
SERVE_PARAMS["serve"] = {"topk": 5, "mask_history": True, "max_users": None, "user_profile": "training"}
SERVE_PARAMS["model"] = {"path": "tiny", "num_layers": None}


@pytest.fixture
def dirs(tmp_path):
    processed, model, backbone = tmp_path / "processed", tmp_path / "model", tmp_path / "backbone"
    for d in (processed, model, backbone):
        d.mkdir()
    SEQUENCES.to_parquet(processed / "sequences.parquet")
    pd.DataFrame({"user_id": [0, 1, 2, 3], "original_id": ["A1", "B2", "C3", "7"]}).to_parquet(
        processed / "users.parquet")
    pd.DataFrame({"item_id": range(14), "original_id": [f"ASIN{i}" for i in range(14)],
                  "title": [f"Game number {i}" for i in range(14)]}).to_parquet(processed / "items.parquet")
    (model / "recommender.json").write_text('{"first_id": 0}')
    (model / "sid_rows.safetensors").write_bytes(b"rows-v1")
    (backbone / "config.json").write_text("{}")
    return {"processed_dir": processed, "model_dir": model, "backbone_dir": backbone,
            "out_dir": tmp_path / "serving"}


def test_precompute_then_recommend_answers_from_the_cache(rec, dirs, capsys):  # noqa: F811
    paths = {k: v for k, v in dirs.items() if k != "processed_dir"}
    meta = serve.run_precompute(SERVE_PARAMS, processed_dir=dirs["processed_dir"], rec=rec, **paths)
    table = pd.read_parquet(dirs["out_dir"] / "topk.parquet")
    assert meta["users"] == 4 and list(table.columns) == ["user_id", "items", "scores"]
    for user, items, scores in zip(table["user_id"], table["items"], table["scores"]):
        history = SEQUENCES.set_index("user_id").loc[user, "items"]
        assert len(items) == 5 and len(set(items)) == 5
        assert not set(items) & set(history)  # serving masks the FULL sequence
        assert list(scores) == sorted(scores, reverse=True)

    user_id, ranked, source = serve.recommend(SERVE_PARAMS, "C3", 3, rec=rec, **dirs)
    assert (user_id, source) == (2, "cache")
    assert [i for i, _ in ranked] == list(table.loc[table.user_id == 2, "items"].iloc[0][:3])
    fresh = serve.rank_users(SERVE_PARAMS, serve.serving_cases(SEQUENCES, 3, users=[2]), rec=rec)[0]
    assert [i for i, _ in fresh[:3]] == [i for i, _ in ranked]

    (dirs["model_dir"] / "sid_rows.safetensors").write_bytes(b"rows-v2")  # a retrained model
    _, again, source = serve.recommend(SERVE_PARAMS, "C3", 3, rec=rec, **dirs)
    assert source == "model" and [i for i, _ in again] == [i for i, _ in ranked]
    assert "another model" in capsys.readouterr().err


def test_recommend_cli_prints_titles(rec, dirs, capsys):  # noqa: F811
    serve.recommend_cli(SERVE_PARAMS, user="1", k=4, rec=rec, **dirs)
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    assert lines[0] == "top 4 for user 1 (model):" and len(lines) == 5
    assert all("Game number" in line and "ASIN" in line for line in lines[1:])
    assert "running the model" in out.err


def test_user_ids_resolve_original_first_then_index(dirs):
    users = pd.read_parquet(dirs["processed_dir"] / "users.parquet")
    assert serve.resolve_user(users, "B2", "users") == 1
    assert serve.resolve_user(users, "7", "users") == 3  # an original id wins over index 7
    assert serve.resolve_user(users, "2", "users") == 2
    with pytest.raises(TTDSError, match="user 'nobody': not found"):
        serve.resolve_user(users, "nobody", "users")


def test_recommend_errors_are_one_clear_line(rec, dirs):  # noqa: F811
    with pytest.raises(TTDSError, match=r"--k 7 is larger than 'eval.beams' = 6"):
        serve.recommend(SERVE_PARAMS, "A1", 7, rec=rec, **dirs)
    with pytest.raises(TTDSError, match="--k 0"):
        serve.recommend(SERVE_PARAMS, "A1", 0, rec=rec, **dirs)
    with pytest.raises(TTDSError, match="not found"):
        serve.recommend(SERVE_PARAMS, "ZZZ", 3, rec=rec, **dirs)
    missing = dict(dirs, model_dir=dirs["model_dir"].parent / "nomodel")
    with pytest.raises(TTDSError, match="no trained model"):
        serve.recommend(SERVE_PARAMS, "A1", 3, **missing)
    bad = copy.deepcopy(SERVE_PARAMS)
    bad["serve"]["topk"] = 9
    with pytest.raises(TTDSError, match="serve.topk"):
        serve.serve_settings(bad)


def test_partial_cache_serves_other_users_with_the_model(rec, dirs, capsys):  # noqa: F811
    params = copy.deepcopy(SERVE_PARAMS)
    params["serve"]["max_users"] = 2
    paths = {k: v for k, v in dirs.items() if k != "processed_dir"}
    meta = serve.run_precompute(params, processed_dir=dirs["processed_dir"], rec=rec, **paths)
    cached = pd.read_parquet(dirs["out_dir"] / "topk.parquet")["user_id"].tolist()
    assert meta["users"] == 2 and meta["users_total"] == 4
    other = next(u for u in range(4) if u not in cached)
    _, _, source = serve.recommend(params, str(other), 2, rec=rec, **dirs)
    assert source == "model" and "not in the top-K cache" in capsys.readouterr().err
    _, _, source = serve.recommend(params, str(cached[0]), 2, rec=rec, **dirs)
    assert source == "cache"


def test_popularity_prior_in_serving_counts_every_interaction_and_changes_the_cache_key(rec, dirs):  # noqa: F811
    import math

    from test_ranker import exhaustive

    params = copy.deepcopy(SERVE_PARAMS)
    params["eval"].update(popularity_prior=1.5, beams=20)
    case = serve.serving_cases(SEQUENCES, 3, users=[2])
    with pytest.raises(TTDSError, match="needs the users' sequences"):
        serve.rank_users(params, case, rec=rec)
    got = serve.rank_users(params, case, rec=rec, sequences=SEQUENCES)[0]
    counts = {i: 0 for i in range(14)}
    for items in SEQUENCES["items"]:       # serving: validation and test items are the past too
        for i in items:
            counts[i] += 1
    from ttds_core.ranker import PromptBuilder

    build = PromptBuilder(rec.tokenizer, rec.item_sids, rec.user_sids, 0)
    scored = exhaustive(rec.model, rec.tokenizer, build(2, case[0].history), rec.item_sids)
    want = sorted(((i, s + 1.5 * math.log(counts[i] + 1)) for i, s in scored if i not in case[0].seen),
                  key=lambda p: -p[1])
    assert [i for i, _ in got] == [i for i, _ in want[:5]]
    assert [s for _, s in got] == pytest.approx([s for _, s in want[:5]], abs=1e-4)
    paths = {k: v for k, v in dirs.items() if k not in ("processed_dir", "out_dir")}
    assert serve.fingerprint(params, **paths, processed_dir=dirs["processed_dir"]) != serve.fingerprint(
        SERVE_PARAMS, **paths, processed_dir=dirs["processed_dir"])


@pytest.fixture
def fresh(rec, dirs, monkeypatch):  # noqa: F811
    """serve.user_profile: fresh, with the derivation replaced by a table that swaps two users'
    SIDs (the real derivation: test_user_profile.py); `calls` counts the derivations."""
    from ttds_core import user_profile

    params = copy.deepcopy(SERVE_PARAMS)
    params["serve"]["user_profile"] = "fresh"
    params["data"].update(user_text_items=10, review_chars=200, user_text_chars=512)
    params["index"] = {"dynamic": False, "max_suffix": 8}
    table = rec.user_sids.copy()
    table.loc[[0, 1], "sid"] = table.loc[[1, 0], "sid"].to_numpy()
    calls = []

    def derive(texts, params_, rec_, model_dir, backbone_dir, purpose):
        calls.append(texts)
        assert purpose == "serving"
        return table

    monkeypatch.setattr(user_profile, "user_sids_of", derive)
    rows = [{"user_id": u, "item_id": i, "pos": k, "split": "test" if k == len(items) - 1 else
             "valid" if k == len(items) - 2 else "train", "timestamp": None, "review": None, "summary": None}
            for u, items in zip(SEQUENCES["user_id"], SEQUENCES["items"]) for k, i in enumerate(items)]
    pd.DataFrame(rows).astype({"timestamp": "Int64", "review": "string", "summary": "string"}).to_parquet(
        dirs["processed_dir"] / "interactions.parquet")
    return params, table, calls


def test_fresh_profile_serves_every_user_with_the_table_of_all_their_interactions(rec, dirs, fresh):  # noqa: F811
    params, table, calls = fresh
    paths = {k: v for k, v in dirs.items() if k != "processed_dir"}
    meta = serve.run_precompute(params, processed_dir=dirs["processed_dir"], rec=rec, **paths)
    assert len(calls) == 1 and meta["user_profile"] == "fresh" and meta["user_sids_changed"] == 0.5
    # the texts hold every split: each user's most recent item (the test item) comes first
    last = {u: items[-1] for u, items in zip(SEQUENCES["user_id"], SEQUENCES["items"])}
    assert all(text.startswith(f"Recent items: Game number {last[u]}") for u, text in enumerate(calls[0]))
    saved = pd.read_parquet(dirs["out_dir"] / "user_sids.parquet")
    assert saved["sid"].tolist() == table["sid"].tolist()
    cached = pd.read_parquet(dirs["out_dir"] / "topk.parquet")
    cases = serve.serving_cases(SEQUENCES, 3)
    want = serve.rank_users(params, cases, rec=rec, user_sids=table)
    assert [list(x) for x in cached["items"]] == [[i for i, _ in r] for r in want]
    assert want != serve.rank_users(params, cases, rec=rec)  # the swapped SIDs rank otherwise
    # a user outside a partial cache: the model with the cached table, not a new derivation
    partial = copy.deepcopy(params)
    partial["serve"]["max_users"] = 2
    serve.run_precompute(partial, processed_dir=dirs["processed_dir"], rec=rec, **paths)
    other = next(u for u in range(4) if u not in pd.read_parquet(dirs["out_dir"] / "topk.parquet")["user_id"].tolist())
    _, ranked, source = serve.recommend(partial, str(other), 5, rec=rec, **dirs)
    assert source == "model" and len(calls) == 2
    assert ranked == serve.rank_users(partial, serve.serving_cases(SEQUENCES, 3, users=[other]), rec=rec,
                                      user_sids=table)[0]
    # a stale cache: the table is derived again, for every user
    (dirs["model_dir"] / "sid_rows.safetensors").write_bytes(b"rows-v2")
    serve.recommend(partial, str(other), 5, rec=rec, **dirs)
    assert len(calls) == 3


def test_fresh_profile_is_part_of_the_cache_key(rec, dirs, fresh):  # noqa: F811
    params, _, _ = fresh
    key = serve.fingerprint(params, dirs["model_dir"], dirs["backbone_dir"], dirs["processed_dir"])
    assert key != serve.fingerprint(SERVE_PARAMS, dirs["model_dir"], dirs["backbone_dir"], dirs["processed_dir"])
    inter = pd.read_parquet(dirs["processed_dir"] / "interactions.parquet")
    inter.loc[0, "review"] = "a new review"  # the profile's text changes, and so may its SID
    inter.to_parquet(dirs["processed_dir"] / "interactions.parquet")
    assert key != serve.fingerprint(params, dirs["model_dir"], dirs["backbone_dir"], dirs["processed_dir"])
    bad = copy.deepcopy(params)
    bad["serve"]["user_profile"] = "stale"
    with pytest.raises(TTDSError, match="serve.user_profile"):
        serve.serve_settings(bad)


@pytest.mark.parametrize("key,value", [("data.user_text_items", 3), ("data.review_chars", 100),
                                       ("data.user_text_chars", 256), ("embed.batch_size", 4),
                                       ("model.max_text_tokens", 16),  # hashed twice: with model.* too
                                       ("index.dynamic", True),
                                       ("index.refresh_margin", 0.5), ("index.max_suffix", 4)])
def test_every_setting_of_the_fresh_derivation_is_part_of_the_cache_key(rec, dirs, fresh, key, value):  # noqa: F811
    params, _, _ = fresh
    params.setdefault("embed", {})["batch_size"] = 32
    params["index"]["refresh_margin"] = 0.2
    params["model"]["max_text_tokens"] = 64
    key_before = serve.fingerprint(params, dirs["model_dir"], dirs["backbone_dir"], dirs["processed_dir"])
    changed = copy.deepcopy(params)
    section, name = key.split(".")
    changed[section][name] = value
    assert key_before != serve.fingerprint(changed, dirs["model_dir"], dirs["backbone_dir"], dirs["processed_dir"])
