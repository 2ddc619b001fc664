"""Baselines: same split as `evaluate`, full ranking, learning on a sequential pattern."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ttds_core.baselines import model_config, run
from ttds_core.baselines.data import load_split, pad_inputs, training_windows
from ttds_core.baselines.fmlprec import FMLPRec, prefixes
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


@pytest.mark.parametrize("name", ["mostpop", "markov", "fmlprec"])
def test_split_matches_sequences_and_metrics_match_ranks(tmp_path, name):
    processed, seqs = _write_split(tmp_path)
    metrics = _run(tmp_path, processed, name, _params(epochs=2))
    ranks = pd.read_parquet(tmp_path / "out" / name / "ranks.parquet")
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


def _unmasked_ranks(tmp_path, name, sequences: list[list[int]]) -> pd.Series:
    """Unmasked ranks of `name` on these users' sequences (no items.parquet: ids 0..max)."""
    processed = tmp_path / "processed"
    processed.mkdir()
    pd.DataFrame({"user_id": range(len(sequences)), "items": sequences}).to_parquet(
        processed / "sequences.parquet", index=False)
    _run(tmp_path, processed, name, _params())
    ranks = pd.read_parquet(tmp_path / "out" / name / "ranks.parquet")
    return ranks[~ranks.masked].set_index("split")["rank"]


def test_mostpop_counts_training_items_only(tmp_path):
    # item 9 is every user's test target: a leak would make it the most popular item
    ranks = _unmasked_ranks(tmp_path, "mostpop", [[1, 2, 3, 9], [1, 4, 5, 9], [2, 1, 6, 9]])
    # counts: item 1 x3, item 2 x2, ties among 0-count items broken by id -> item 9 ranks 1+2+7
    assert ranks["test"].tolist() == [10, 10, 10]


def test_markov_counts_training_transitions_only(tmp_path):
    # 1 -> 2 (train -> validation) and 2 -> 3 (validation -> test) are every user's: counted,
    # they would put each target first
    ranks = _unmasked_ranks(tmp_path, "markov", [[0, 1, 2, 3], [4, 1, 2, 3], [5, 1, 2, 3]])
    # no transition leaves 1 or 2 in training: popularity order 1, 0, 4, 5, then 2, 3 by id
    assert ranks["valid"].tolist() == [5, 5, 5]
    assert ranks["test"].tolist() == [6, 6, 6]


def test_markov_ranks_by_transitions_then_popularity():
    from ttds_core.baselines.markov import Markov

    model = Markov(6)
    model.fit([np.array([0, 1, 5]), np.array([0, 1]), np.array([0, 2]), np.array([3, 2]), np.array([3, 2])])
    inputs, lengths = pad_inputs([np.array([4, 0]), np.array([3]), np.array([5])], max_history=4)
    order = model.scores(inputs, lengths).argsort(1, descending=True).tolist()
    assert order[0] == [1, 2, 0, 3, 5, 4]  # after 0: 1 (twice), 2 (once), then by popularity
    assert order[1] == [2, 0, 1, 3, 5, 4]  # after 3: 2; the rest by popularity, ties by id
    assert order[2] == [0, 2, 1, 3, 5, 4]  # nothing ever followed 5: popularity alone


def test_markov_learns_the_walk(tmp_path):
    processed, _ = _write_split(tmp_path)
    pop = _run(tmp_path, processed, "mostpop", _params())
    model = _run(tmp_path, processed, "markov", _params())
    assert model["test"]["HR@1"] > 0.9 and model["valid"]["HR@1"] > 0.9
    assert model["test"]["NDCG@10"] > pop["test"]["NDCG@10"] + 0.5
    assert model["epochs"] == 0


@pytest.mark.parametrize("name", ["sasrec", "fmlprec"])
def test_model_learns_sequential_pattern_and_beats_mostpop(tmp_path, name):
    processed, _ = _write_split(tmp_path)
    pop = _run(tmp_path, processed, "mostpop", _params())
    model = _run(tmp_path, processed, name, _params())
    assert model["test"]["HR@1"] > 0.5
    assert model["test"]["NDCG@10"] > pop["test"]["NDCG@10"] + 0.3
    assert 1 <= model["best_epoch"] <= model["epochs"] <= 6


@pytest.mark.parametrize("name", ["gru4rec", "bert4rec", "fmlprec"])
def test_other_models_train_and_rank(tmp_path, name):
    processed, seqs = _write_split(tmp_path, users=60)
    metrics = _run(tmp_path, processed, name, _params(epochs=2))
    assert metrics["epochs"] == 2
    ranks = pd.read_parquet(tmp_path / "out" / name / "ranks.parquet")
    assert len(ranks) == 4 * len(seqs)
    assert ranks["rank"].between(1, N_ITEMS).all()
    history = pd.read_json(tmp_path / "out" / name / "history.json", typ="series")["epochs"]
    assert all(np.isfinite(h["loss"]) for h in history)


@pytest.mark.parametrize("name", ["sasrec", "fmlprec"])
def test_same_seed_same_metrics(tmp_path, name):
    processed, _ = _write_split(tmp_path, users=60)
    a = _run(tmp_path / "a", processed, name, _params(epochs=2))
    b = _run(tmp_path / "b", processed, name, _params(epochs=2))
    assert a["test"] == b["test"] and a["valid_masked"] == b["valid_masked"]


def test_fmlprec_training_pairs_are_the_causal_target_set():
    windows = torch.from_numpy(training_windows([np.arange(0, 30), np.array([5, 6, 7])], max_history=8))
    inputs, targets = prefixes(windows)
    # the same targets as the causal models' per-position training ...
    assert sorted(targets.tolist()) == sorted(windows[:, 1:][windows[:, 1:] > 0].tolist())
    # ... each input is the consecutive run just before its target, right-aligned (left padding)
    for row, target in zip(inputs, targets):
        history = row[row > 0]
        assert row[-len(history):].tolist() == history.tolist()
        assert history.tolist() == list(range(int(target) - len(history), int(target)))


def test_fmlprec_prediction_ignores_items_at_and_after_the_target():
    """The filter mixes all positions; the model must only ever score from the history."""
    torch.manual_seed(0)
    model = FMLPRec(n_items=N_ITEMS, max_history=8, hidden=16, layers=2, dropout=0.0).eval()
    seq = torch.tensor([[3, 9, 4, 17, 25, 11, 30, 2]])
    later = seq.clone()
    later[0, 5:] = torch.tensor([1, 1, 1])  # change everything from position 5 on
    lengths = torch.tensor([5])
    # scoring a history of 5 items: what follows it in the row cannot matter
    assert torch.equal(model.scores(seq, lengths), model.scores(later, lengths))
    # the same holds in training: the input paired with target seq[5] is the same 5 items
    pad = torch.zeros(1, 1, dtype=torch.long)
    a_in, a_targets = prefixes(torch.cat([seq, pad], 1))
    b_in, _ = prefixes(torch.cat([later, pad], 1))
    assert a_targets[4] == seq[0, 5] and torch.equal(a_in[4], b_in[4])
    assert a_in[4].tolist() == [0, 0, 0] + seq[0, :5].tolist()
    # end to end: the training loss is exactly the CE of scoring each target's history alone
    windows = torch.from_numpy(training_windows([seq[0].numpy() - 1, np.arange(20, 31)], max_history=8))
    pairs = [(w[:t], w[t]) for w in windows for t in range(1, len(w)) if w[t] > 0]
    inputs, lengths = pad_inputs([history.numpy() - 1 for history, _ in pairs], max_history=8)
    targets = torch.stack([target for _, target in pairs])
    expected = torch.nn.functional.cross_entropy(model.scores(inputs, lengths), targets - 1)
    assert torch.allclose(model.loss(windows), expected, atol=1e-5)
    # the guard is needed: position 4 of a full row does see the later items through the filter
    assert not torch.allclose(model.encode(seq)[:, 4], model.encode(later)[:, 4])


def test_fmlprec_padding_embedding_never_reaches_the_scores():
    torch.manual_seed(0)
    model = FMLPRec(n_items=N_ITEMS, max_history=8, hidden=16, layers=2, dropout=0.0).eval()
    inputs, lengths = pad_inputs([np.array([4, 5, 6]), np.arange(10, 20)], max_history=8)
    before = model.scores(inputs, lengths)
    # the padding embedding never reaches the output: padding slots are zeroed
    with torch.no_grad():
        model.item_embedding.weight[0].normal_()
    assert torch.equal(before, model.scores(inputs, lengths))


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


def _train_sasrec(processed, checkpoint=None, **overrides):
    from ttds_core.baselines import MODELS
    from ttds_core.baselines.loop import train
    from ttds_core.config import seed_everything

    params = _params(**overrides)
    cfg = model_config(params, "sasrec")
    split = load_split(processed)
    seed_everything(cfg["seed"])
    model = MODELS["sasrec"](split.n_items, cfg["max_history"], cfg)
    info = train(model, split, cfg, torch.device("cpu"), select_masked=False, checkpoint=checkpoint)
    return model.state_dict(), info


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    processed, _ = _write_split(tmp_path, users=60)
    ckpt = tmp_path / "ckpt"
    straight, info = _train_sasrec(processed, epochs=4, patience=10)
    _train_sasrec(processed, ckpt, epochs=2, patience=10)  # "killed" after epoch 2
    assert (ckpt / "state.json").exists()
    resumed, info_resumed = _train_sasrec(processed, ckpt, epochs=4, patience=10)
    assert info_resumed.pop("earlier_seconds") > 0 and info.pop("earlier_seconds") == 0
    assert info_resumed == info and len(info["history"]) == 4
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, capsys):
    processed, _ = _write_split(tmp_path, users=60)
    ckpt = tmp_path / "ckpt"
    _train_sasrec(processed, ckpt, epochs=2, patience=10)
    fresh, info = _train_sasrec(processed, epochs=2, patience=10, lr=5e-3)
    other, info_other = _train_sasrec(processed, ckpt, epochs=2, patience=10, lr=5e-3)
    assert "starting fresh" in capsys.readouterr().err
    assert info_other == info and all(torch.equal(fresh[k], other[k]) for k in fresh)


def test_run_removes_its_checkpoint_once_outputs_are_written(tmp_path):
    processed, _ = _write_split(tmp_path, users=40)
    stale = tmp_path / "out" / "checkpoints" / "gru4rec.stale"  # one set aside by an earlier run
    stale.mkdir(parents=True)
    (stale / "state.json").write_text("{}")
    _run(tmp_path, processed, "gru4rec", _params(epochs=2))
    assert (tmp_path / "out" / "gru4rec" / "ranks.parquet").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_eval_max_users_ranks_the_users_evaluate_ranks(tmp_path):
    """`eval.max_users` picks the same seeded users for a baseline as for TTDS's `evaluate`
    (metrics of the two files are over the same users); training still sees every user."""
    from ttds_core.cases import select_users

    processed, seqs = _write_split(tmp_path)
    params = _params()
    params["eval"]["max_users"] = 25
    metrics = _run(tmp_path, processed, "mostpop", params)
    ranks = pd.read_parquet(tmp_path / "out" / "mostpop" / "ranks.parquet")
    chosen = select_users(seqs, 25, params["seed"])["user_id"].tolist()
    assert metrics["users"] == 25
    assert sorted(set(ranks.user_id)) == sorted(chosen)
    everyone = _run(tmp_path / "all", processed, "mostpop", _params())  # eval.max_users unset: all
    assert everyone["users"] == len(seqs)
