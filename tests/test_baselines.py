"""Baselines: same split as `evaluate`, full ranking, learning on a sequential pattern."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ttds_core.baselines import model_config, run
from ttds_core.baselines.data import load_split, training_windows
from ttds_core.baselines.loop import rank_targets
from ttds_core.errors import TTDSError
from ttds_core.metrics import metric_table

N_ITEMS = 40


def _params(**overrides) -> dict:
    base = {"epochs": 6, "batch_size": 32, "eval_batch_size": 128, "lr": 1.0e-2, "weight_decay": 0.0,
            "hidden": 32, "layers": 1, "heads": 2, "dropout": 0.1, "patience": 3, "mask_prob": 0.2,
            "device": "cpu", "threads": 1}
    base.update(overrides)
    return {"seed": 7, "data": {"max_history": 8}, "eval": {"mask_history": False}, "baselines": base}


def _write_split(root, users: int = 160, seed: int = 0):
    """Each user walks i, i+1, i+2, ... from a random start: the next item is obvious."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        length = int(rng.integers(5, 10))
        start = int(rng.integers(0, N_ITEMS - length))
        rows.append({"user_id": u, "items": list(range(start, start + length))})
    processed = root / "processed"
    processed.mkdir(parents=True)
    seqs = pd.DataFrame(rows)
    seqs.to_parquet(processed / "sequences.parquet", index=False)
    pd.DataFrame({"item_id": np.arange(N_ITEMS)}).to_parquet(processed / "items.parquet", index=False)
    return processed, seqs


def _run(tmp_path, processed, name, params):
    return run(params, name, processed_dir=processed, metrics_dir=tmp_path / "metrics",
               out_dir=tmp_path / "out")


def test_rank_rule_and_masking():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.8, 0.8, 0.3]])
    targets = torch.tensor([2, 1])
    # strictly higher only: the tie with item 1 / item 2 does not push the target down
    assert rank_targets(scores, targets, None).tolist() == [2, 1]
    # masking removes history items (item 0 for user 0), never the target itself
    masked = rank_targets(scores, targets, [np.array([0]), np.array([1, 3])])
    assert masked.tolist() == [1, 1]


def test_training_windows_cover_train_items_once_and_nothing_else():
    train = [np.arange(0, 30), np.array([5, 6, 7])]
    windows = training_windows(train, max_history=8)
    targets = np.concatenate([w[1:][w[1:] > 0] - 1 for w in windows])
    expected = np.concatenate([t[1:] for t in train])
    assert sorted(targets.tolist()) == sorted(expected.tolist())
    assert windows.shape[1] == 9


def test_split_matches_sequences_and_metrics_match_ranks(tmp_path):
    processed, seqs = _write_split(tmp_path)
    metrics = _run(tmp_path, processed, "mostpop", _params())
    ranks = pd.read_parquet(tmp_path / "out" / "mostpop" / "ranks.parquet")
    assert list(ranks.columns) == ["user_id", "split", "target", "rank", "masked"]
    by_user = seqs.set_index("user_id")["items"]
    for which, pos in (("valid", -2), ("test", -1)):
        for masked in (False, True):
            part = ranks[(ranks.split == which) & (ranks.masked == masked)].sort_values("user_id")
            assert part.user_id.tolist() == seqs.user_id.tolist()
            assert part.target.tolist() == [s[pos] for s in by_user.loc[part.user_id]]
            key = f"{which}_masked" if masked else which
            assert metrics[key] == pytest.approx(metric_table(part["rank"].to_numpy(float)))
    # masking can only move a target up
    un = ranks[~ranks.masked].sort_values(["split", "user_id"])["rank"].to_numpy()
    ma = ranks[ranks.masked].sort_values(["split", "user_id"])["rank"].to_numpy()
    assert (ma <= un).all() and (ma < un).any()
    assert metrics["users"] == len(seqs) and set(metrics) >= {"test", "valid", "test_masked", "valid_masked"}


def test_mostpop_counts_training_items_only(tmp_path):
    processed = tmp_path / "processed"
    processed.mkdir()
    # item 9 is every user's test target: a leak would make it the most popular item
    pd.DataFrame({"user_id": [0, 1, 2], "items": [[1, 2, 3, 9], [1, 4, 5, 9], [2, 1, 6, 9]]}).to_parquet(
        processed / "sequences.parquet", index=False)
    _run(tmp_path, processed, "mostpop", _params())
    ranks = pd.read_parquet(tmp_path / "out" / "mostpop" / "ranks.parquet")
    test = ranks[(ranks.split == "test") & ~ranks.masked]
    # counts: item 1 x3, item 2 x2, ties among 0-count items broken by id -> item 9 ranks 1+2+7
    assert test["rank"].tolist() == [10, 10, 10]


def test_sasrec_learns_sequential_pattern_and_beats_mostpop(tmp_path):
    processed, _ = _write_split(tmp_path)
    pop = _run(tmp_path, processed, "mostpop", _params())
    sas = _run(tmp_path, processed, "sasrec", _params())
    assert sas["test"]["HR@1"] > 0.5
    assert sas["test"]["NDCG@10"] > pop["test"]["NDCG@10"] + 0.3
    assert 1 <= sas["best_epoch"] <= sas["epochs"] <= 6


@pytest.mark.parametrize("name", ["gru4rec", "bert4rec"])
def test_other_models_train_and_rank(tmp_path, name):
    processed, seqs = _write_split(tmp_path, users=60)
    metrics = _run(tmp_path, processed, name, _params(epochs=2))
    assert metrics["epochs"] == 2
    ranks = pd.read_parquet(tmp_path / "out" / name / "ranks.parquet")
    assert len(ranks) == 4 * len(seqs)
    assert ranks["rank"].between(1, N_ITEMS).all()
    history = pd.read_json(tmp_path / "out" / name / "history.json", typ="series")["epochs"]
    assert all(np.isfinite(h["loss"]) for h in history)


def test_same_seed_same_metrics(tmp_path):
    processed, _ = _write_split(tmp_path, users=60)
    a = _run(tmp_path / "a", processed, "sasrec", _params(epochs=2))
    b = _run(tmp_path / "b", processed, "sasrec", _params(epochs=2))
    assert a["test"] == b["test"] and a["valid_masked"] == b["valid_masked"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(TTDSError, match="unknown"):
        model_config(_params(), "caser")
    with pytest.raises(TTDSError, match="baselines.sasrec.lr"):
        params = _params()
        params["baselines"]["sasrec"] = {"lr": "fast"}
        model_config(params, "sasrec")
    processed = tmp_path / "processed"
    processed.mkdir()
    pd.DataFrame({"user_id": [0], "items": [[1, 2]]}).to_parquet(processed / "sequences.parquet")
    with pytest.raises(TTDSError, match="fewer than 3 items"):
        load_split(processed)
    with pytest.raises(TTDSError, match="sequences.parquet: file not found"):
        load_split(tmp_path / "missing")


def test_time_budget_stops_after_the_epoch_that_crosses_it(tmp_path):
    processed, _ = _write_split(tmp_path, users=40)
    metrics = _run(tmp_path, processed, "gru4rec", _params(epochs=5, max_minutes=0))
    assert metrics["epochs"] == 1 and metrics["best_epoch"] == 1
